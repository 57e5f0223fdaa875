"""Decoder parity with transformers and KV-cache semantics (real logits, no mocks)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from reasonrag_jax.models.decoder import (PRESETS, Decoder, DecoderConfig, KVCache, _cached_attention,
                                          _masked_attention, attention_mask)
from reasonrag_jax.models.weights import load_hf_dir


def torch_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.numpy()


def arange_positions(batch: int, length: int) -> jnp.ndarray:
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


@nnx.jit
def forward(model, tokens, positions):
    """Uncached logits (jitted: eager op-by-op dispatch is slow on CPU)."""
    logits, cache = model(tokens, positions)
    assert cache is None
    return logits


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, make_hf_dir, tiny_llama_cfg, tiny_qwen2_cfg):
    """(our Decoder loaded from a saved HF dir, the transformers model that wrote it)."""
    cfg = tiny_llama_cfg if request.param == "llama" else tiny_qwen2_cfg
    path, reference = make_hf_dir(cfg, seed=1)
    return load_hf_dir(path), reference


def test_logits_match_transformers(tiny):
    model, reference = tiny
    tokens = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (3, 17), dtype=np.int32)
    logits = forward(model, jnp.asarray(tokens), arange_positions(3, 17))
    assert logits.dtype == jnp.float32 and logits.shape == (3, 17, 97)
    ref = torch_logits(reference, tokens)
    assert np.abs(ref).max() > 1.0          # the comparison is not between near-zero numbers
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=0)


def test_hidden_then_logits_equals_call(tiny):
    model, _ = tiny
    tokens = jnp.arange(10, dtype=jnp.int32)[None] % model.cfg.vocab_size
    hidden, _ = nnx.jit(lambda m, t, p: m.hidden(t, p))(model, tokens, arange_positions(1, 10))
    assert hidden.shape == (1, 10, model.cfg.hidden_size)
    np.testing.assert_allclose(nnx.jit(lambda m, h: m.logits(h))(model, hidden),
                               forward(model, tokens, arange_positions(1, 10)), atol=1e-5, rtol=0)


def test_right_padding_never_leaks_without_cache(tiny):
    """A padded row gives the same logits as the row alone, whatever the pads' positions."""
    model, _ = tiny
    rng = np.random.default_rng(1)
    row = rng.integers(0, 97, (1, 6), dtype=np.int32)
    alone = forward(model, jnp.asarray(row), arange_positions(1, 6))
    padded = np.concatenate([row, np.zeros((1, 5), np.int32)], axis=1)
    for pad_pos in (np.arange(6, 11), np.zeros(5)):
        positions = np.concatenate([np.arange(6), pad_pos])[None].astype(np.int32)
        out = forward(model, jnp.asarray(padded), jnp.asarray(positions))
        np.testing.assert_allclose(out[:, :6], alone, atol=1e-5, rtol=0)


def test_cache_prefill_and_ragged_decode_match_full_forward(tiny):
    """Right-padded prompts of different lengths, then one token per step at each row's own
    position, inside jit (split/merge pattern): every logit equals the uncached forward."""
    model, reference = tiny
    rng = np.random.default_rng(2)
    prompt_lens, total = np.array([5, 2, 7]), 12
    seqs = rng.integers(0, 97, (3, total), dtype=np.int32)
    full = torch_logits(reference, seqs)           # each row alone is the same as batched here
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, tokens, positions, cache):
        return nnx.merge(graphdef, state)(tokens, positions, cache)

    width = prompt_lens.max()
    prompt = np.where(np.arange(width) < prompt_lens[:, None], seqs[:, :width], 0)
    cache = KVCache.init(model.cfg, 3, 16)
    logits, cache = step(state, jnp.asarray(prompt), arange_positions(3, width), cache)
    for b, n in enumerate(prompt_lens):
        np.testing.assert_allclose(logits[b, :n], full[b, :n], atol=1e-4, rtol=0)
    for j in range(total - width):
        pos = prompt_lens + j
        tokens = seqs[np.arange(3), pos][:, None]
        logits, cache = step(state, jnp.asarray(tokens), jnp.asarray(pos[:, None], jnp.int32),
                             cache)
        np.testing.assert_allclose(logits[:, 0], full[np.arange(3), pos], atol=1e-4, rtol=0)


