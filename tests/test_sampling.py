"""Sampler: greedy = an uncached argmax loop, sampling = an uncached loop with the same keys,
per-row seeds, n samples sharing one prefill, exact stop strings, EOS, scoring, no recompiles
inside a bucket, a sharded mesh = one device, and SmolLM2 greedy = transformers `generate`."""
import dataclasses
import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import TINY
from reasonrag_jax.config import SamplerConfig, bucket
from reasonrag_jax.models.decoder import Decoder, DecoderConfig
from reasonrag_jax import sampling
from reasonrag_jax.sampling import Sampler, SamplingParams, call_length, row_keys, seed_words


class CharTokenizer:
    """Printable ASCII, one char per id (0..94); id 95 is EOS, id 96 an unused piece."""
    PIECES = [chr(c) for c in range(32, 127)] + ["<eos>", "~~"]

    def __init__(self, eos_token_id: int = 95):
        self.eos_token_id, self.pad_token_id = eos_token_id, None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) - 32 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join("" if (i == self.eos_token_id and skip_special_tokens) else self.PIECES[i]
                       for i in ids)


class PairTokenizer(CharTokenizer):
    """Every token decodes to two letters, so stop strings can end inside a token; no EOS."""
    PIECES = [chr(65 + i % 26) + chr(97 + i // 26) for i in range(97)]

    def __init__(self):
        super().__init__(eos_token_id=-1)


PROMPTS = ["Hello there, model", "Why?", "The quick brown fox jumps"]
CONFIG = SamplerConfig(cache_size=256, batch_buckets=(1, 2, 4, 8), max_batch=8,
                       prefill_buckets=(32, 64), page_size=4, prefix_cache_mb=1, decode_chunk=8)


@pytest.fixture(scope="module")
def model(tiny_llama_cfg):
    return Decoder(tiny_llama_cfg, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def sampler(model):
    return Sampler(model, CharTokenizer(), CONFIG)


WIDTH = 64


def full_logits(model, ids: list[int]) -> jax.Array:
    """[len(ids), V] logits of one uncached forward pass (right-padded to WIDTH: one compile)."""
    graphdef, state = nnx.split(model)
    tokens = jnp.zeros((1, WIDTH), jnp.int32).at[0, :len(ids)].set(jnp.asarray(ids))
    return _forward(graphdef, state, tokens)[0, :len(ids)]


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens, jnp.arange(tokens.shape[1])[None])[0]


def uncached_loop(model, prompt: list[int], steps: int, pick) -> tuple[list[int], list[float]]:
    """Reference decoding: a full forward pass over the whole sequence for every token."""
    ids, logps = list(prompt), []
    for t in range(steps):
        last = full_logits(model, ids)[-1]
        tok = int(pick(last, t))
        logps.append(float(jax.nn.log_softmax(last)[tok]))
        ids.append(tok)
    return ids[len(prompt):], logps


def encode(text):
    return CharTokenizer()(text)["input_ids"]


def test_greedy_equals_uncached_argmax_loop(model, sampler):
    out = sampler.generate(PROMPTS, SamplingParams(max_new_tokens=20), seeds=[0, 1, 2])
    for prompt, (c,) in zip(PROMPTS, out):
        ids, logps = uncached_loop(model, encode(prompt), 20, lambda logits, t: jnp.argmax(logits))
        expected = [i for i in ids[:ids.index(95) + 1]] if 95 in ids else ids
        assert c.token_ids == expected
        assert c.finish_reason == ("eos" if 95 in ids else "length")
        np.testing.assert_allclose(c.logprobs, logps[:len(expected)], atol=1e-4)
        assert c.text == CharTokenizer().decode(expected)


def test_samples_equal_an_uncached_loop_with_the_same_keys(model, sampler):
    """n samples share one prefill, yet sample j of a prompt is exactly the uncached sampling
    loop driven by key(seed, j) folded with the token index (logprobs at temperature 1)."""
    temp, seed, n = 0.9, 7, 3
    (samples,) = sampler.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12,
                                                               temperature=temp), [seed], n=n)
    keys = row_keys(seed_words([seed] * n, range(n)))
    assert len({tuple(c.token_ids) for c in samples}) == n     # different streams per sample
    for j, c in enumerate(samples):
        def pick(logits, t, key=keys[j]):
            return jax.random.categorical(jax.random.fold_in(key, t), logits / temp)

        ids, logps = uncached_loop(model, encode(PROMPTS[0]), len(c.token_ids), pick)
        assert c.token_ids == ids
        np.testing.assert_allclose(c.logprobs, logps, atol=1e-4)
        assert c.finish_reason == ("eos" if ids[-1] == 95 else "length")


