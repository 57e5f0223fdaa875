"""Batched, jit-compiled sampling from the decoder, each prompt prefix computed once.

Evaluation, MCTS expansion and SPRE rollouts all call `Sampler.generate` and `Sampler.score`,
and their prompts share long prefixes: the system prompt of every step, the prompt that a guided
step scores two scaffolds after and then continues, the node prompt that every MCTS child and
SPRE rollout starts from. A call runs in two parts:

- **Prefill from the prefix cache.** Identical prompts are computed once. Each prompt starts
  from its longest cached prefix (`prefix_cache`: full pages, then a partial last page) and
  only the rest is prefilled, rows of similar length together, at most `prefill_tokens` token
  slots per device call, a long remainder in one more call rather than as padding
  (`call_length`); the new pages are stored for later prompts. `score` first prefills the
  prompts, then scores every continuation from the prompt's pages, so a guided choice reads its
  prompt once and the generation after the chosen scaffold starts from the scored row's pages
  and its stored last hidden state, whose logits start the decode: nothing to compute. A row's
  last hidden state is kept beside its pages (`PrefixIndex.ends`) wherever a call computed it,
  so a prompt sampled again (an MCTS node's next rollout) needs no prefill call either.
- **Continuous decoding.** Decoding runs on a fixed set of `max_batch` rows, `decode_chunk`
  steps per device call inside a `lax.while_loop`. A step verifies `draft_tokens` tokens
  (`draft_tokens_sampled` when sampling) drafted from the row's own prompt and output
  (`lookup_drafts`: evidence, queries and answers copy the passages and the question) in the
  same forward pass as the row's next token and keeps the drafts the row would have chosen
  itself, so it emits 1 + the drafts kept, with the tokens one-token steps give. Stop strings
  are matched on the host on the decoded text, exact whatever the tokenisation, so a row
  decodes on until its call ends (a small chunk wastes few steps; the host's work per call is
  small next to one step). A row that stops frees its slot at once and waiting requests,
  longest prompt first, are prefilled into free slots, so short rows never wait for long ones.
  When the queue is empty and few rows are live, they move to the front slots and a call runs
  on only as many rows as `decode_widths` allows, of which only as many attend as
  `decode_attention_rows` allows (on a CPU a step costs what its rows compute, mostly their
  attention: the tail of an MCTS iteration, where one to eight of 16 rows are live, is most of
  its decode calls). `n` samples of a prompt share its prefill (cache rows are gathered).

Shapes are bucketed and params are jit arguments, so new lengths and trained weights rarely
recompile; the weights live in the decoder's serving layout (per-layer arrays, see
`decoder.forward`). The jitted programs belong to the (model config, mesh layout), not to a
sampler (`_Programs`): the demo's stages each load a policy and make a sampler, and every one
after the first re-traces nothing it already ran (tracing and lowering the unrolled 30-layer
programs took about 75 s of a cold 13-minute `make quick`).

Determinism: a row's output depends only on (its prompt, its seed, the sampling parameters) —
never on the other rows, the cache length of the call, or what was cached. On XLA:CPU a matmul
gives a row the same bits for every row count between 64 and 2048 (measured on an AVX-512 Xeon,
where no row count outside it did, and on Zen 5), so every prefill call holds
64..`prefill_tokens` token slots, the logits head that admits rows runs on exactly `max_batch`
rows, every decode step too or on fewer rows, or fewer attending, where this machine gives them
the same bits (probed once, `Sampler._widths`), and attention runs over fixed blocks of the
cache, with no shape-dependent reduction and a floor on its query rows
(`decoder._cached_attention`); prompt KV is then the same bits whichever call computed it.
Before that attention (2026-12-02), SmolLM2's log-probs moved by up to 4e-5 between a prompt
alone, in a batch, prefilled in chunks or from the prefix cache, on every CPU measured (AVX2 Zen
3, Sapphire Rapids, Zen 5; greedy tokens always matched); on the Zen 5 they are now equal to the
bit (`tests/test_sampling.py`); the other two were not re-measured.
Row i, sample j, token t draws with key(seed_i, j) folded with t, whichever step computes
token t, and a row's drafts come from its own tokens only, so drafting keeps every guarantee
above (a drafted step computes its positions in another shape than a one-token step does, so
log-probs can move in the last bits against `draft_tokens: 0` and a near-tie could flip; the
tests' samples and a 32-question eval's steps matched exactly). Reported log-probs are of the
chosen token under the model's unmodified distribution (temperature 1, no top-k/top-p), as DPO
and scoring use it.

On a mesh (several devices, or several processes of a pod) the weights are sharded by their
logical axis names exactly as in training, the KV cache by rows over the batch axes and by KV
heads over the tensor axis, the page pool by KV heads, and rows are padded to a multiple of the
batch shards. What the host reads back is replicated, so every process of a pod takes the same
decisions and runs the same loop: all of them call `generate` with the same prompts.
"""
from __future__ import annotations

import functools
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from reasonrag_jax.config import MeshConfig, SamplerConfig, bucket
from reasonrag_jax.memory import return_freed_memory
from reasonrag_jax.models.decoder import (ATTENTION_BLOCK, Decoder, DecoderConfig, KVCache,
                                          forward, logits, unstack_layers)
from reasonrag_jax.prefix_cache import PagePool, PrefixIndex, page_bytes
from reasonrag_jax.sharding import (batch_spec, batch_ways, fitted_spec, global_array, make_mesh,
                                    state_shardings)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False     # decode past EOS (benchmarks that need a fixed length)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float]        # log p(token) under the model's unmodified distribution
    finish_reason: str           # "stop" | "eos" | "length"
    stop_string: str | None


def seed_words(seeds: Sequence[int], samples: Sequence[int]) -> np.ndarray:
    """[3, rows] uint32: each seed's high and low 32 bits and the sample index — what a row's
    PRNG key is made of (`row_keys`), as host integers that shard with the rows."""
    seeds = np.asarray([int(s) % 2**64 for s in seeds], np.uint64)
    return np.stack([(seeds >> np.uint64(32)).astype(np.uint32),
                     (seeds & np.uint64(0xFFFFFFFF)).astype(np.uint32),
                     np.asarray(samples, np.uint32).reshape(seeds.shape)])


def row_keys(words: jax.Array | np.ndarray) -> jax.Array:
    """One PRNG key per row from (seed, sample index) only — batch composition never matters.

    Seeds are any non-negative integers below 2**64 (the agent derives 63-bit seeds); both
    32-bit halves are folded in, so distinct seeds give distinct streams.
    """
    hi, lo, sample = jnp.asarray(words, jnp.uint32)
    fold = jax.vmap(jax.random.fold_in)
    base = jnp.broadcast_to(jax.random.key(0), hi.shape)
    return fold(fold(fold(base, hi), lo), sample)