def equations(jaxpr):
    """Every equation of a traced program, inside scans, jits and remat blocks too."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                sub = getattr(sub, "jaxpr", sub)           # ClosedJaxpr → Jaxpr
                if hasattr(sub, "eqns"):
                    yield from equations(sub)


def variants(cfg):
    """(functional forward of a random Decoder(cfg), its params, `with_cfg(**changes)`: the same
    forward and params for the changed config), on fixed tokens."""
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 97, (2, 9), dtype=np.int32))
    positions = arange_positions(2, 9)

    def with_cfg(**changes):
        graphdef = nnx.graphdef(Decoder(dataclasses.replace(cfg, **changes), rngs=nnx.Rngs(0)))
        return lambda s: nnx.merge(graphdef, s)(tokens, positions)[0]

    return with_cfg, state


def test_cached_attention_gives_a_position_the_same_bits_in_every_call_shape():
    """SmolLM2's attention shapes (3 KV heads, 3 query heads each, head_dim 64): late positions
    alone or beside other rows, in calls of 4 to 320 positions, get the bits of one call of all
    320 — what the prefix cache and batch-independence rest on. On XLA:CPU a `jnp.sum` over
    the block (a row alone, any chunk) and the p·V matmul of a short chunk once changed them."""
    rng = np.random.default_rng(0)
    groups, d, size = 3, 64, 512
    keys = rng.standard_normal((1, 3, d, size)).astype(np.float32)
    values = rng.standard_normal((1, 3, size, d)).astype(np.float32)
    q = rng.standard_normal((1, 3, groups, 320, d)).astype(np.float32)
    attend = jax.jit(lambda q, k, v, p: _cached_attention(q, k, v, p, groups, 0.125))

    def positions(rows, first, last=320):
        t = last - first
        out = attend(np.repeat(q[:, :, :, first:last], rows, 0).reshape(rows, 3, groups * t, d),
                     np.repeat(keys, rows, 0), np.repeat(values, rows, 0),
                     np.tile(first + np.arange(t, dtype=np.int32), (rows, 1)))
        return np.asarray(out).reshape(rows, 3, groups, t, d)[0]

    whole = positions(2, 0)
    for rows, first, last in ((1, 0, 320), (1, 300, 320), (2, 300, 320), (4, 256, 320),
                              (8, 300, 320), (4, 304, 320), (16, 316, 320), (4, 312, 316)):
        np.testing.assert_array_equal(positions(rows, first, last), whole[:, :, first:last],
                                      err_msg=f"{rows} rows, positions {first}..{last - 1}")


def test_masked_attention_in_query_blocks_equals_dense_attention():
    """A packed prefix-tree row of 300 tokens (blocks of 128, 128 and 44 queries): a shared
    prompt, two completions that must not see each other, right padding. Each query block reads
    only the keys up to its end; the result equals dense softmax attention under the full mask."""
    rng = np.random.default_rng(0)
    groups, d, t = 3, 16, 300
    ends = np.concatenate([np.full(150, 280), np.full(70, 220), np.full(60, 280),
                           np.arange(281, 301)])[None].astype(np.int32)
    mask = np.asarray(attention_mask(jnp.zeros((1, t), jnp.int32), jnp.asarray(ends)))
    assert mask[0, 250, 149] and not mask[0, 250, 200] and not mask[0, 290, 10]
    q = rng.standard_normal((1, 2, groups * t, d)).astype(np.float32)
    keys, values = (rng.standard_normal((1, 2, t, d)).astype(np.float32) for _ in range(2))
    out = jax.jit(lambda *a: _masked_attention(*a, groups, 0.25))(q, keys, values, mask)
    s = np.einsum("bkgqd,bksd->bkgqs", q.reshape(1, 2, groups, t, d).astype(np.float64),
                  keys.astype(np.float64)) * 0.25
    s = np.where(mask[:, None, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    dense = np.einsum("bkgqs,bksd->bkgqd", p / p.sum(-1, keepdims=True), values)
    np.testing.assert_allclose(np.asarray(out), dense.reshape(1, 2, groups * t, d), atol=1e-5)


def test_remat_is_exact_and_in_the_traced_program(tiny_llama_cfg):
    with_cfg, state = variants(tiny_llama_cfg)

    def loss(forward):
        return lambda s: jnp.mean(jax.nn.log_softmax(forward(s))[..., 0])

    def remat_in(program):
        return any("remat" in e.primitive.name or e.primitive.name == "checkpoint"
                   for e in equations(program.jaxpr))

    base, remat = loss(with_cfg()), loss(with_cfg(remat=True))
    assert remat_in(jax.make_jaxpr(jax.grad(remat))(state))
    assert not remat_in(jax.make_jaxpr(jax.grad(base))(state))
    base_loss, base_grad = jax.jit(jax.value_and_grad(base))(state)
    remat_loss, remat_grad = jax.jit(jax.value_and_grad(remat))(state)
    np.testing.assert_allclose(remat_loss, base_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
                 remat_grad, base_grad)


def test_bfloat16_runs_in_bfloat16_within_its_precision(tiny_llama_cfg):
    """Every matmul takes bfloat16 operands (float32 accumulation), and the logits' error is of
    bfloat16's order: each matmul's inputs are rounded to 8 significant bits (unit roundoff
    u = 2^-8, so ≤ 2u relative per matmul); the logits carry that from each of the 2L residual
    sub-blocks and the head, ≤ (2L + 1) · 2u of the largest logit. Above float32's roundoff by
    far (> u / 16), so a model that silently ran in float32 fails too."""
    with_cfg, state = variants(tiny_llama_cfg)
    bf16 = with_cfg(dtype="bfloat16")
    dots = [e for e in equations(jax.make_jaxpr(bf16)(state).jaxpr)
            if e.primitive.name == "dot_general"]
    assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
    full32, low = jax.jit(with_cfg())(state), jax.jit(bf16)(state)
    assert low.dtype == jnp.float32
    u, scale = 2.0 ** -8, float(np.abs(full32).max())
    err = float(np.abs(np.asarray(low) - np.asarray(full32)).max())
    assert u / 16 * scale < err <= (2 * tiny_llama_cfg.num_layers + 1) * 2 * u * scale, err / scale


def test_bfloat16_decode_on_cpu_keeps_a_float32_cache(tiny_llama_cfg):
    """XLA:CPU has no bfloat16 scatter: writing a step's K/V into a bfloat16 cache converted
    every layer's whole cache to float32 and back. There the cache is float32 (no scatter into
    bfloat16 at all) while the matmuls, attention's included, take bfloat16 operands with float32
    accumulation, and a prefill then a decode step give the float32 model's logits within
    bfloat16's precision."""
    cfg = dataclasses.replace(tiny_llama_cfg, dtype="bfloat16")
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 97, (2, 9), dtype=np.int32))

    def cached(state, cache):
        m = nnx.merge(graphdef, state)
        first, cache = m(tokens[:, :8], arange_positions(2, 8), cache)
        last, cache = m(tokens[:, 8:], jnp.full((2, 1), 8, jnp.int32), cache)
        return jnp.concatenate([first, last], axis=1)

    cache = KVCache.init(cfg, 2, 16)
    assert jax.default_backend() == "cpu" and cache.k[0].dtype == jnp.float32
    eqns = list(equations(jax.make_jaxpr(cached)(state, cache).jaxpr))
    scatters = [e for e in eqns if e.primitive.name == "scatter"]
    assert scatters and all(v.aval.dtype == jnp.float32 for e in scatters for v in e.invars[:1])
    bf16_dots = [e for e in eqns if e.primitive.name == "dot_general"
                 and all(v.aval.dtype == jnp.bfloat16 for v in e.invars)]
    assert len(bf16_dots) >= 7 * cfg.num_layers * 2
    assert all(e.params["preferred_element_type"] == jnp.float32 for e in bf16_dots)
    out = np.asarray(jax.jit(cached)(state, cache))
    full32 = np.asarray(forward(Decoder(tiny_llama_cfg, rngs=nnx.Rngs(0)), tokens,
                                arange_positions(2, 9)))
    u, scale = 2.0 ** -8, float(np.abs(full32).max())
    assert np.abs(out - full32).max() <= (2 * cfg.num_layers + 1) * 2 * u * scale