def test_rows_do_not_depend_on_batch_composition(sampler):
    params = SamplingParams(max_new_tokens=16, temperature=1.3, top_p=0.9, top_k=20)
    together = sampler.generate(PROMPTS, params, seeds=[11, 2**62 + 5, 13], n=2)
    alone = sampler.generate([PROMPTS[1]], params, seeds=[2**62 + 5], n=2)
    assert [c.token_ids for c in together[1]] == [c.token_ids for c in alone[0]]
    assert together[1][0].token_ids != together[1][1].token_ids
    other_seed = sampler.generate([PROMPTS[1]], params, seeds=[5], n=1)
    assert other_seed[0][0].token_ids != alone[0][0].token_ids


def test_decode_chunk_changes_no_bits(model, sampler):
    """How many tokens a decode call makes before the host matches stops and refills rows
    changes when a row's slot is reused, never its tokens or log-probs: 9 rows on 8 slots, rows
    stopping at different tokens, one token per call against the configured 8."""
    params = SamplingParams(max_new_tokens=14, temperature=1.1, stop=("e", "Q"))
    every_token = Sampler(model, CharTokenizer(), dataclasses.replace(CONFIG, decode_chunk=1))
    want = sampler.generate(PROMPTS, params, seeds=[21, 22, 23], n=3)
    got = every_token.generate(PROMPTS, params, seeds=[21, 22, 23], n=3)
    assert [[(c.token_ids, c.logprobs) for c in row] for row in got] == [
        [(c.token_ids, c.logprobs) for c in row] for row in want]
    lengths = {len(c.token_ids) for row in want for c in row}
    assert len(lengths) > 2 and max(lengths) > CONFIG.decode_chunk      # slots refill mid-call


def test_lookup_drafts_copy_what_followed_the_latest_longest_match():
    """Hand-computed: the longest match of the row's last (up to 3) tokens wins, then the latest;
    nothing past the row's position is matched or copied (7s and 4s there are stale)."""
    fill = -1
    context = jnp.asarray([
        [1, 2, 3, 4, 2, 3, 9, 2, 3, 7, 7, 7],     # tail (9, 2, 3): j=2 and j=5 match 2 → j=5
        [7, 1, 2, 3, 8, 4, 2, 3, 5, 1, 2, 3],     # tail (1, 2, 3): j=3 matches 3, j=7 only 2
        [1, 2, 3, 4, 4, 4, 4, 4, 4, 4, 4, 4],     # tail 4: never before position 3
        [1, 2, 1, 2, 1, 7, 7, 7, 7, 7, 7, 7],     # tail 1 at position 2: j=0 only
    ], jnp.int32)
    pos = jnp.asarray([8, 11, 3, 2], jnp.int32)
    got = sampling.lookup_drafts(context, pos, 4, fill)
    assert got.tolist() == [[9, 2, 3, fill], [8, 4, 2, 3], [fill] * 4, [2, 1, fill, fill]]


