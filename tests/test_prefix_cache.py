"""Prefix cache: the page table, the page pool, and the sampler's outputs with and without it.

Cached prompt KV must be the same bits as recomputed KV, so every output below is compared for
exact equality, not closeness.
"""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reasonrag_jax.config import SamplerConfig
from reasonrag_jax.models.decoder import Decoder, KVCache
from reasonrag_jax.prefix_cache import PagePool, PrefixIndex
from reasonrag_jax.sampling import Sampler, SamplingParams
from test_sampling import CharTokenizer

P = 4
CONFIG = SamplerConfig(cache_size=256, batch_buckets=(1, 2, 4, 8), max_batch=8,
                       prefill_buckets=(32, 64), page_size=P, prefix_cache_mb=1,
                       decode_chunk=4)
SYSTEM = "You answer questions. Be brief and exact, always. "
PROMPTS = [SYSTEM + "Who wrote it?", SYSTEM + "Where is it?", SYSTEM + "Who wrote it? Why",
           "Unrelated prompt with no shared start"]


def test_rows_sharing_a_prefix_share_its_pages_and_diverge_after_it():
    index = PrefixIndex(num_pages=16, page_size=P)
    a = list(range(100, 112))                       # 3 full pages
    b = a[:8] + [7, 7, 7, 7, 9]                     # shares 2 pages, then diverges
    assert index.match(a) == ([], 0)
    (stored_a,) = index.allocate([(a, 0)])
    assert [i for i, _ in stored_a] == [0, 1, 2]
    found, cached = index.match(b)
    index.release(found)
    assert found == [page for _, page in stored_a[:2]] and cached == 8   # page table row b: p0 p1 …
    (stored_b,) = index.allocate([(b, 2)])
    assert [i for i, _ in stored_b] == [2, 3]                   # … a page of its own and a tail
    assert not {page for _, page in stored_b} & {page for _, page in stored_a}
    table = {tuple(r): index.match(r)[0] for r in (a, b)}
    assert table[tuple(a)][:2] == table[tuple(b)][:2] and table[tuple(a)][2] != table[tuple(b)][2]
    # A page's key is its whole prefix: the same tokens after another prefix are another page.
    assert index.match(b[4:8] + b[:4]) == ([], 0)


def test_a_partial_last_page_serves_prompts_that_extend_it():
    index = PrefixIndex(num_pages=16, page_size=P)
    prompt = list(range(10))                        # 2 full pages + a tail of 2 tokens
    (stored,) = index.allocate([(prompt, 0)])
    assert [i for i, _ in stored] == [0, 1, 2]
    tail = stored[2][1]
    # prompt + scaffold: the two full pages, then the tail (2 of the third page's 4 tokens).
    assert index.match(prompt + [50, 51, 52]) == ([p for _, p in stored], 10)
    assert index.match(prompt) == ([p for _, p in stored], 10)
    # Shorter than the tail, or another tail: the full pages only.
    assert index.match(prompt[:9]) == ([p for _, p in stored[:2]], 8)
    assert index.match(prompt[:9] + [77]) == ([p for _, p in stored[:2]], 8)
    # The scored row stores its third page in full (the tail stays a page of its own).
    (row,) = index.allocate([(prompt + [50, 51, 52], 2)])
    assert [i for i, _ in row] == [2, 3] and tail not in {p for _, p in row}
    found, cached = index.match(prompt + [50, 51, 52, 60])
    assert cached == 13 and found == [p for _, p in stored[:2]] + [p for _, p in row]


def test_least_recently_used_pages_go_first_and_held_pages_never():
    index = PrefixIndex(num_pages=3, page_size=P)
    a = [1] * 8
    index.allocate([(a, 0)])                             # a0 a1
    index.allocate([([2] * 4, 0)])                       # b0: the pool is full
    index.release(index.match(a)[0])                     # use a: LRU order is now b0 a1 a0
    (stored,) = index.allocate([([3] * 4, 0)])           # c0 evicts b0, the least recent
    assert len(stored) == 1 and index.match([2] * 4) == ([], 0)
    held, _ = index.match(a)                             # order c0 a1 a0, a's pages held
    index.allocate([([4] * 4, 0)])                       # d0 evicts c0
    (stored,) = index.allocate([([5] * 4, 0)])           # e0: only d0 is not held
    assert len(stored) == 1 and index.match([4] * 4) == ([], 0)
    assert not index.allocate([([6] * 8, 0)])[0][1:]     # one call never evicts its own page
    index.release(held)
    index.release(index.match(a)[0])
    # Deepest first on use: a1 was touched before a0, so a1 goes first and a keeps its start.
    index.allocate([([7] * 4, 0)])
    index.allocate([([8] * 4, 0)])
    assert index.match(a)[1] == 4


def test_pages_round_trip_between_pool_and_cache(tiny_llama_cfg):
    cfg = tiny_llama_cfg
    rng = np.random.default_rng(0)
    cache = KVCache(k=tuple(jnp.asarray(rng.standard_normal((2, cfg.num_kv_heads, cfg.head_dim, 16)),
                                        jnp.float32) for _ in range(cfg.num_layers)),
                    v=tuple(jnp.asarray(rng.standard_normal((2, cfg.num_kv_heads, 16, cfg.head_dim)),
                                        jnp.float32) for _ in range(cfg.num_layers)))
    pool = PagePool.init(cfg, num_pages=5, page_size=P)
    # Row 1's slots 4..11 into pages 3 and 0 (page id 5 is padding: dropped).
    pool = pool.store(cache, jnp.array([1, 1, 0]), jnp.array([4, 8, 0]), jnp.array([3, 0, 5]))
    out = pool.load(KVCache.init(cfg, 1, 16), jnp.array([[3, 0]]))
    for got, want in zip(out.k, cache.k):
        np.testing.assert_array_equal(got[0, :, :, :8], want[1, :, :, 4:12])
    for got, want in zip(out.v, cache.v):
        np.testing.assert_array_equal(got[0, :, :8], want[1, :, 4:12])