def _choose(logits: jax.Array, keys: jax.Array, step: jax.Array, temperature: jax.Array,
            top_p: jax.Array, top_k: jax.Array) -> jax.Array:
    """Next token per row: argmax at temperature 0, else top-k / top-p filtered sampling."""

    def sample(logits):
        scaled = logits / jnp.maximum(temperature, 1e-6)

        def filtered(scaled):
            order = jnp.argsort(-scaled, axis=-1)
            ranked = jnp.take_along_axis(scaled, order, axis=-1)
            probs = jax.nn.softmax(ranked, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs          # mass strictly above each rank
            rank = jnp.arange(scaled.shape[-1])
            keep = (before < top_p) & ((top_k <= 0) | (rank < top_k))
            ranked = jnp.where(keep, ranked, -jnp.inf)
            return jnp.full_like(scaled, -jnp.inf).at[
                jnp.arange(scaled.shape[0])[:, None], order].set(ranked)

        scaled = jax.lax.cond((top_p < 1.0) | (top_k > 0), filtered, lambda s: s, scaled)
        step_keys = jax.vmap(jax.random.fold_in)(keys, step)
        return jax.vmap(jax.random.categorical)(step_keys, scaled)

    greedy = lambda logits: jnp.argmax(logits, axis=-1)  # noqa: E731
    return jax.lax.cond(temperature > 0.0, sample, greedy, logits).astype(jnp.int32)


def _token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """[B, T] log-softmax of `logits` [B, T, V] at `tokens` [B, T], without writing the whole
    log-softmax out (a decode step's largest array)."""
    picked = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def call_length(need: int, buckets: Sequence[int]) -> int:
    """Token slots per row of a prefill call whose longest row has `need` tokens left: the
    smallest bucket holding them, unless the largest bucket below `need` plus a call for the
    rest holds fewer slots (300 tokens: 256 + 48 slots, not 384). A second call costs one more
    read of the weights, far less than computing the padding it saves."""
    whole = bucket(need, buckets)
    below = max((x for x in buckets if x < need), default=whole)
    return below if below + bucket(need - below, buckets) < whole else whole


# Rows × length of a call whose matmuls give each row the same bits (see the module docstring).
MIN_CALL_TOKENS = 64
# Prefill slots that one more device call costs (reading the weights, the call's fixed work):
# `plan_groups` splits rows into more calls only where that saves more padding than this.
CALL_SLOTS = 32


def plan_groups(left: Sequence[int], max_rows: int, rows_of: Callable[[int], int],
                length_of: Callable[[int], int], max_slots: int) -> list[int]:
    """Sizes of the consecutive groups that rows with `left` tokens to compute (longest first)
    prefill in, minimising the slots computed, padding rows and tokens included, plus
    `CALL_SLOTS` a call (fewer calls on a tie). A group holds at most `max_rows` rows and, unless
    it is one row, `max_slots` slots (`rows_of(rows) × length_of(its longest)`). Rows with
    nothing to compute cost no slots. Grouping the first rows that fit, as before, padded MCTS's
    prefill calls by 42 % (e2e bench, 8 questions): a grounding prompt's passages and a
    reasoning prompt's few new tokens shared calls."""
    n = len(left)
    best: list[tuple[float, int]] = [(math.inf, 0)] * n + [(0, 0)]     # rows i.. → (cost, calls)
    size = [0] * n
    for i in range(n - 1, -1, -1):
        length = length_of(left[i]) if left[i] else 0        # row i is its group's longest
        for j in range(min(n, i + max_rows), i, -1):        # the largest first group on a tie
            slots = rows_of(j - i) * length
            if slots > max_slots and j - i > 1:
                continue
            cost = (best[j][0] + (max(slots, MIN_CALL_TOKENS) if slots else 0) + CALL_SLOTS,
                    best[j][1] + 1)
            if cost < best[i]:
                best[i], size[i] = cost, j - i
    sizes, i = [], 0
    while i < n:
        sizes.append(size[i])
        i += size[i]
    return sizes


# Hidden-state positions a prefill call hands back per row (a prompt's last, or a scored
# continuation's): a few widths, a few programs.
WIDTH_BUCKETS = (1, 8, 16, 32, 64)


# Longest suffix of a row's tokens that `lookup_drafts` matches in its earlier tokens.
DRAFT_NGRAM = 3


def lookup_drafts(context: jax.Array, pos: jax.Array, count: int, fill: int) -> jax.Array:
    """[rows, count] tokens that followed the latest earlier occurrence of each row's last
    tokens (`context[:, :pos + 1]`, up to `DRAFT_NGRAM` of them, the longest match first);
    `fill` where nothing matches or the source runs past `pos` (prompt lookup, as vLLM's n-gram
    proposer: a RAG step's evidence, query and answer copy its passages and question). Reads
    only a row's own tokens up to `pos`, so its drafts depend on nothing else."""
    rows, size = context.shape
    if count == 0:
        return jnp.zeros((rows, 0), context.dtype)
    at = jnp.arange(size)[None]
    run = jnp.ones((rows, size), bool)
    length = jnp.zeros((rows, size), jnp.int32)
    for k in range(DRAFT_NGRAM):
        tail = jnp.take_along_axis(context, jnp.maximum(pos - k, 0)[:, None], axis=1)
        run &= (jnp.roll(context, k, axis=1) == tail) & (at >= k) & (pos >= k)[:, None]
        length += run
    length = jnp.where(at < pos[:, None], length, 0)
    best = jnp.argmax(length * size + at, axis=1)           # longest, then latest
    found = jnp.take_along_axis(length, best[:, None], axis=1) > 0
    source = best[:, None] + 1 + jnp.arange(count)[None]
    drafts = jnp.take_along_axis(context, jnp.minimum(source, size - 1), axis=1)
    return jnp.where(found & (source <= pos[:, None]), drafts, fill)


class DecodeState(NamedTuple):
    """What a decode call carries per row (all [rows] unless noted)."""
    cache: KVCache
    logits: jax.Array         # [rows, vocab] next-token logits
    pos: jax.Array            # int32 position the next token is written at
    done: jax.Array           # bool: finished, or an empty slot
    n_done: jax.Array         # int32 tokens generated so far
    context: jax.Array        # int32 [rows, cache] the row's tokens, prompt first: drafts' source


@dataclass
class SamplerStats:
    """Token and time counters since the sampler was made (`reset` starts them again): what
    the benchmarks report and where an episode's compute goes."""
    prompt_tokens: int = 0      # prompt tokens of prefilled rows (scored rows included)
    cached_tokens: int = 0      # of those, read from the prefix cache
    computed_tokens: int = 0    # prompt tokens computed
    padded_tokens: int = 0      # prefill slots that held padding
    decode_tokens: int = 0      # tokens decoded
    decode_steps: int = 0       # row-steps of decode on a live row (a step emits 1 + accepted
                                # drafts)
    decode_idle: int = 0        # row-steps of decode spent on an empty or finished slot
    prefill_s: float = 0.0      # wall time in prefill (and page copies), host to host
    decode_s: float = 0.0
    score_rows: int = 0

    def reset(self) -> None:
        for name, f in self.__dataclass_fields__.items():
            setattr(self, name, f.default)

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / max(self.prompt_tokens, 1)

    @property
    def padding_fraction(self) -> float:
        return self.padded_tokens / max(self.computed_tokens + self.padded_tokens, 1)


@dataclass
class _Group:
    """Rows prefilled together: their tokens, the positions whose hidden states are wanted
    (`first`, `width`), and the cached pages each starts from."""
    rows: list[int]            # indices into the caller's rows
    tokens: list[list[int]]
    first: list[int]
    width: list[int]
    pages: list[list[int]]
    start: list[int]           # first position computed: the cached tokens, or the first
                               # wanted position if the cache holds it too
    ends: list[np.ndarray | None]   # a fully cached row's stored last hidden state: nothing
                                    # of it is computed


class _Shardings(NamedTuple):
    """Where a sampler's arrays live: rows split over the batch shards ([rows], [rows, x],
    [rows, x, y]), replicated values, the KV cache and the page pool."""
    rows: NamedSharding
    rows_2d: NamedSharding
    rows_3d: NamedSharding
    replicated: NamedSharding
    cache: KVCache
    pool: PagePool


class _Programs:
    """A sampler's jitted device programs, for one model config and mesh layout. They hold no
    weights (params are arguments), so samplers of every policy of that architecture share
    them, and with them JAX's trace and compile caches."""

    def __init__(self, model_cfg: DecoderConfig, pad_id: int, shardings: _Shardings,
                 num_pages: int, page_size: int):
        self.model_cfg, self.pad_id = model_cfg, pad_id
        self.compilations = 0   # programs traced
        rows, rows_2d, rows_3d, replicated, cache, pool = shardings
        self.new_pool = jax.jit(functools.partial(PagePool.init, model_cfg, num_pages, page_size),
                                out_shardings=pool)
        self.new_cache = jax.jit(functools.partial(KVCache.init, model_cfg),
                                 static_argnums=(0, 1), out_shardings=cache)
        self.load = jax.jit(lambda pool, cache, pages: pool.load(cache, pages),
                            donate_argnums=(1,), out_shardings=cache)
        self.store = jax.jit(lambda pool, cache, rows, starts, pages:
                             pool.store(cache, rows, starts, pages),
                             donate_argnums=(0,), out_shardings=pool)
        self.extend = jax.jit(self._extend_fn, donate_argnums=(1, 2),
                              out_shardings=(cache, rows_3d))
        self.admit = jax.jit(self._admit_fn, donate_argnums=(1, 2, 3),
                             out_shardings=(cache, rows_2d, rows_2d))
        self.decode = jax.jit(self._decode_fn, static_argnums=(0, 1, 2, 3), donate_argnums=(5,),
                              out_shardings=(DecodeState(cache, rows_2d, rows, replicated,
                                                         replicated, rows_2d),
                                             replicated, replicated, replicated))
        self.move = jax.jit(self._move_fn, donate_argnums=(0, 1, 2),
                            out_shardings=(cache, rows_2d, rows_2d))
        self.logprobs = jax.jit(self._logprobs_fn, out_shardings=replicated)
        self.gather = jax.jit(lambda out, rows, cols: out[rows, cols], out_shardings=replicated)
        self.widths: dict[tuple[Any, ...], tuple[tuple[int, int], ...]] = {}   # `Sampler._widths`

    def _extend_fn(self, params, cache, out, tokens, positions, take, keep):
        """Rows' next tokens at `positions` into `cache`; where `keep`, `out` gets the hidden
        states at call indices `take` [B, W] (the positions whose logits the caller wants)."""
        self.compilations += 1
        hidden, cache = forward(self.model_cfg, params, tokens, positions, cache)
        got = jnp.take_along_axis(hidden, take[:, :, None], axis=1)
        return cache, jnp.where(keep[:, None, None], got, out)

    def _admit_fn(self, params, cache, last, context, new, hidden, slots, parent, prompts):
        """Prefilled rows into decode slots: slot `slots[i]` ← row `parent[i]` of `new`, its
        next-token logits from `hidden` [B, 1, H], its context ← `prompts[i]`. The head runs on
        all slots, a fixed row count (see the module docstring); `slots` past the cache are
        padding and dropped."""
        self.compilations += 1
        cache = jax.tree.map(lambda dst, src: dst.at[slots].set(src[parent], mode="drop"),
                             cache, new)
        context = context.at[slots].set(prompts, mode="drop")
        rows = jnp.zeros((last.shape[0], hidden.shape[-1]), hidden.dtype)
        rows = rows.at[slots].set(hidden[parent, 0], mode="drop")
        fresh = jnp.zeros(last.shape[0], bool).at[slots].set(True, mode="drop")
        head = logits(self.model_cfg, params, rows[:, None])[:, 0]
        return cache, jnp.where(fresh[:, None], head, last), context

    def _move_fn(self, cache, logits, context, src, dst):
        """Decode rows `src[i]` → slots `dst[i]` (cache, logits, context); `dst` past the rows is
        padding and dropped. Rows move only into empty slots, so no source is overwritten."""
        self.compilations += 1
        return jax.tree.map(lambda x: x.at[dst].set(x[src], mode="drop"), (cache, logits, context))

    def _decode_fn(self, chunk, draft, call_rows, attention_rows, params, state: DecodeState,
                   words, knobs):
        """Up to `chunk` steps for each of the first `call_rows` rows (the others are empty and
        left as they are), of which only the first `attention_rows` attend: the rest are empty
        too (see `Sampler._widths`); rows that hit EOS or their budget stop.

        A step chooses the row's next token, drafts `draft` more from its context
        (`lookup_drafts`) and runs all 1 + `draft` positions in one forward pass; a draft is
        kept while it is the token the row would have chosen there (same logits, same key and
        token index), so the tokens are exactly those of one-token steps, and the step emits
        1 + the drafts kept. K/V written for rejected drafts sit past the row's position,
        unseen, until its next tokens overwrite them."""
        self.compilations += 1
        temperature, top_p, top_k, budget, eos = knobs
        full = state
        state = DecodeState(full.cache, *(x[:call_rows] for x in full[1:]))
        keys = row_keys(words[:, :call_rows])
        b, width = state.logits.shape[0], 1 + draft
        offsets = jnp.arange(width)
        rows = jnp.arange(b)[:, None]

        def choose(step_logits, index):
            """[b, w] tokens from [b, w, vocab] logits, drawn at token indices `index`."""
            w = step_logits.shape[1]
            picked = _choose(step_logits.reshape(b * w, -1), keys[jnp.repeat(jnp.arange(b), w)],
                             index.reshape(-1), temperature, top_p, top_k)
            return picked.reshape(b, w)

        def body(carry):
            i, s, tokens, logps, made, live = carry
            first = choose(s.logits[:, None], s.n_done[:, None])[:, 0]
            context = s.context.at[rows[:, 0], s.pos].set(first, mode="drop")
            step = jnp.concatenate(
                [first[:, None], lookup_drafts(context, s.pos, draft, self.pad_id)], axis=1)
            # A finished row or empty slot computes at positions 0..draft: attention reads every
            # row up to the batch's last position, so a dead row's stale one must not set it.
            # Its writes land in its own row, which admission overwrites whole.
            positions = jnp.where(s.done[:, None], offsets, s.pos[:, None] + offsets)
            hidden, cache = forward(self.model_cfg, params, step, positions, s.cache,
                                    decoding=True, attention_rows=attention_rows)
            step_logits = logits(self.model_cfg, params, hidden)           # [b, width, vocab]
            lp = jnp.concatenate([_token_logprobs(s.logits[:, None], step[:, :1]),
                                  _token_logprobs(step_logits[:, :-1], step[:, 1:])], axis=1)
            kept = jnp.zeros(b, jnp.int32)
            if draft:
                kept = jnp.sum(jnp.cumprod(
                    choose(step_logits[:, :-1], s.n_done[:, None] + 1 + offsets[None, :-1])
                    == step[:, 1:], axis=1), axis=1)
                # The drafts follow the row's next token in its context; those not kept sit past
                # its position, never read, until its next tokens overwrite them.
                context = context.at[rows, s.pos[:, None] + offsets[None, 1:]].set(
                    step[:, 1:], mode="drop")
            is_eos = jnp.isin(step, eos)
            first_eos = jnp.argmax(jnp.concatenate([is_eos, jnp.ones((b, 1), bool)], 1), 1)
            kept = jnp.maximum(jnp.minimum(jnp.minimum(kept, first_eos), budget - s.n_done - 1),
                               0)
            emitted = jnp.where(s.done, 0, kept + 1)
            out = offsets[None] < emitted[:, None]
            cols = jnp.where(out, made[:, None] + offsets, tokens.shape[1])      # else dropped
            tokens = tokens.at[rows, cols].set(step, mode="drop")
            logps = logps.at[rows, cols].set(lp, mode="drop")
            n_done = s.n_done + emitted
            done = s.done | jnp.any(is_eos & out, axis=1) | (n_done >= budget)
            next_logits = jnp.take_along_axis(step_logits, kept[:, None, None], axis=1)[:, 0]
            s = DecodeState(cache, next_logits, s.pos + emitted, done, n_done, context)
            return i + 1, s, tokens, logps, made + emitted, live + (emitted > 0)

        zeros = jnp.zeros(b, jnp.int32)
        carry = (0, state, jnp.full((b, chunk * width), self.pad_id, jnp.int32),
                 jnp.zeros((b, chunk * width), jnp.float32), zeros, zeros)
        _, state, tokens, logps, _, live = jax.lax.while_loop(
            lambda c: (c[0] < chunk) & ~jnp.all(c[1].done), body, carry)
        state = DecodeState(state.cache, *(x.at[:call_rows].set(y)
                                           for x, y in zip(full[1:], state[1:])))
        return state, tokens, logps, live

    def _logprobs_fn(self, params, hidden, targets, mask):
        """[B] summed log-prob of `targets` [B, W] from the hidden states before them."""
        self.compilations += 1
        lp = jax.nn.log_softmax(logits(self.model_cfg, params, hidden))
        return jnp.sum(jnp.take_along_axis(lp, targets[:, :, None], axis=-1)[..., 0] * mask, -1)


_programs = functools.cache(_Programs)   # one `_Programs` per layout in the process


class Sampler:
    """Text in, completions out, for any `Decoder`; see the module docstring for the design."""

    def __init__(self, model: Decoder, tokenizer: Any, config: SamplerConfig | None = None,
                 mesh: Mesh | None = None,
                 rules: Sequence[tuple[str, Any]] | None = None):
        self.config = cfg = config or SamplerConfig()
        if cfg.cache_size % ATTENTION_BLOCK:
            raise ValueError(f"sampler.cache_size {cfg.cache_size} must be a multiple of "
                             f"{ATTENTION_BLOCK}")
        if cfg.decode_chunk < 1:
            raise ValueError(f"sampler.decode_chunk must be at least 1, not {cfg.decode_chunk}")
        for key in ("draft_tokens", "draft_tokens_sampled"):
            if getattr(cfg, key) < 0:
                raise ValueError(f"sampler.{key} must be at least 0, not {getattr(cfg, key)}")
        for key in ("decode_widths", "decode_attention_rows"):
            if any(w < 1 for w in getattr(cfg, key)):
                raise ValueError(f"sampler.{key} must be row counts of at least 1, not "
                                 f"{list(getattr(cfg, key))}")
        if ATTENTION_BLOCK % cfg.page_size:
            raise ValueError(f"sampler.page_size {cfg.page_size} must divide {ATTENTION_BLOCK}")
        if cfg.prefill_tokens < MIN_CALL_TOKENS:
            raise ValueError(f"sampler.prefill_tokens must be at least {MIN_CALL_TOKENS}")
        self.tokenizer = tokenizer
        self.graphdef = nnx.graphdef(model)
        self.model_cfg = model.cfg
        self.mesh = mesh or make_mesh(MeshConfig(shape={"data": 1}), jax.devices()[:1])
        self.rules = MeshConfig().rules if rules is None else rules
        self.row_multiple = batch_ways(self.mesh, self.rules)   # rows are padded to a multiple
        self.slots = -(-cfg.max_batch // self.row_multiple) * self.row_multiple
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.rows = NamedSharding(self.mesh, batch_spec(self.rules, 1))
        self.rows_2d = NamedSharding(self.mesh, batch_spec(self.rules, 2))
        self.rows_3d = NamedSharding(self.mesh, batch_spec(self.rules, 3))
        self.cache_sharding = self._cache_sharding()
        self.params = self._place_params(model)
        self.eos_ids = {i for i in (tokenizer.eos_token_id, model.cfg.eos_token_id) if i is not None}
        self.max_eos = max(1, len(self.eos_ids))   # EOS ids are an argument: fixed shape
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.stats = SamplerStats()
        self._scratch: dict[tuple[int, int], KVCache] = {}   # a call's prefill caches, reused
        num_pages = cfg.prefix_cache_mb * 2**20 // page_bytes(model.cfg, cfg.page_size)
        self.index = PrefixIndex(num_pages, cfg.page_size) if num_pages else None
        self.programs = _programs(self.model_cfg, self.pad_id, _Shardings(
            self.rows, self.rows_2d, self.rows_3d, self.replicated, self.cache_sharding,
            self._pool_sharding()), num_pages, cfg.page_size)
        self.pool = self.programs.new_pool() if num_pages else None

    @property
    def compilations(self) -> int:
        """Programs traced so far by the samplers of this layout (tests assert no recompiles
        inside a bucket)."""
        return self.programs.compilations

    def _cache_sharding(self) -> KVCache:
        """Rows over the batch axes, KV heads over the tensor axis where they divide it; the
        slot axis (None) is never sharded, as a decode step writes one slot of every row."""
        cfg = self.model_cfg
        names = (("batch", "kv_heads", "head_dim", None), ("batch", "kv_heads", None, "head_dim"))
        shape = (self.row_multiple, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim)
        k, v = (NamedSharding(self.mesh, fitted_spec(n, shape, self.mesh, self.rules))
                for n in names)
        return KVCache(k=(k,) * cfg.num_layers, v=(v,) * cfg.num_layers)

    def _pool_sharding(self) -> PagePool:
        """Pages replicated over the batch axes (any row may read any page), KV heads over the
        tensor axis as in the cache."""
        cfg = self.model_cfg
        shape = (1, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim)
        k, v = (NamedSharding(self.mesh, fitted_spec(n, shape, self.mesh, self.rules))
                for n in ((None, "kv_heads", "head_dim", None), (None, "kv_heads", None,
                                                                 "head_dim")))
        return PagePool(k=(k,) * cfg.num_layers, v=(v,) * cfg.num_layers)

    def _place_rows(self, x: np.ndarray) -> jax.Array:
        """A host array whose leading axis is rows, split over the batch shards."""
        return global_array(x, NamedSharding(self.mesh, batch_spec(self.rules, np.ndim(x))))

    def _place_params(self, model: Decoder) -> dict[str, Any]:
        """The model's weights in the serving layout, each layer's arrays sharded like the
        stacked training parameter they come from (its spec minus the `layers` axis)."""
        stacked = state_shardings(nnx.state(model, nnx.Param), self.mesh, self.rules)
        params = unstack_layers(model.params())
        # Held in the compute dtype, as `forward` casts them at every call (all but the final
        # norm): a bfloat16 policy trained with float32 weights would re-cast 0.5 GB a step.
        params = {n: v if n == "final_norm" else
                  jax.tree.map(lambda w: w.astype(self.model_cfg.dtype), v)
                  for n, v in params.items()}
        per_layer = {n: NamedSharding(self.mesh, PartitionSpec(*stacked[n].spec[1:]))
                     for n in params["layers"][0]}
        shardings = {**{n: stacked[n] for n in params if n != "layers"},
                     "layers": tuple(per_layer for _ in params["layers"])}
        return jax.tree.map(global_array, params, shardings)

    def update_params(self, state: nnx.State) -> None:
        """Swap in new weights of the same shapes (no recompilation); cached KV is dropped."""
        self.params = self._place_params(nnx.merge(self.graphdef, state))
        if self.index is not None:
            self.index.clear()

    # ------------------------------------------------------------------ prefill
    def _recycle(self, cache: KVCache) -> None:
        """Keep a prefill cache for the call's next group of its shape (dropped when the call
        ends). What it holds past a row's tokens is never attended: a row writes each slot
        before any token reads it."""
        self._scratch[cache.k[0].shape[0], cache.k[0].shape[-1]] = cache

    def _drop_scratch(self) -> None:
        """Free a call's prefill caches (up to GBs at 16 rows) and hand them back to the OS, so
        a stage's peak is its largest call's, not the sum of its calls' leftovers (MCTS + SPRE
        on 32 questions at the ablation's settings: 9.3 → 5.2 GB, the same trees; README)."""
        self._scratch.clear()
        return_freed_memory()

    def _cache_length(self, longest: int) -> int:
        """Cache slots for rows of up to `longest` tokens: few lengths (few programs), whole
        attention blocks. Attention costs what the rows use, not the length (see
        `decoder._cached_attention`); the length only sizes memory."""
        step = 4 * ATTENTION_BLOCK
        return min(-(-longest // step) * step, self.config.cache_size)

    def _rows_bucket(self, rows: int) -> int:
        """Rows of a prefill call: the batch bucket, padded to a multiple of the batch shards."""
        return -(-bucket(rows, self.config.batch_buckets) // self.row_multiple) * self.row_multiple

    def _groups(self, tokens: list[list[int]], first: list[int], width: list[int]
                ) -> Iterator[_Group]:
        """Rows in groups to prefill together. Every row first takes its cached pages (held
        until its group has copied them); rows are then grouped by the length left to compute,
        longest first, into the calls that compute the fewest slots (`plan_groups`)."""
        cfg = self.config
        found = [self.index.match(t) if self.index else ([], 0) for t in tokens]
        # A row that wants only its last position, cached whole, may have its end stored.
        ends = [self.index.end(t) if c == len(t) and f == c - 1 and w == 1 else None
                for t, (_, c), f, w in zip(tokens, found, first, width)]
        # Otherwise the wanted positions are computed, whatever the cache holds of them.
        start = [len(t) if e is not None else min(c, f)
                 for t, (_, c), f, e in zip(tokens, found, first, ends)]
        left = [len(t) - s for t, s in zip(tokens, start)]
        order = sorted(range(len(tokens)), key=lambda i: -left[i])
        for take in plan_groups([left[i] for i in order], self.slots, self._rows_bucket,
                                lambda n: bucket(min(n, cfg.prefill_tokens), cfg.prefill_buckets),
                                cfg.prefill_tokens):
            rows, order = order[:take], order[take:]
            yield _Group(rows, [tokens[i] for i in rows], [first[i] for i in rows],
                         [width[i] for i in rows], [found[i][0] for i in rows],
                         [start[i] for i in rows], [ends[i] for i in rows])

    def _prefill(self, group: _Group, size: int) -> tuple[KVCache, jax.Array]:
        """The group's rows into a scratch cache of `size` slots, from their cached pages, in
        calls of at most `prefill_tokens` token slots → (cache, hidden [rows, W, H] at positions
        first..first+width-1 of each row). Stores the rows' new pages. The caller hands
        the cache back with `_recycle` once it has copied what it needs."""
        cfg, p = self.config, self.config.page_size
        started = time.perf_counter()
        b = self._rows_bucket(len(group.rows))
        cache = self._scratch.pop((b, size), None) or self.programs.new_cache(b, size)
        if any(group.pages):
            # Few table widths (few programs), never past the call's cache (its rows fit it);
            # a padded entry copies a page past the row's prefix, into slots its own tokens
            # overwrite before anything reads them.
            width = min(bucket(max(map(len, group.pages)), (4, 8, 16, 32, 64, 128)), size // p)
            table = np.zeros((b, width), np.int32)
            for r, pages in enumerate(group.pages):
                table[r, :len(pages)] = pages
            cache = self.programs.load(self.pool, cache, self._place_rows(table))
            self.index.release([x for pages in group.pages for x in pages])
        start = group.start + [0] * (b - len(group.rows))
        ends = [len(t) for t in group.tokens] + [0] * (b - len(group.rows))
        first = group.first + [0] * (b - len(group.rows))
        w = bucket(max(group.width), WIDTH_BUCKETS)
        shape, dtype = (b, w, self.model_cfg.hidden_size), jnp.dtype(self.model_cfg.dtype)
        if any(end is not None for end in group.ends):
            out = np.zeros(shape, dtype)
            for r, end in enumerate(group.ends):
                if end is not None:
                    out[r, 0] = end
            out = self._place_rows(out)
        else:
            out = jnp.zeros(shape, dtype, device=self.rows_3d)
        self.stats.prompt_tokens += sum(ends)
        self.stats.cached_tokens += sum(start)
        while any(s < e for s, e in zip(start, ends)):
            need = max(e - s for s, e in zip(start, ends))
            t = max(min(call_length(need, cfg.prefill_buckets), cfg.prefill_tokens // b),
                    -(-MIN_CALL_TOKENS // b), 2,      # one position is a decode step's shape
                    max(e - f for e, f, s in zip(ends, first, start) if s < e))
            tokens = np.full((b, t), self.pad_id, np.int32)
            positions = np.zeros((b, t), np.int32)
            take = np.zeros((b, w), np.int32)
            keep = np.zeros(b, bool)
            for r in range(b):
                n = min(ends[r] - start[r], t)
                if start[r] + n < ends[r] and start[r] + n > first[r]:
                    n = first[r] - start[r]      # the wanted positions go in one later call
                if r < len(group.rows):
                    tokens[r, :n] = group.tokens[r][start[r]:start[r] + n]
                positions[r] = start[r] + np.arange(t)
                if n and start[r] + n == ends[r]:
                    keep[r] = True
                    take[r] = np.minimum(first[r] - start[r] + np.arange(w), t - 1)
                self.stats.computed_tokens += n
                self.stats.padded_tokens += t - n
                start[r] += n
            cache, out = self.programs.extend(self.params, cache, out, *map(
                self._place_rows, (tokens, positions, take, keep)))
        if self.index is not None:
            self._store_ends(group, out)
            # From the page the row started computing in; pages already stored are skipped.
            stores = self.index.allocate([(t, s // p)
                                          for t, s in zip(group.tokens, group.start)])
            entries = [(r, i * p, page) for r, row in enumerate(stores) for i, page in row]
            if entries:
                n = bucket(len(entries), (8, 32, 128, 512, 2048))
                rows, starts, pages = np.zeros((3, n), np.int32)
                pages[:] = self.index.num_pages          # padding: past the pool, dropped
                rows[:len(entries)], starts[:len(entries)], pages[:len(entries)] = \
                    np.asarray(entries, np.int32).T
                self.pool = self.programs.store(self.pool, cache, *map(
                    self._replicate, (rows, starts, pages)))
        jax.block_until_ready(out)
        self.stats.prefill_s += time.perf_counter() - started
        return cache, out

    def _store_ends(self, group: _Group, out: jax.Array) -> None:
        """Each computed row's hidden state at its last token, where it wanted that position
        (a prompt, a scored continuation): the next prompt that ends there — the generation
        after a chosen scaffold, a node's next rollout — then starts decoding from its pages
        without a prefill call. The state is the same bits whichever call computes it."""
        rows = [r for r, (t, f, w, e) in enumerate(zip(group.tokens, group.first, group.width,
                                                        group.ends))
                if e is None and f + w == len(t)]
        if not rows:
            return
        idx = np.zeros((2, out.shape[0]), np.int32)
        idx[0, :len(rows)] = rows
        idx[1, :len(rows)] = [group.width[r] - 1 for r in rows]
        got = np.asarray(self.programs.gather(out, *map(self._replicate, idx)))
        for r, hidden in zip(rows, got):
            self.index.store_end(group.tokens[r], hidden.copy())    # not a view pinning `got`

    # ------------------------------------------------------------------ host API
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int],
                 n: int = 1) -> list[list[Completion]]:
        """`n` completions per prompt; row i sample j depends only on (prompt i, seeds[i], j)."""
        return self.generate_ids([self.encode(p) for p in prompts], params, seeds, n)

    def generate_ids(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                     seeds: Sequence[int], n: int = 1) -> list[list[Completion]]:
        """`generate` on token ids (benchmarks and callers that tokenise themselves)."""
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt (a chat-templated prompt has at least one token)")
        longest = max((len(p) for p in prompts), default=0)
        if longest + params.max_new_tokens > self.config.cache_size:
            raise ValueError(f"prompt of {longest} tokens + max_new_tokens "
                             f"{params.max_new_tokens} exceeds sampler.cache_size "
                             f"{self.config.cache_size}")
        if not prompts:
            return []
        # Requests (prompt, sample) queue per distinct prompt: identical prompts prefill once.
        distinct: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        for i, ids in enumerate(prompts):
            distinct.setdefault(tuple(ids), []).extend((i, j) for j in range(n))
        # Longest prompts first: a decode step reads every row's KV up to the batch's longest
        # row, and the rows admitted together are prefilled together, so rows of like length
        # share calls: the e2e bench's 32-question eval pads 15.6 % of its prefill slots, not
        # 17.5 (same predictions). No wall-time change was measurable on the Xeon (README).
        queue = deque(sorted(distinct.items(), key=lambda item: -len(item[0])))
        results: list[list[Any]] = [[None] * n for _ in prompts]
        try:
            self._drain(queue, params, [int(s) % 2**64 for s in seeds], results,
                        self._cache_length(longest + params.max_new_tokens))
        finally:
            self._drop_scratch()
        return results

    def _knobs(self, params: SamplingParams) -> tuple[jax.Array, ...]:
        """A decode call's sampling arguments (replicated): temperature, top-p, top-k, the
        token budget and the EOS ids."""
        eos = sorted(self.eos_ids) if not params.ignore_eos else []
        eos = np.asarray((eos + [-1] * self.max_eos)[:self.max_eos], np.int32)
        return tuple(self._replicate(x) for x in (
            np.float32(params.temperature), np.float32(params.top_p), np.int32(params.top_k),
            np.int32(params.max_new_tokens), eos))

    def _words(self, seeds: np.ndarray, samples: np.ndarray) -> jax.Array:
        return global_array(seed_words(seeds, samples),
                            NamedSharding(self.mesh, PartitionSpec(None, *self.rows.spec)))

    def _widths(self, draft: int) -> tuple[tuple[int, int], ...]:
        """(rows, attending rows) a decode call may run on, fewest attending first: all
        `max_batch` slots, each of `decode_widths` whose rows this machine computes to the same
        bits as a `max_batch` call's, and each of `decode_attention_rows` attending on the fewest
        such rows that hold it, the others empty, where that keeps the bits too. So a row's
        tokens never depend on how many others are live. XLA:CPU picks matmul kernels by row
        count (Zen 4, SmolLM2-135M: 8 rows of one position matched 16, 4 did not; 8 rows of 4
        positions did not match 16, 10 did), and a step's cost is mostly its rows' attention
        (8 rows, 1 attending: 47 ms a sampled step against 74 for 8 attending), so each is
        probed once per draft count (`_probe`). On a mesh the rows are split over devices:
        always `max_batch`."""
        cfg, slots = self.config, self.slots
        narrow = tuple(sorted(w for w in set(cfg.decode_widths) if w < slots))
        attending = tuple(sorted(a for a in set(cfg.decode_attention_rows) if a < slots))
        key = (draft, slots, narrow, attending)
        if key not in self.programs.widths:
            kept = [(slots, slots)]
            if (narrow or attending) and self.row_multiple == 1:
                full = self._probe(draft, slots, slots)

                def same(rows: int, attention: int) -> bool:
                    return all(np.array_equal(a[:attention], b) for a, b in
                               zip(full, self._probe(draft, rows, attention)))

                kept += [(w, w) for w in narrow if same(w, w)]
                for a in attending:
                    rows = min(r for r, _ in kept if r >= a)
                    if rows > a and same(rows, a):
                        kept.append((rows, a))
            self.programs.widths[key] = tuple(sorted(kept, key=lambda w: (w[1], w[0])))
        return self.programs.widths[key]

    def _probe(self, draft: int, rows: int, attention: int) -> tuple[np.ndarray, ...]:
        """(tokens, log-probs, next-token logits) of the first `attention` rows after one decode
        call on `rows` rows, the others empty, from a made-up state: random logits and context,
        an empty cache of the smallest length (a row's bits do not depend on it:
        `decoder._cached_attention`)."""
        d, vocab, size = self.slots, self.model_cfg.vocab_size, self._cache_length(1)
        rng = np.random.default_rng(0)
        state = DecodeState(
            self.programs.new_cache(d, size),
            self._place_rows(rng.standard_normal((d, vocab), np.float32)),
            self._place_rows(rng.integers(1 + draft, size // 2, d, dtype=np.int32)),
            self._replicate(np.arange(d) >= attention), self._replicate(np.zeros(d, np.int32)),
            self._place_rows(rng.integers(0, vocab, (d, size), dtype=np.int32)))
        state, tok, lp, _ = self.programs.decode(
            self.config.decode_chunk, draft, rows, attention, self.params, state,
            self._words(np.arange(d, dtype=np.uint64), np.zeros(d, np.int32)),
            self._knobs(SamplingParams(max_new_tokens=size, temperature=1.0, ignore_eos=True)))
        return tuple(np.asarray(x)[:attention] for x in (tok, lp, state.logits))

    def _drain(self, queue: deque, params: SamplingParams, seeds: list[int],
               results: list[list[Any]], size: int) -> None:
        """Decode every queued request on `self.slots` rows, admitting waiting requests into
        slots as rows finish; fills `results[i][j]`."""
        d = self.slots
        place, replicate = self._place_rows, self._replicate
        draft = (self.config.draft_tokens if params.temperature == 0
                 else self.config.draft_tokens_sampled)
        widths = self._widths(draft)                # before the state: its probe makes its own
        state = DecodeState(self.programs.new_cache(d, size),
                            place(np.zeros((d, self.model_cfg.vocab_size), np.float32)),
                            None, None, None, place(np.zeros((d, size), np.int32)))
        owner: list[tuple[int, int] | None] = [None] * d        # slot → (prompt, sample)
        tokens: list[list[int]] = [[] for _ in range(d)]
        logps: list[list[float]] = [[] for _ in range(d)]
        pos, n_done = np.zeros(d, np.int32), np.zeros(d, np.int32)
        seed_of, sample_of = np.zeros(d, np.uint64), np.zeros(d, np.int32)
        knobs = self._knobs(params)
        while queue or any(o is not None for o in owner):
            free = [s for s in range(d) if owner[s] is None]
            # Admit when a quarter of the slots are free (a prefill call per freed row would be
            # mostly padding) or when nothing else runs; else at once the waiting requests that
            # need no prefill call (their end is stored: generations after a scored scaffold).
            if queue and not (len(free) == d or len(free) >= max(1, d // 4)):
                free = free[:self._stored_requests(queue, len(free))]
            if queue and free:
                state, placed = self._admit_requests(queue, free, state, size)
                for s, (i, j), length in placed:
                    owner[s], tokens[s], logps[s] = (i, j), [], []
                    pos[s], n_done[s], seed_of[s], sample_of[s] = length, 0, seeds[i], j
            # The fewest attending rows that hold the live ones, which move to the front slots
            # first.
            live_slots = [s for s in range(d) if owner[s] is not None]
            width, attention = next(w for w in widths if w[1] >= len(live_slots))
            src = [s for s in live_slots if s >= attention]
            if src:
                dst = [s for s in range(attention) if owner[s] is None][:len(src)]
                state = self._move(state, src, dst, attention)
                for a, b in zip(src, dst):
                    owner[b], tokens[b], logps[b], owner[a] = owner[a], tokens[a], logps[a], None
                    for x in (pos, n_done, seed_of, sample_of):
                        x[b] = x[a]
            done = np.asarray([o is None for o in owner])
            started = time.perf_counter()
            state, tok, lp, live = self.programs.decode(
                self.config.decode_chunk, draft, width, attention, self.params, state._replace(
                    pos=place(pos), done=replicate(done), n_done=replicate(n_done)),
                self._words(seed_of, sample_of), knobs)
            tok, lp, new_n = np.asarray(tok), np.asarray(lp), np.asarray(state.n_done)
            device_done, live = np.asarray(state.done), np.asarray(live)
            self.stats.decode_s += time.perf_counter() - started
            made = new_n - n_done
            self.stats.decode_tokens += int(made.sum())
            self.stats.decode_steps += int(live.sum())
            self.stats.decode_idle += width * int(live.max(initial=0)) - int(live.sum())
            for s in range(width):
                if owner[s] is None:
                    continue
                tokens[s] += tok[s, :made[s]].tolist()
                logps[s] += lp[s, :made[s]].tolist()
                pos[s] += made[s]
                n_done[s] = new_n[s]
                finished = self._finish(tokens[s], logps[s], params, bool(device_done[s]))
                if finished is not None:
                    i, j = owner[s]
                    results[i][j] = finished
                    owner[s] = None

    def _move(self, state: DecodeState, src: list[int], dst: list[int], width: int
              ) -> DecodeState:
        """`state` with decode rows `src` moved into the empty slots `dst`, all below `width`:
        the copy gathers `width` rows, not every slot's."""
        rows = np.zeros((2, width), np.int32)
        rows[1] = self.slots                                        # padding: dropped
        rows[0, :len(src)], rows[1, :len(dst)] = src, dst
        cache, logits, context = self.programs.move(state.cache, state.logits, state.context,
                                                    *map(self._replicate, rows))
        return state._replace(cache=cache, logits=logits, context=context)

    def _stored_requests(self, queue: deque, room: int) -> int:
        """How many of the first `room` waiting requests have their prompt's end stored."""
        if self.index is None:
            return 0
        count = 0
        for ids, requests in queue:
            if count >= room or self.index.end(ids) is None:
                break
            count += len(requests)
        return min(count, room)

    def _admit_requests(self, queue: deque, free: list[int], state: DecodeState, size: int
                        ) -> tuple[DecodeState, list[tuple[int, tuple[int, int], int]]]:
        """Take requests off `queue` for the `free` slots, prefill their prompts from the
        prefix cache and copy each into its slots → (state, [(slot, request, prompt length)])."""
        picked: list[tuple[list[int], list[tuple[int, int]]]] = []
        room = len(free)
        while queue and room:
            ids, requests = queue[0]
            if len(requests) > room:
                queue[0] = (ids, requests[room:])
            else:
                queue.popleft()
            picked.append((list(ids), requests[:room]))
            room -= len(picked[-1][1])
        prompts = [ids for ids, _ in picked]
        placed, slots_left = [], iter(free)
        for group in self._groups(prompts, [len(t) - 1 for t in prompts], [1] * len(prompts)):
            cache, hidden = self._prefill(group, size)
            slots = np.full(self.slots, self.slots, np.int32)      # past the cache: dropped
            parent = np.zeros(self.slots, np.int32)
            context = np.zeros((self.slots, size), np.int32)
            k = 0
            for r, row in enumerate(group.rows):
                for request in picked[row][1]:
                    slot = next(slots_left)
                    slots[k], parent[k] = slot, r
                    context[k, :len(prompts[row])] = prompts[row]
                    placed.append((slot, request, len(prompts[row])))
                    k += 1
            new_cache, last, new_context = self.programs.admit(
                self.params, state.cache, state.logits, state.context, cache, hidden,
                *map(self._replicate, (slots, parent, context)))
            state = state._replace(cache=new_cache, logits=last, context=new_context)
            self._recycle(cache)
        return state, placed

    def _replicate(self, x: Any) -> jax.Array:
        return global_array(x, self.replicated)

    def _finish(self, tokens: list[int], logps: list[float], params: SamplingParams,
                device_done: bool) -> Completion | None:
        """A Completion if the row is finished (stop string, EOS or budget), else None."""
        ended_eos = not params.ignore_eos and bool(tokens) and tokens[-1] in self.eos_ids
        body = tokens[:-1] if ended_eos else tokens
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        hits = [(text.find(s) + len(s), s) for s in params.stop if s in text]
        if hits:
            end, stop = min(hits)
            # Fewest tokens whose text reaches the end of the stop string.
            keep = next(k for k in range(1, len(body) + 1)
                        if len(self.tokenizer.decode(body[:k], skip_special_tokens=True)) >= end)
            return Completion(text[:end], body[:keep], logps[:keep], "stop", stop)
        if ended_eos:
            return Completion(text, tokens, logps, "eos", None)
        if device_done or len(tokens) >= params.max_new_tokens:
            return Completion(text, tokens, logps, "length", None)
        return None

    def score(self, prompts: Sequence[str], continuations: Sequence[Sequence[str]]) -> np.ndarray:
        """[P, C] summed log-prob of each continuation given its prompt (guided-mode choices);
        a prompt with fewer than C continuations has -inf in the missing places.

        With the prefix cache on, the prompts are prefilled first (their pages stored) and every
        continuation is then scored from its prompt's pages: each prompt is read once, and a
        generation after a chosen continuation starts from the same pages."""
        heads = [self.encode(p) for p in prompts]
        rows = [(i, j, heads[i], self.encode(c)) for i, conts in enumerate(continuations)
                for j, c in enumerate(conts)]
        scores = np.full((len(prompts), max(map(len, continuations), default=0)), -np.inf,
                         np.float32)
        if not rows:
            return scores
        size = self._cache_length(max(len(p) + len(c) for _, _, p, c in rows))
        try:
            return self._score_rows(heads, rows, scores, size)
        finally:
            self._drop_scratch()

    def _score_rows(self, heads: list[list[int]], rows: list, scores: np.ndarray, size: int
                    ) -> np.ndarray:
        """`score`'s two passes: the prompts into the page cache, then every (prompt,
        continuation) row from its prompt's pages, summing the continuation's log-probs."""
        if self.index is not None:
            distinct = list(dict.fromkeys(tuple(h) for h in heads))
            for group in self._groups([list(h) for h in distinct], [len(h) - 1 for h in distinct],
                                      [1] * len(distinct)):
                self._recycle(self._prefill(group, size)[0])
        tokens = [p + c for _, _, p, c in rows]
        firsts = [len(p) - 1 for _, _, p, _ in rows]
        # One position past the continuation: its end, which a generation after it starts from.
        widths = [len(c) + 1 for _, _, _, c in rows]
        for group in self._groups(tokens, firsts, widths):
            cache, hidden = self._prefill(group, size)
            self._recycle(cache)
            # The head reads the continuations' positions only, not the end past them.
            b, w = hidden.shape[0], bucket(max(group.width) - 1, WIDTH_BUCKETS)
            hidden = hidden[:, :w]
            # The head sees at least MIN_CALL_TOKENS rows × positions (row-independent bits).
            b_head = max(b, -(-MIN_CALL_TOKENS // w))
            targets = np.zeros((b_head, w), np.int32)
            mask = np.zeros((b_head, w), np.float32)
            for r, row in enumerate(group.rows):
                c = rows[row][3]
                targets[r, :len(c)] = c
                mask[r, :len(c)] = 1.0
            if b_head > b:
                hidden = jnp.pad(hidden, ((0, b_head - b), (0, 0), (0, 0)))
            sums = np.asarray(self.programs.logprobs(self.params, hidden,
                                                     *map(self._place_rows, (targets, mask))))
            for r, row in enumerate(group.rows):
                scores[rows[row][0], rows[row][1]] = sums[r]
            self.stats.score_rows += len(group.rows)
        return scores