def test_drafted_steps_emit_the_tokens_of_one_token_steps(model):
    """Verifying prompt-lookup drafts changes how many steps a row takes, never its tokens or
    log-probs (greedy and sampled, n samples, rows stopping at different lengths), and the
    drafts are used: fewer steps than tokens."""
    prompts = ["abcabcabcabcabcabcab", PROMPTS[0], "xyxyxyxyxyxyxyx"]
    one = Sampler(model, CharTokenizer(), dataclasses.replace(CONFIG, draft_tokens=0,
                                                             draft_tokens_sampled=0))
    drafted = Sampler(model, CharTokenizer(), dataclasses.replace(CONFIG, draft_tokens=3,
                                                                 draft_tokens_sampled=3))
    for params in (SamplingParams(max_new_tokens=40),
                   SamplingParams(max_new_tokens=40, temperature=0.5, top_k=2, stop=("Q",))):
        one.stats.reset()
        drafted.stats.reset()
        want = one.generate(prompts, params, seeds=[1, 2, 3], n=2)
        got = drafted.generate(prompts, params, seeds=[1, 2, 3], n=2)
        for w_row, g_row in zip(want, got):
            for w, g in zip(w_row, g_row):
                assert (g.token_ids, g.finish_reason) == (w.token_ids, w.finish_reason)
                np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)
        assert one.stats.decode_steps == one.stats.decode_tokens
        assert drafted.stats.decode_steps < 0.8 * drafted.stats.decode_tokens


def test_top_k_one_is_greedy(sampler):
    greedy = sampler.generate(PROMPTS, SamplingParams(max_new_tokens=10), [0, 1, 2])
    top1 = sampler.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=2.0, top_k=1),
                            [3, 4, 5])
    tiny_p = sampler.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=2.0,
                                                      top_p=1e-6), [6, 7, 8])
    for g, a, b in zip(greedy, top1, tiny_p):
        assert g[0].token_ids == a[0].token_ids == b[0].token_ids


def first_stop(text, stops):
    """(end, stop) of the stop string whose first occurrence ends first."""
    return min((text.index(x) + len(x), x) for x in stops if x in text)


def test_stop_strings_end_the_text_right_after_the_first_stop(sampler):
    params = SamplingParams(max_new_tokens=30, temperature=1.0, ignore_eos=True)
    (full,), = sampler.generate([PROMPTS[2]], params, [9])
    text = full.text
    stops = (text[15:18], text[4:6], "never-there")         # the first to occur is listed 2nd
    end, stop = first_stop(text, stops)
    assert end <= 6
    (c,), = sampler.generate([PROMPTS[2]], SamplingParams(
        max_new_tokens=30, temperature=1.0, ignore_eos=True, stop=stops), [9])
    assert (c.text, c.finish_reason, c.stop_string) == (text[:end], "stop", stop)
    k = len(c.token_ids)
    assert c.token_ids == full.token_ids[:k] and c.logprobs == full.logprobs[:k]
    assert len(CharTokenizer().decode(c.token_ids[:-1])) < end <= len(c.text)


def test_stop_string_ending_inside_a_token(model):
    """Text ends right after the stop string even when that is mid-token; the token that
    completes it is the last one returned."""
    s = Sampler(model, PairTokenizer(), CONFIG)
    params = SamplingParams(max_new_tokens=24, temperature=1.0, ignore_eos=True)
    (full,), = s.generate_ids([[5, 9, 13, 2]], params, [4])
    text = full.text
    end, stop = first_stop(text, (text[8:11],))
    assert end % 2 == 1                                      # inside token end // 2
    (c,), = s.generate_ids([[5, 9, 13, 2]], SamplingParams(
        max_new_tokens=24, temperature=1.0, ignore_eos=True, stop=(stop,)), [4])
    assert (c.text, c.finish_reason, c.stop_string) == (text[:end], "stop", stop)
    assert c.token_ids == full.token_ids[:end // 2 + 1]


def test_eos_ends_a_row(model, sampler):
    """With the EOS id set to the 4th greedy token, the row stops there with reason 'eos'."""
    (full,), = sampler.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8), [0])
    eos = full.token_ids[3]
    ids = full.token_ids[:full.token_ids.index(eos) + 1]
    s = Sampler(model, CharTokenizer(eos_token_id=eos), CONFIG)
    (c,), = s.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8), [0])
    assert (c.token_ids, c.finish_reason, c.stop_string) == (ids, "eos", None)
    assert c.text == CharTokenizer().decode(ids[:-1])
    (c,), = s.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8, ignore_eos=True), [0])
    assert (c.token_ids, c.finish_reason) == (full.token_ids, "length")


