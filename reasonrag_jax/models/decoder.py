"""Llama / Qwen2 decoder in Flax NNX, with a per-row-position KV cache.

Layer weights are stacked on a leading `layers` axis and training runs them as one `lax.scan`,
so a 30-layer model compiles as one layer and rematerialisation is one flag. Serving (the
sampler, anything with a KV cache) takes the same weights as a tuple of per-layer arrays and runs
the layers unrolled, reading every weight and cache buffer in place; both go through one
`forward`. Every parameter carries logical axis names that `sharding.py` maps to a mesh.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    max_position_embeddings: int
    model_type: str = "llama"          # 'llama' | 'mistral' (Llama-shaped) | 'qwen2'
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    extra_eos_token_ids: tuple[int, ...] = ()   # the rest of config.json's eos_token_id list
    # Llama 3.x RoPE scaling: (factor, low_freq_factor, high_freq_factor, original context)
    rope_llama3: tuple[float, float, float, int] | None = None
    dtype: str = "float32"             # compute dtype
    param_dtype: str = "float32"
    remat: bool = False

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> DecoderConfig:
        """Build from a Hugging Face `config.json` dict (LlamaConfig / Qwen2Config fields)."""
        model_type = hf.get("model_type", "llama")
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"unsupported model_type {model_type!r} (llama, mistral and qwen2 are)")
        # transformers ≥ 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope scaling {rope} is not supported (plain RoPE and llama3 are)")
        llama3 = None if rope_type == "default" else (
            float(rope["factor"]), float(rope["low_freq_factor"]),
            float(rope["high_freq_factor"]), int(rope["original_max_position_embeddings"]))
        # Qwen2 says `use_sliding_window`; Mistral slides whenever `sliding_window` is set.
        window = hf.get("sliding_window")
        if hf.get("use_sliding_window", model_type == "mistral" and window is not None) and (
                window is None or window < hf.get("max_position_embeddings", 32768)):
            raise ValueError(f"sliding-window attention ({window} tokens) is not supported")
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        fields = dict(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            model_type=model_type, bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos[0], extra_eos_token_ids=tuple(eos[1:]), rope_llama3=llama3,
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM"}[self.model_type]
        out = {
            "architectures": [arch], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps, "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings, "hidden_act": "silu",
            "bos_token_id": self.bos_token_id, "torch_dtype": self.param_dtype,
            "eos_token_id": ([self.eos_token_id, *self.extra_eos_token_ids]
                             if self.extra_eos_token_ids else self.eos_token_id),
        }
        if self.model_type == "llama":
            out.update(attention_bias=self.qkv_bias, mlp_bias=False)
        if self.rope_llama3 is not None:
            factor, low, high, original = self.rope_llama3
            out["rope_parameters"] = {
                "rope_type": "llama3", "rope_theta": self.rope_theta, "factor": factor,
                "low_freq_factor": low, "high_freq_factor": high,
                "original_max_position_embeddings": original}
        return out


PRESETS: dict[str, DecoderConfig] = {
    "smollm2-135m": DecoderConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, qkv_bias=False, max_position_embeddings=8192,
        bos_token_id=1, eos_token_id=2),
    "qwen2.5-0.5b": DecoderConfig(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
        num_kv_heads=2, head_dim=64, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, qkv_bias=True, max_position_embeddings=32768,
        model_type="qwen2", bos_token_id=151643, eos_token_id=151645),
    "qwen2.5-7b": DecoderConfig(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, qkv_bias=True, max_position_embeddings=32768,
        model_type="qwen2", bos_token_id=151643, eos_token_id=151645),
}


class KVCache(flax.struct.PyTreeNode):
    """Fields: `k` and `v`, one buffer per layer (shapes below), so a decode step updates each
    layer's slots in place (a stacked [L, ...] cache read inside the layer scan made XLA copy it
    at every layer).

    Keys are stored transposed, slot axis innermost, because a decode step's scores then stream
    through them: on XLA:CPU `q · K` reads [B, KVH, Dh, S] about twice as fast as [.., S, Dh].
    Slot s holds position s.
    """
    k: tuple[jax.Array, ...]  # per layer [B, KVH, Dh, S]
    v: tuple[jax.Array, ...]  # per layer [B, KVH, S, Dh]

    @classmethod
    def init(cls, cfg: DecoderConfig, batch: int, size: int) -> KVCache:
        def zeros(shape):
            return tuple(jnp.zeros(shape, kv_dtype(cfg)) for _ in range(cfg.num_layers))
        return cls(k=zeros((batch, cfg.num_kv_heads, cfg.head_dim, size)),
                   v=zeros((batch, cfg.num_kv_heads, size, cfg.head_dim)))

    def take(self, rows: jax.Array) -> KVCache:
        """Rows gathered by index (copies a prefilled prompt into n sample rows)."""
        return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), self)


# Per-layer parameters: name -> (shape builder, logical axes without the leading "layers").
def _layer_shapes(c: DecoderConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    h, n, k, d, m = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    shapes = {
        "attn_norm": ((h,), ("embed",)),
        "wq": ((h, n, d), ("embed", "heads", "head_dim")),
        "wk": ((h, k, d), ("embed", "kv_heads", "head_dim")),
        "wv": ((h, k, d), ("embed", "kv_heads", "head_dim")),
        "wo": ((n, d, h), ("heads", "head_dim", "embed")),
        "mlp_norm": ((h,), ("embed",)),
        "w_gate": ((h, m), ("embed", "mlp")),
        "w_up": ((h, m), ("embed", "mlp")),
        "w_down": ((m, h), ("mlp", "embed")),
    }
    if c.qkv_bias:
        shapes.update(bq=((n, d), ("heads", "head_dim")), bk=((k, d), ("kv_heads", "head_dim")),
                      bv=((k, d), ("kv_heads", "head_dim")))
    return shapes


LAYER_PARAMS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down",
                "bq", "bk", "bv")


def kv_dtype(cfg: DecoderConfig) -> jnp.dtype:
    """The KV cache's (and prefix pages') dtype: the compute dtype, but float32 on XLA:CPU,
    which has no bfloat16 scatter: to write a step's K/V it converted each layer's whole cache
    to float32 and back. A bfloat16 decode step of SmolLM2-135M (16 rows × 4 positions,
    position 100, Zen 4) took 351 ms with a bfloat16 cache, 85 ms with a float32 one, against
    122 ms in float32. Attention reads the cache back in the compute dtype."""
    return jnp.dtype("float32" if jax.default_backend() == "cpu" else cfg.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(d: int, theta: float,
                     llama3: tuple[float, float, float, int] | None = None) -> jax.Array:
    """[D/2] inverse frequencies; Llama 3.x divides the low frequencies (wavelengths beyond the
    original context / low_freq_factor) by `factor`, keeps the high ones (below original /
    high_freq_factor) and interpolates linearly in between."""
    inv = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    if llama3 is None:
        return inv
    factor, low, high, original = llama3
    wavelength = 2 * jnp.pi / inv
    smooth = jnp.clip((original / wavelength - low) / (high - low), 0.0, 1.0)
    return (1 - smooth) * inv / factor + smooth * inv


def rope(x: jax.Array, positions: jax.Array, theta: float,
         llama3: tuple[float, float, float, int] | None = None) -> jax.Array:
    """Rotary embedding in Hugging Face's rotate-half layout. x: [B, T, H, D]."""
    d = x.shape[-1]
    inv = rope_frequencies(d, theta, llama3)
    angle = positions.astype(jnp.float32)[..., None] * inv                 # [B, T, D/2]
    cos, sin = jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class Decoder(nnx.Module):
    """Causal LM. `__call__(tokens, positions, cache) -> (float32 logits, cache)`."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        init = jax.nn.initializers.normal(0.02)

        def param(shape, axes, fill=None):
            """`out_sharding` holds the logical axis names (flax ≥ 0.12 spelling)."""
            value = (init(rngs.params(), shape, pdt) if fill is None
                     else jnp.full(shape, fill, pdt))
            return nnx.Param(value, out_sharding=axes, eager_sharding=False)

        self.embed = param((cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
        for name, (shape, axes) in _layer_shapes(cfg).items():
            fill = 1.0 if name.endswith("norm") else 0.0 if name.startswith("b") else None
            setattr(self, name, param((cfg.num_layers, *shape), ("layers", *axes), fill))
        self.final_norm = param((cfg.hidden_size,), ("embed",), 1.0)
        if not cfg.tie_word_embeddings:
            self.lm_head = param((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))

    def params(self) -> dict[str, Any]:
        """Plain arrays: embed, final_norm, [lm_head], and `layers` stacked {name: [L, ...]}."""
        out = {"embed": self.embed[...], "final_norm": self.final_norm[...],
               "layers": {n: getattr(self, n)[...] for n in LAYER_PARAMS if hasattr(self, n)}}
        if not self.cfg.tie_word_embeddings:
            out["lm_head"] = self.lm_head[...]
        return out

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: KVCache | None = None
                 ) -> tuple[jax.Array, KVCache | None]:
        hidden, cache = self.hidden(tokens, positions, cache)
        return self.logits(hidden), cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[B, T, H] → float32 [B, T, V] (split out so DPO can take log-probs in chunks)."""
        return logits(self.cfg, self.params(), hidden)

    def hidden(self, tokens: jax.Array, positions: jax.Array, cache: KVCache | None = None,
               ends: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """Final-normed hidden states; with a cache, this call's tokens also attend to it and
        their K/V are written into it (`ends`: see `attention_mask`)."""
        params = self.params()
        return forward(self.cfg, params if cache is None else unstack_layers(params), tokens,
                       positions, cache, ends)


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
    """`layers` as a tuple of per-layer dicts: the serving layout (see `forward`)."""
    stacked = params["layers"]
    count = next(iter(stacked.values())).shape[0]
    return {**params, "layers": tuple({n: w[i] for n, w in stacked.items()} for i in range(count))}


def logits(cfg: DecoderConfig, params: dict[str, Any], hidden: jax.Array) -> jax.Array:
    """[B, T, H] → float32 [B, T, V] through the (tied or untied) output head."""
    if cfg.tie_word_embeddings:
        w, spec = params["embed"], "bth,vh->btv"
    else:
        w, spec = params["lm_head"], "bth,hv->btv"
    return jnp.einsum(spec, hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)


def attention_mask(positions: jax.Array, ends: jax.Array | None = None) -> jax.Array:
    """[B, T, T]: token i sees token j when j comes no later, by index and by position (so
    right padding never leaks in). With `ends` [B, T] the row is a prefix tree flattened depth
    first (`train.data`) and i sees exactly its ancestors and itself: the j ≤ i whose subtree,
    which ends before `ends[j]`, holds i. Examples that share a prompt prefix then share one
    pass over it, each computed exactly as if it were alone."""
    if ends is None:
        return (positions[:, None, :] <= positions[:, :, None]) & jnp.tri(positions.shape[1],
                                                                          dtype=bool)
    idx = jnp.arange(ends.shape[1])
    return (idx[None, :] <= idx[:, None])[None] & (idx[None, :, None] < ends[:, None, :])


def forward(cfg: DecoderConfig, params: dict[str, Any], tokens: jax.Array, positions: jax.Array,
            cache: KVCache | None = None, ends: jax.Array | None = None, decoding: bool = False,
            attention_rows: int | None = None) -> tuple[jax.Array, KVCache | None]:
    """→ (final-normed hidden [B, T, H], the cache with this call's K/V written in).
    `decoding`: a decode step's few positions a row keep their own attention shape (see
    `_cached_attention`). `attention_rows`: only the first rows attend; the others are empty
    decode slots, whose attention output is zeros (on a CPU a decode step's cost is mostly its
    rows' attention over their KV).

    Stacked `layers` run as one `lax.scan` (training and scoring: a 30-layer model compiles as
    one layer, and remat is one flag). A tuple of per-layer dicts runs unrolled — the serving
    layout, which a KV cache needs: each weight and cache buffer is then read and updated in
    place, where slicing stacked arrays inside the scan copied every layer's weights and cache
    at every decode step.
    """
    dtype = jnp.dtype(cfg.dtype)
    x = jnp.take(params["embed"], tokens, axis=0).astype(dtype)
    layers = params["layers"]
    # Without a cache the call's tokens attend to each other (`attention_mask`). With one, K/V
    # are written first, then attended: slot s holds position s, and a token sees the slots up
    # to its own position (`_cached_attention`).
    mask = None if cache is not None else attention_mask(positions, ends)

    def layer(x, p, kv=None):
        return _block(cfg, {n: w.astype(dtype) for n, w in p.items()}, x, positions, mask, kv,
                      decoding, attention_rows)

    if isinstance(layers, dict):
        if cache is not None:
            raise ValueError("a KV cache needs the per-layer layout (unstack_layers)")
        if cfg.remat:
            layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable)
        x, _ = jax.lax.scan(lambda x, p: (layer(x, p)[0], None), x, layers)
    else:
        ks, vs = [], []
        for i, p in enumerate(layers):
            x, kv = layer(x, p, None if cache is None else (cache.k[i], cache.v[i]))
            if kv is not None:
                ks.append(kv[0])
                vs.append(kv[1])
        cache = None if cache is None else KVCache(k=tuple(ks), v=tuple(vs))
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps), cache