@pytest.fixture(scope="module")
def model(tiny_llama_cfg):
    return Decoder(tiny_llama_cfg, rngs=nnx.Rngs(7))


def outputs(sampler, prompts, seeds, params, n=1):
    rows = sampler.generate(prompts, params, seeds, n)
    return [[(c.token_ids, c.logprobs) for c in row] for row in rows]


GREEDY = SamplingParams(max_new_tokens=10)
SAMPLED = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_cached_and_uncached_give_the_same_bits(model, params):
    plain = Sampler(model, CharTokenizer(), dataclasses.replace(CONFIG, prefix_cache_mb=0))
    cached = Sampler(model, CharTokenizer(), CONFIG)
    seeds = [11, 12, 13, 14]
    want = outputs(plain, PROMPTS, seeds, params, n=2)
    assert outputs(cached, PROMPTS, seeds, params, n=2) == want        # cold cache
    assert outputs(cached, PROMPTS, seeds, params, n=2) == want        # warm cache
    assert cached.stats.cached_tokens > 0
    alone = outputs(cached, PROMPTS[2:3], seeds[2:3], params, n=2)      # a row alone
    assert alone == want[2:3]
    # The same full pages and a tail of the same length as a stored prompt's, other tokens.
    cut = len(PROMPTS[0]) // P * P
    assert len(PROMPTS[0]) - cut > 1
    twin = [PROMPTS[0][:cut] + "#" + PROMPTS[0][cut + 1:]]
    assert outputs(cached, twin, seeds[:1], params, n=2) == \
        outputs(plain, twin, seeds[:1], params, n=2)
    assert cached.stats.hit_rate > 0.5
    scores = [["Paris", "the answer"], ["x"], ["Who wrote", "Be"], ["shared"]]
    np.testing.assert_array_equal(cached.score(PROMPTS, scores), plain.score(PROMPTS, scores))
    # A guided step: the generation after a scored continuation computes nothing (the score
    # stored its pages and its last hidden state) and gives what an uncached run gives.
    after = [p + conts[0] for p, conts in zip(PROMPTS, scores)]
    before = cached.stats.computed_tokens
    assert outputs(cached, after, seeds, params, n=2) == outputs(plain, after, seeds, params, n=2)
    assert cached.stats.computed_tokens == before
    # Without the stored ends, each computes its last token, to the same bits.
    cached.index.ends.clear()
    assert outputs(cached, after, seeds, params, n=2) == outputs(plain, after, seeds, params, n=2)
    assert cached.stats.computed_tokens - before == len(after)


def test_eviction_under_a_tiny_budget_changes_nothing(model):
    page = 2 * 2 * 2 * 16 * P * 4                  # layers × K/V × KV heads × head_dim × P × f32
    tiny = Sampler(model, CharTokenizer(), CONFIG)
    tiny.index = PrefixIndex(num_pages=3, page_size=P)           # 3 pages: constant eviction
    assert page * 3 < 2**20
    plain = Sampler(model, CharTokenizer(), dataclasses.replace(CONFIG, prefix_cache_mb=0))
    seeds = [1, 2, 3, 4]
    want = outputs(plain, PROMPTS, seeds, SAMPLED)
    for _ in range(2):
        assert outputs(tiny, PROMPTS, seeds, SAMPLED) == want
    assert len(tiny.index.pages) == 3 and not tiny.index.refs


def test_more_requests_than_slots_refill_finished_slots(model):
    """12 requests on 8 decode slots with budgets that end rows at different times: every
    request still equals its run alone."""
    s = Sampler(model, CharTokenizer(), CONFIG)
    prompts = [f"{SYSTEM} question number {i}" for i in range(6)]
    together = outputs(s, prompts, list(range(6)), SAMPLED, n=2)
    for i in (0, 5):
        assert outputs(s, prompts[i:i + 1], [i], SAMPLED, n=2) == together[i:i + 1]
    assert s.stats.decode_tokens > 0


def test_a_page_size_that_does_not_divide_the_attention_block_is_refused(model):
    """A partial last page is stored as a whole page: it must never run past a cache."""
    with pytest.raises(ValueError, match="page_size 12 must divide 128"):
        Sampler(model, CharTokenizer(), dataclasses.replace(CONFIG, page_size=12))


def test_a_long_cached_prefix_loads_into_a_shorter_call_cache(model):
    """A call's cache is sized to its rows (1,536 slots here), not to `cache_size` (2,048): a
    prompt of 68 cached pages must load into it (the page table once got 128 pages, 2,048
    slots, and the copy failed)."""
    config = dataclasses.replace(CONFIG, cache_size=2048, page_size=16, prefix_cache_mb=8,
                                 prefill_buckets=(64, 256, 1024))
    cached = Sampler(model, CharTokenizer(), config)
    plain = Sampler(model, CharTokenizer(), dataclasses.replace(config, prefix_cache_mb=0))
    prompt = SYSTEM * 22                                # 1,100 tokens: 68 full pages
    cached.generate([prompt], GREEDY, [0])
    longer = [prompt + " and more"]
    assert outputs(cached, longer, [0], GREEDY) == outputs(plain, longer, [0], GREEDY)
    assert cached.stats.cached_tokens >= 1088