def test_score_is_the_summed_continuation_logprob(model, sampler):
    conts = [["!", "abc d"], ["yes", "no", "maybe not"]]
    got = sampler.score(PROMPTS[:2], conts)
    for i, prompt in enumerate(PROMPTS[:2]):
        for j, cont in enumerate(conts[i]):
            ids = encode(prompt + cont)
            logp = jax.nn.log_softmax(full_logits(model, ids))
            p = len(encode(prompt))
            expected = sum(float(logp[t - 1, ids[t]]) for t in range(p, len(ids)))
            np.testing.assert_allclose(got[i][j], expected, rtol=1e-5, atol=1e-4)
    assert got.shape == (2, 3) and got[0, 2] == -np.inf     # ragged rows padded with -inf


def test_every_call_drops_its_prefill_caches_and_returns_the_memory(sampler, monkeypatch):
    """A call's scratch caches (GBs at 16 rows) are freed and handed back when it ends, so a
    long eval or search does not pile one call's freed memory under the next call's peak."""
    returned = []
    monkeypatch.setattr(sampling, "return_freed_memory", lambda: returned.append(
        len(sampler._scratch)))
    sampler.generate(PROMPTS, SamplingParams(max_new_tokens=4), seeds=[0, 1, 2])
    sampler.score(PROMPTS[:2], [["!"], ["yes", "no"]])
    assert returned == [0, 0]        # once per call, after its caches were dropped


def test_no_recompile_inside_a_bucket_after_update_params_or_in_a_new_sampler(model,
                                                                            tiny_llama_cfg):
    sampling._programs.cache_clear()                   # earlier tests traced this layout too
    s = Sampler(model, CharTokenizer(), CONFIG)
    params = SamplingParams(max_new_tokens=8, temperature=0.7)
    s.generate(PROMPTS[:3], params, [0, 1, 2])
    assert s.compilations == 3                         # one prefill, admit and decode program each
    s.generate(PROMPTS[:3], SamplingParams(max_new_tokens=8), [0, 1, 2])
    compiled = s.compilations
    assert compiled == 4                               # greedy calls draft: their own decode
    s.generate(["a longer prompt, same bucket", "x", "y", "z"], params, [3, 4, 5, 6])
    s.generate(["b", "c", "d"], SamplingParams(max_new_tokens=5, temperature=0.0, top_p=0.5,
                                               top_k=3, stop=("q",)), [1, 2, 3])
    _, state = nnx.split(Decoder(tiny_llama_cfg, rngs=nnx.Rngs(4)))
    s.update_params(state)
    after = s.generate(PROMPTS[:3], params, [0, 1, 2])
    assert s.compilations == compiled
    fresh = Sampler(Decoder(tiny_llama_cfg, rngs=nnx.Rngs(4)), CharTokenizer(), CONFIG)
    traced = fresh.compilations
    assert [c[0].token_ids for c in after] == [
        c[0].token_ids for c in fresh.generate(PROMPTS[:3], params, [0, 1, 2])]
    assert fresh.compilations == traced                # another sampler traces nothing again


def sampler_outputs(mesh=None) -> dict:
    """Greedy and n-sampled completions, scores and shardings of a tiny Qwen2 (q/k/v bias,
    untied head) on `mesh`: what the sharded and multi-process tests compare with one device."""
    cfg = DecoderConfig(**TINY, rope_theta=1e4, tie_word_embeddings=False, qkv_bias=True,
                        model_type="qwen2")
    s = Sampler(Decoder(cfg, rngs=nnx.Rngs(5)), CharTokenizer(), CONFIG, mesh=mesh)
    greedy = s.generate(PROMPTS, SamplingParams(max_new_tokens=20), [0, 1, 2])
    sampled = s.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.95),
                         [4, 5, 6], n=3)
    rows = [c for group in greedy + sampled for c in group]
    return {"tokens": [c.token_ids for c in rows], "logprobs": [c.logprobs for c in rows],
            "score": s.score(PROMPTS, [["ab", "xyz"]] * 3).tolist(),
            "specs": {"wq": list(s.params["layers"][0]["wq"].sharding.spec),
                      "lm_head": list(s.params["lm_head"].sharding.spec),
                      "k": list(s.cache_sharding.k[0].spec), "v": list(s.cache_sharding.v[0].spec)}}