def test_every_param_has_logical_axis_names(tiny_qwen2_cfg):
    model = nnx.eval_shape(lambda: Decoder(tiny_qwen2_cfg, rngs=nnx.Rngs(0)))
    allowed = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers"}
    params = nnx.state(model, nnx.Param)
    names = dict(jax.tree.leaves_with_path(nnx.get_partition_spec(params)))
    assert len(names) == 15                   # 9 stacked + 3 stacked biases + embed, norm, head
    for path, var in nnx.to_flat_state(params):
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == var.ndim and set(axes) <= allowed, (path, axes)
        assert (axes[0] == "layers") == (var.ndim > 1 and path[0] not in
                                         ("embed", "lm_head"))


def test_presets_have_the_published_parameter_counts():
    published = {"smollm2-135m": 134_515_008, "qwen2.5-0.5b": 494_032_768,
                 "qwen2.5-7b": 7_615_616_512}
    for name, count in published.items():
        abstract = nnx.eval_shape(lambda c=PRESETS[name]: Decoder(c, rngs=nnx.Rngs(0)))
        assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract))) == count, name


def test_from_hf_reads_both_rope_spellings_and_refuses_scaling():
    base = PRESETS["qwen2.5-0.5b"].to_hf()
    del base["rope_theta"]
    v5 = DecoderConfig.from_hf({**base, "rope_parameters": {"rope_theta": 1e6,
                                                            "rope_type": "default"}})
    v4 = DecoderConfig.from_hf({**base, "rope_theta": 1e6, "rope_scaling": None})
    assert v5 == v4 == PRESETS["qwen2.5-0.5b"]
    assert DecoderConfig.from_hf(v5.to_hf(), remat=True).remat
    for bad in ({"rope_scaling": {"type": "linear", "factor": 2.0}},
                {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}},
                {"use_sliding_window": True}):
        with pytest.raises(ValueError):
            DecoderConfig.from_hf({**base, "rope_theta": 1e6, **bad})