# Cache slots per attention block (see `_cached_attention`). 128, not 256: a decode step reads
# each row's K/V only up to the block holding the batch's last position, and on an AVX2 EPYC
# (2026-11-30, SmolLM2-135M, position 300-1000) a 16-row step took 170-250 ms against 235-300,
# a 32-row step 290-540 against 500-720; prefill speed did not change. 64 was slower again.
ATTENTION_BLOCK = 128
# Query rows per KV head below which a prefill call's attention is padded (`_cached_attention`).
MIN_QUERY_ROWS = 64


def _cached_attention(q: jax.Array, keys: jax.Array, values: jax.Array, positions: jax.Array,
                      groups: int, scale: float, decoding: bool = False) -> jax.Array:
    """Attention over a KV cache, one block of `ATTENTION_BLOCK` slots per loop iteration,
    merged by online softmax → [B, K, G*T, D]. Slot s is visible to the token at position p
    when s ≤ p.

    Why a loop over fixed blocks: XLA:CPU picks different dot and reduction kernels for
    different cache lengths (measured: a row's q·K scores change in the last bits between 512
    and 1024 slots), and even unrolled blocks get fused differently. One loop body is one
    compiled computation whatever the cache length, and it stops after the block holding the
    batch's last position, so a row's attention is the same bits for every cache length and
    batch, and costs what the longest row needs, not the cache size. That makes prefix KV
    computed in one call equal to KV computed in any other — what the prefix cache relies on.
    A block past a row's position is fully masked: its probabilities are exactly 0 and the
    running max does not move, so it adds exactly nothing.
    q: [B, K, G*T, D]; keys: [B, K, D, S]; values: [B, K, S, D]; positions: [B, T].

    Every prefill call must give a position the same bits whatever else the call holds, and
    XLA:CPU picks kernels by shape (AVX-512 Zen 5, 2026-12-02, SmolLM2's shapes): `jnp.sum`
    over a block was vectorised per call shape, and the p·V matmul of fewer than ~50 query
    rows per KV head took another kernel than a longer one; each moved log-probs by ~1e-5, so a
    prompt prefilled alone, in chunks or from cached pages differed from the same prompt in a
    batch. So the probabilities' sum comes out of the p·V matmul, as a column of ones after V,
    and a prefill call of few positions is padded to `MIN_QUERY_ROWS` query rows per KV head
    (a decode step, `decoding`, keeps its own shape: it is only ever compared with itself, and
    padding a step's 1 + 3 drafted positions to 64 query rows made it cost 912 ms against 507
    unpadded and 375 for one position: 16 rows at position 700, SmolLM2-135M, AVX-512 Xeon; the
    sampler never prefills one position at a time).
    """
    b, kh, gt, d = q.shape
    t = gt // groups
    if t > 1 and gt < MIN_QUERY_ROWS and not decoding:
        tt = -(-MIN_QUERY_ROWS // groups)        # the last position repeated: same blocks
        q = q.reshape(b, kh, groups, t, d)
        q = jnp.concatenate([q, jnp.repeat(q[:, :, :, -1:], tt - t, axis=3)], axis=3)
        positions = jnp.concatenate([positions, jnp.repeat(positions[:, -1:], tt - t, 1)], 1)
        out = _cached_attention(q.reshape(b, kh, groups * tt, d), keys, values, positions,
                                groups, scale)
        return out.reshape(b, kh, groups, tt, d)[:, :, :, :t].reshape(b, kh, gt, d)
    neg = jnp.finfo(jnp.float32).min
    size = keys.shape[-1]
    if size % ATTENTION_BLOCK:      # the sampler's caches never are; a hand-made one may be
        pad = ATTENTION_BLOCK - size % ATTENTION_BLOCK
        keys = jnp.pad(keys, ((0, 0), (0, 0), (0, 0), (0, pad)))
        values = jnp.pad(values, ((0, 0), (0, 0), (0, pad), (0, 0)))
        size += pad

    def block(i, carry):
        top, total, out = carry
        lo = i * ATTENTION_BLOCK
        # Read in q's dtype: a bfloat16 model's float32 CPU cache (`kv_dtype`) still gets
        # bfloat16 operands (a prefill of 4 × 512 tokens on a Zen 4: 2.0 s against 2.2 s).
        k = jax.lax.dynamic_slice_in_dim(keys, lo, ATTENTION_BLOCK, axis=3).astype(q.dtype)
        v = jax.lax.dynamic_slice_in_dim(values, lo, ATTENTION_BLOCK, axis=2).astype(q.dtype)
        s = jnp.einsum("bkqd,bkds->bkqs", q, k, preferred_element_type=jnp.float32)
        s = s.reshape(b, kh, groups, t, ATTENTION_BLOCK) * scale
        visible = lo + jnp.arange(ATTENTION_BLOCK) <= positions[:, :, None]       # [B, T, blk]
        s = jnp.where(visible[:, None, None], s, neg)
        new_top = jnp.maximum(top, jnp.max(s, axis=-1, keepdims=True))
        p = jnp.exp(s - new_top)
        # The probabilities' sum from the p·V matmul, not a `jnp.sum` (see the docstring).
        v = jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)
        pv = jnp.einsum("bkqs,bksd->bkqd", p.reshape(b, kh, gt, -1).astype(v.dtype), v,
                        preferred_element_type=jnp.float32).reshape(b, kh, groups, t, d + 1)
        rescale = jnp.exp(top - new_top)
        return (new_top, total * rescale + pv[..., d:], out * rescale + pv[..., :d])

    shape = (b, kh, groups, t)
    init = (jnp.full((*shape, 1), neg, jnp.float32), jnp.zeros((*shape, 1), jnp.float32),
            jnp.zeros((*shape, d), jnp.float32))
    blocks = jnp.max(positions) // ATTENTION_BLOCK + 1
    _, total, out = jax.lax.fori_loop(0, jnp.minimum(blocks, size // ATTENTION_BLOCK), block,
                                      init)
    return (out / total).reshape(b, kh, gt, d).astype(q.dtype)


# Query tokens per block of the uncached attention (`_masked_attention`).
MASKED_ATTENTION_BLOCK = 128


def _masked_attention(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array,
                      groups: int, scale: float) -> jax.Array:
    """Attention of a call's tokens to each other under `mask` [B, T, T] → [B, K, G*T, D].

    Every `attention_mask` is causal by index, so a block of queries never sees a key past its
    own last token: each block of `MASKED_ATTENTION_BLOCK` queries reads only the keys up to
    its end, and the scores above the diagonal blocks are never formed. The keys it skips
    would get probability exactly 0, so only summation order changes. Measured on an AVX-512
    Xeon (2026-12-02, SmolLM2-135M SFT step with remat on packed rows): [1 × 1,024] 10.1 →
    7.6 s, [3 × 512] 10.1 → 9.5 s; blocks of 64 were no faster.
    q: [B, K, G*T, D]; keys, values: [B, K, T, D].
    """
    b, kh, gt, d = q.shape
    t = gt // groups
    q = q.reshape(b, kh, groups, t, d)
    out = []
    for lo in range(0, t, MASKED_ATTENTION_BLOCK):
        hi = min(lo + MASKED_ATTENTION_BLOCK, t)
        s = jnp.einsum("bkqd,bksd->bkqs", q[:, :, :, lo:hi].reshape(b, kh, -1, d),
                       keys[:, :, :hi], preferred_element_type=jnp.float32)
        s = s.reshape(b, kh, groups, hi - lo, hi) * scale
        s = jnp.where(mask[:, None, None, lo:hi, :hi], s, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s, axis=-1).astype(values.dtype)
        out.append(jnp.einsum("bkqs,bksd->bkqd", p.reshape(b, kh, -1, hi), values[:, :, :hi])
                   .reshape(b, kh, groups, hi - lo, d))
    return jnp.concatenate(out, axis=3).reshape(b, kh, gt, d)


def _block(cfg: DecoderConfig, p: dict[str, jax.Array], x: jax.Array, positions: jax.Array,
           mask: jax.Array | None, kv: tuple[jax.Array, jax.Array] | None,
           decoding: bool = False, attention_rows: int | None = None):
    """One pre-norm layer → (residual stream, this layer's cache buffers with the call's K/V
    written in, or None). `kv`: the buffers (keys transposed, see `KVCache`), whose first
    rows are the call's rows; only the first `attention_rows` of them attend (`forward`)."""
    b, t, _ = x.shape
    groups = cfg.num_heads // cfg.num_kv_heads
    h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    # 2-D matmuls: XLA:CPU runs them far faster than the equivalent 3-D dot_generals.
    def proj(w):
        return dense(h, w.reshape(w.shape[0], -1)).reshape(b, t, w.shape[1], w.shape[2])

    q, k, v = proj(p["wq"]), proj(p["wk"]), proj(p["wv"])
    if "bq" in p:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    # Heads-major layout [B, K, T, D]: attention is a plain batched matmul over (B, K).
    q = rope(q, positions, cfg.rope_theta, cfg.rope_llama3).reshape(
        b, t, cfg.num_kv_heads, groups, cfg.head_dim)
    q = q.transpose(0, 2, 3, 1, 4).reshape(b, cfg.num_kv_heads, groups * t, cfg.head_dim)
    k = rope(k, positions, cfg.rope_theta, cfg.rope_llama3)
    if kv is None:
        attn = _masked_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask,
                                 groups, cfg.head_dim ** -0.5)
    else:
        # Advanced indices split by slices put their dims first: both updates are [B, T, K, D].
        rows = jnp.broadcast_to(jnp.arange(b)[:, None], positions.shape)
        keys = kv[0].at[rows, :, :, positions].set(k.astype(kv[0].dtype), mode="drop")
        values = kv[1].at[rows, :, positions, :].set(v.astype(kv[1].dtype), mode="drop")
        kv = (keys, values)
        # A call may run on the first rows of a larger cache (a decode call on its live rows),
        # and attend on fewer still (the rows past them are empty slots).
        a = attention_rows or b
        attn = _cached_attention(q[:a], keys[:a], values[:a], positions[:a], groups,
                                 cfg.head_dim ** -0.5, decoding)
        attn = jnp.pad(attn, ((0, b - a), (0, 0), (0, 0), (0, 0)))
    attn = attn.reshape(b, cfg.num_kv_heads, groups, t, -1).transpose(0, 3, 1, 2, 4)
    attn = attn.reshape(b, t, -1)
    x = x + dense(attn, p["wo"].reshape(-1, p["wo"].shape[-1]))
    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    gate = jax.nn.silu(dense(h, p["w_gate"]))
    x = x + dense(gate * dense(h, p["w_up"]), p["w_down"])
    return x, kv


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w accumulated in float32, returned in x's dtype. The same op in float32; in bfloat16
    the float32 result is what XLA:CPU runs on AVX512_BF16 (a bfloat16-result dot took another,
    slower kernel: on a Zen 4, 2.3 against 1.2 ms for 256 rows of SmolLM2's gate projection)."""
    return jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