def assert_same_outputs(got: dict, want: dict) -> None:
    assert got["tokens"] == want["tokens"]
    for a, b in zip(got["logprobs"], want["logprobs"]):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(got["score"], want["score"], atol=1e-4)


SHARDED = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from test_sampling import sampler_outputs
    from reasonrag_jax.config import MeshConfig
    from reasonrag_jax.sharding import make_mesh
    mesh = make_mesh(MeshConfig(shape={"data": 2, "fsdp": 2, "tensor": 2}))
    print("RESULT" + json.dumps(sampler_outputs(mesh)))
""")


def test_sharded_sampler_equals_one_device():
    """On a 2×2×2 mesh of 8 CPU devices: weights sharded by their logical names, the cache by
    rows and KV heads, rows padded to the 4 batch shards — and the same tokens as one device."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", SHARDED, str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.loads(proc.stdout.split("RESULT", 1)[1])
    # the 97-token vocabulary does not split 2 ways: that axis of the head stays replicated
    assert sharded["specs"] == {"wq": ["fsdp", "tensor", None], "lm_head": ["fsdp", None],
                                "k": [["data", "fsdp"], "tensor", None, None],
                                "v": [["data", "fsdp"], "tensor", None, None]}
    assert_same_outputs(sharded, sampler_outputs())


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers_generate(smollm2, smollm2_torch):
    import torch

    model, tokenizer = smollm2
    questions = ["What is the capital of France?", "Name three primary colors."]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in questions]
    out = Sampler(model, tokenizer, SamplerConfig()).generate(
        prompts, SamplingParams(max_new_tokens=32), [0, 1])
    for prompt, (c,) in zip(prompts, out):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            ref = smollm2_torch.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                         pad_token_id=tokenizer.eos_token_id)
        expected = ref[0, len(ids):].tolist()
        assert c.token_ids == expected
        assert c.finish_reason == ("eos" if expected[-1] == tokenizer.eos_token_id else "length")
        assert c.text == tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.slow
def test_smollm2_rows_are_the_same_bits_alone_batched_chunked_and_cached(smollm2):
    """SmolLM2, whose shapes once moved log-probs by ~1e-5 between these paths on XLA:CPU: 12
    prompts of 40..359 tokens (one prefill call together; alone, the long ones take two
    calls), computed, read from the prefix cache with one token a row computed, or started
    from a stored last hidden state with nothing computed, give the same tokens and log-probs
    to the bit."""
    model, tokenizer = smollm2
    config = SamplerConfig(cache_size=512, max_batch=16, prefix_cache_mb=256)
    plain = Sampler(model, tokenizer, dataclasses.replace(config, prefix_cache_mb=0))
    cached = Sampler(model, tokenizer, config)
    prompts = [[100 + (i * 7 + j * 3) % 5000 for j in range(40 + 29 * i)] for i in range(12)]
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)

    def run(s, rows):
        return [(c.token_ids, c.logprobs) for (c,) in
                s.generate_ids([prompts[i] for i in rows], params, list(rows))]

    together = run(plain, range(12))
    assert [run(plain, [i])[0] for i in range(12)] == together
    assert run(cached, range(12)) == together
    computed = cached.stats.computed_tokens
    assert run(cached, range(12)) == together
    assert cached.stats.computed_tokens == computed
    cached.index.ends.clear()
    assert run(cached, range(12)) == together
    assert cached.stats.computed_tokens - computed == 12