PROMPTS = ["What is the capital of France?", "Write a haiku about rain.",
           "Who wrote the novel Pride and Prejudice, and when?"]


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers_generate(smollm2, smollm2_torch):
    """Batched, right-padded, cached greedy decoding = transformers `generate`, 32 tokens.

    EOS is suppressed on both sides (`min_new_tokens`) so every row really decodes 32 tokens."""
    model, tokenizer = smollm2
    new = 32
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                         add_generation_prompt=True, return_dict=False)
           for q in PROMPTS]
    expected = []
    for row in ids:
        out = smollm2_torch.generate(torch.tensor([row]), max_new_tokens=new, do_sample=False,
                                     min_new_tokens=new, pad_token_id=tokenizer.eos_token_id)
        expected.append(out[0, len(row):].tolist())

    graphdef, state = nnx.split(model)

    @jax.jit
    def greedy_step(state, tokens, positions, last, cache):
        logits, cache = nnx.merge(graphdef, state)(tokens, positions, cache)
        logits = logits[jnp.arange(3), last].at[:, tokenizer.eos_token_id].set(-jnp.inf)
        return jnp.argmax(logits, -1).astype(jnp.int32), cache

    lens = np.array([len(r) for r in ids], np.int32)
    width = lens.max()
    prompt = np.full((3, width), tokenizer.eos_token_id, np.int32)
    for b, row in enumerate(ids):
        prompt[b, :len(row)] = row
    cache = KVCache.init(model.cfg, 3, width + new)
    token, cache = greedy_step(state, jnp.asarray(prompt), arange_positions(3, width),
                               jnp.asarray(lens - 1), cache)
    got = [token]
    for j in range(new - 1):
        token, cache = greedy_step(state, token[:, None], jnp.asarray(lens + j)[:, None],
                                   jnp.zeros(3, jnp.int32), cache)
        got.append(token)
    got = np.stack(got, 1).tolist()
    for b in range(3):
        assert got[b] == expected[b], (PROMPTS[b], tokenizer.decode(got[b]),
                                       tokenizer.decode(expected[b]))