def test_smollm2_sampled_rows_alone_on_fewer_rows_are_the_bits_of_a_full_batch(smollm2):
    """A sampled row decoded alone runs on the fewest rows the probe kept and attends alone (8
    rows, 1 attending, of 16 on a Zen 4) and gets the tokens and log-probs it gets among 12
    rows, to the bit."""
    model, tokenizer = smollm2
    s = Sampler(model, tokenizer, SamplerConfig(cache_size=512, max_batch=16, prefix_cache_mb=0,
                                                decode_widths=(8,), decode_attention_rows=(1,)))
    assert s._widths(0)[0][1] == 1, "attending on one row of a decode call lost its bits"
    prompts = [[100 + (i * 11 + j * 5) % 5000 for j in range(30 + 17 * i)] for i in range(12)]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, ignore_eos=True)

    def run(rows):
        return [(c.token_ids, c.logprobs) for (c,) in
                s.generate_ids([prompts[i] for i in rows], params, list(rows))]

    together = run(range(12))
    assert [run([i])[0] for i in (0, 5, 11)] == [together[i] for i in (0, 5, 11)]


def test_prefill_groups_keep_padding_rows_under_a_quarter(sampler):
    """Five equal prompts: one call of 8 rows would be 3/8 padding rows, so they go as 4 + 1;
    seven fit one call of 8 (1/8 padding)."""
    def sizes(n):
        tokens = [[1 + i] * 40 for i in range(n)]
        groups = list(sampler._groups(tokens, [39] * n, [1] * n))
        sampler.index.release([p for g in groups for pages in g.pages for p in pages])
        return [len(g.rows) for g in groups]

    assert sizes(5) == [4, 1]
    assert sizes(7) == [7]


def test_prefill_groups_split_where_that_computes_fewer_slots():
    """A grounding prompt's 192 new tokens and seven reasoning prompts' few do not share a call
    (8 × 192 slots, 80 % padding: MCTS's prefill was 42 % padding so): one call of 192, then
    4 × 32 and 4 × 16 slots. Equal rows stay together unless padding rows cost more than
    `CALL_SLOTS`, and rows with nothing to compute cost nothing."""
    buckets = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)

    def plan(left):
        return sampling.plan_groups(left, 16, lambda n: bucket(n, (1, 2, 4, 8, 16)),
                                    lambda n: bucket(min(n, 2048), buckets), 2048)

    assert plan([192, 30, 25, 20, 18, 15, 12, 10]) == [1, 4, 3]
    assert plan([40] * 7) == [7] and plan([40] * 5) == [4, 1]
    assert plan([300] * 3 + [0] * 4) == [2, 1, 4]
    assert plan([8] * 20) == [16, 4]


def test_waiting_prompts_are_admitted_longest_first(model):
    """Two slots, four prompts: the two longest are prefilled first, together, and every row
    still gets its own completion."""
    sampler = Sampler(model, CharTokenizer(), dataclasses.replace(CONFIG, max_batch=2))
    lengths, prefill = [], sampler._prefill

    def recording(group, size):
        lengths.append(sorted(map(len, group.tokens)))
        return prefill(group, size)

    sampler._prefill = recording
    prompts = ["ab", "a much longer prompt here", "mid length", "the longest prompt of them all"]
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    out = sampler.generate(prompts, params, [0] * 4)
    assert lengths[0] == [25, 30]
    alone = [sampler.generate([p], params, [0])[0][0] for p in prompts]
    assert [c.token_ids for (c,) in out] == [c.token_ids for c in alone]


def test_a_long_remainder_goes_in_a_second_call_rather_than_as_padding(model):
    """Buckets (16, 32, 64, 128, 256, 384): 300 tokens take 256 + 48 slots, not 384 (checked on
    the sampler's padding counter, two 300-token prompts); 20 tokens stay one call of 32, since
    16 + 16 saves nothing."""
    buckets = (16, 32, 48, 64, 128, 256, 384)
    assert [call_length(n, buckets) for n in (300, 44, 20, 16, 130, 1000)] == [
        256, 48, 32, 16, 128, 1152]            # 1000: 384 + 768 slots save nothing over 1152
    s = Sampler(model, CharTokenizer(), dataclasses.replace(
        CONFIG, cache_size=512, prefill_buckets=buckets, prefix_cache_mb=0))
    s.generate_ids([[1 + i % 90] * 300 for i in range(2)], SamplingParams(max_new_tokens=1),
                   [0, 1])
    assert (s.stats.computed_tokens, s.stats.padded_tokens) == (600, 2 * 4)


def test_few_live_rows_decode_on_fewer_rows_moved_to_the_front(model, monkeypatch):
    """Rows stopping at different tokens leave few live: with `decode_widths` those decode on
    4 of the 8 slots, 1, 2 or 4 of them attending, moved to the front first, and get the tokens
    of full-width calls (the widths are forced here, not probed, so log-probs may differ in the
    last bits)."""
    params = SamplingParams(max_new_tokens=30, temperature=1.1, stop=("e", "Q"))
    config = dataclasses.replace(CONFIG, decode_chunk=2)
    want = Sampler(model, CharTokenizer(), config).generate(PROMPTS, params, [21, 22, 23], n=4)
    narrow = Sampler(model, CharTokenizer(), dataclasses.replace(config, decode_widths=(2, 4)))
    widths = ((4, 1), (4, 2), (4, 4), (8, 8))
    monkeypatch.setattr(narrow, "_widths", lambda draft: widths)
    rows, moves, decode, move = [], [], narrow.programs.decode, narrow._move
    monkeypatch.setattr(narrow.programs, "decode", lambda chunk, draft, *args: (
        rows.append(args[:2]), decode(chunk, draft, *args))[1])
    monkeypatch.setattr(narrow, "_move", lambda state, src, dst, width: (
        moves.append((src, dst)), move(state, src, dst, width))[1])
    got = narrow.generate(PROMPTS, params, [21, 22, 23], n=4)
    assert [[c.token_ids for c in row] for row in got] == [[c.token_ids for c in row]
                                                            for row in want]
    for row, want_row in zip(got, want):
        for c, w in zip(row, want_row):
            np.testing.assert_allclose(c.logprobs, w.logprobs, atol=1e-5)
    assert set(rows) == set(widths) and moves


def test_a_decode_width_is_kept_only_where_its_rows_are_the_full_widths_bits(model,
                                                                            monkeypatch):
    """`_widths` keeps a narrower width only where one probe call gives its rows exactly the
    tokens, log-probs and logits of a full-width call; one ulp off drops it. Fewer attending
    rows run on the fewest kept rows that hold them, and are kept on the same rule. Widths at
    or past `max_batch` are not narrower; a width below 1 is an error."""
    base = [np.arange(8 * 5, dtype=np.float32).reshape(8, 5)] * 3
    off: set[tuple[int, int]] = set()

    def probe(draft, rows, attention):
        out = [x[:attention].copy() for x in base]
        if (rows, attention) in off:
            out[1][1, 3] = np.nextafter(out[1][1, 3], np.float32(np.inf))
        return tuple(out)

    s = Sampler(model, CharTokenizer(), dataclasses.replace(
        CONFIG, decode_widths=(2, 4, 8, 16), decode_attention_rows=(1, 2)))
    monkeypatch.setattr(s, "_probe", probe)
    for wrong, kept in ((set(), ((2, 1), (2, 2), (4, 4), (8, 8))),
                        ({(2, 2)}, ((4, 1), (4, 2), (4, 4), (8, 8))),
                        ({(2, 2), (4, 2)}, ((4, 1), (4, 4), (8, 8))),
                        ({(2, 2), (4, 4)}, ((8, 1), (8, 2), (8, 8)))):
        off.clear()
        off.update(wrong)
        monkeypatch.setattr(s.programs, "widths", {})
        assert s._widths(0) == kept
    with pytest.raises(ValueError, match=r"sampler.decode_widths .* not \[0, 4\]"):
        Sampler(model, CharTokenizer(), dataclasses.replace(CONFIG, decode_widths=(0, 4)))
    with pytest.raises(ValueError, match=r"sampler.decode_attention_rows .* not \[0\]"):
        Sampler(model, CharTokenizer(), dataclasses.replace(CONFIG, decode_attention_rows=(0,)))
