"""Batched, jit-compiled sampling from the decoder: prefill once, decode in device-side chunks.

Evaluation, MCTS expansion and SPRE rollouts all call `Sampler.generate`. Shapes are bucketed
(batch, prompt length, cache length) so a new prompt length inside a bucket reuses the compiled
program; params are jit arguments, so swapping trained weights never recompiles. Decoding runs
`chunk` tokens per device call inside a `lax.while_loop` that exits when every row is done;
stop strings are then matched on the decoded text on the host, which is exact whatever the
tokenisation of the stop string in context. `n` samples of a prompt share its prefill (cache rows
are gathered). The sampler keeps the weights in the decoder's serving layout (per-layer arrays,
see `decoder.forward`), so a decode step reads each weight and cache buffer once, in place.

On a mesh (several devices, or several processes of a pod) the weights are sharded by their
logical axis names exactly as in training, the KV cache by rows over the batch axes and by KV
heads over the tensor axis, and rows are padded to a multiple of the batch shards. What the host
reads back (tokens, log-probs, done flags) is replicated, so every process of a pod takes the
same decisions and runs the same loop: all of them call `generate` with the same prompts.

Randomness: row i, sample j, token t draws with key(seed_i, j) folded with t, so a row's output
never depends on what else is in the batch. Reported log-probs are of the chosen token under the
model's unmodified distribution (temperature 1, no top-k/top-p), as DPO and scoring use it.
"""
from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from reasonrag_jax.config import MeshConfig, SamplerConfig
from reasonrag_jax.models.decoder import Decoder, KVCache, forward, logits, unstack_layers
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


def _bucket(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket ≥ n; past the largest, the next multiple of it."""
    i = bisect.bisect_left(buckets, n)
    if i < len(buckets):
        return buckets[i]
    top = buckets[-1]
    return -(-n // top) * top


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


class Sampler:
    """Text in, completions out, for any `Decoder`; see the module docstring for the design."""

    def __init__(self, model: Decoder, tokenizer: Any, config: SamplerConfig | None = None,
                 chunk: int = 16, mesh: Mesh | None = None,
                 rules: Sequence[tuple[str, Any]] | None = None):
        self.config = config or SamplerConfig()
        self.tokenizer = tokenizer
        self.graphdef = nnx.graphdef(model)
        self.model_cfg = model.cfg
        self.mesh = mesh or make_mesh(MeshConfig(shape={"data": 1}), jax.devices()[:1])
        self.rules = MeshConfig().rules if rules is None else rules
        self.row_multiple = batch_ways(self.mesh, self.rules)   # rows are padded to a multiple
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.rows = NamedSharding(self.mesh, batch_spec(self.rules, 1))
        self.rows_2d = NamedSharding(self.mesh, batch_spec(self.rules, 2))
        self.cache_sharding = self._cache_sharding()
        self.params = self._place_params(model)
        self.chunk = chunk
        self.eos_ids = {i for i in (tokenizer.eos_token_id, model.cfg.eos_token_id) if i is not None}
        self.max_eos = max(1, len(self.eos_ids))   # EOS ids are an argument: fixed shape
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.compilations = 0   # traced programs (tests assert no recompiles inside a bucket)
        rows, rows_2d, cache, replicated = (
            self.rows, self.rows_2d, self.cache_sharding, self.replicated)
        self._new_cache = jax.jit(functools.partial(KVCache.init, self.model_cfg),
                                  static_argnums=(0, 1), out_shardings=cache)
        self._prefill = jax.jit(self._prefill_fn, donate_argnums=(3,),
                                out_shardings=(rows_2d, cache))
        self._fan_out = jax.jit(lambda cache, last, parent: (cache.take(parent), last[parent]),
                                out_shardings=(cache, rows_2d))
        self._decode = jax.jit(self._decode_fn, static_argnums=(0,), donate_argnums=(2,),
                               out_shardings=(cache, rows_2d, rows) + (replicated,) * 4)
        self._score = jax.jit(self._score_fn, static_argnums=(0,), out_shardings=replicated)

    def _cache_sharding(self) -> KVCache:
        """Rows over the batch axes, KV heads over the tensor axis where they divide it; the
        slot axis (None) is never sharded, as a decode step writes one slot of every row."""
        cfg = self.model_cfg
        names = (("batch", "kv_heads", "head_dim", None), ("batch", "kv_heads", None, "head_dim"))
        shape = (self.row_multiple, cfg.num_kv_heads, cfg.head_dim, cfg.head_dim)
        k, v = (NamedSharding(self.mesh, fitted_spec(n, shape, self.mesh, self.rules))
                for n in names)
        return KVCache(k=(k,) * cfg.num_layers, v=(v,) * cfg.num_layers)

    def _place_rows(self, x: np.ndarray) -> jax.Array:
        """A host array whose leading axis is rows, split over the batch shards."""
        return global_array(x, NamedSharding(self.mesh, batch_spec(self.rules, np.ndim(x))))

    def _place_params(self, model: Decoder) -> dict[str, Any]:
        """The model's weights in the serving layout, each layer's arrays sharded like the
        stacked training parameter they come from (its spec minus the `layers` axis)."""
        stacked = state_shardings(nnx.state(model, nnx.Param), self.mesh, self.rules)
        params = unstack_layers(model.params())
        per_layer = {n: NamedSharding(self.mesh, PartitionSpec(*stacked[n].spec[1:]))
                     for n in params["layers"][0]}
        shardings = {**{n: stacked[n] for n in params if n != "layers"},
                     "layers": tuple(per_layer for _ in params["layers"])}
        return jax.tree.map(global_array, params, shardings)

    def update_params(self, state: nnx.State) -> None:
        """Swap in new weights of the same shapes (no recompilation)."""
        self.params = self._place_params(nnx.merge(self.graphdef, state))

    # ------------------------------------------------------------------ device programs
    def _prefill_fn(self, params, tokens, lengths, cache):
        """Right-padded prompts from position 0 into a fresh cache."""
        self.compilations += 1
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        hidden, cache = forward(self.model_cfg, params, tokens, positions, cache)
        last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)
        return logits(self.model_cfg, params, last)[:, 0], cache

    def _decode_fn(self, chunk, params, cache, last_logits, pos, words, done, n_done, knobs):
        """Up to `chunk` tokens for every row; rows that hit EOS or their budget stop."""
        self.compilations += 1
        temperature, top_p, top_k, budget, eos = knobs
        keys = row_keys(words)
        b = last_logits.shape[0]
        tokens = jnp.full((b, chunk), self.pad_id, jnp.int32)
        logps = jnp.zeros((b, chunk), jnp.float32)

        def body(carry):
            i, cache, last, pos, done, n_done, tokens, logps = carry
            tok = _choose(last, keys, n_done, temperature, top_p, top_k)
            lp = jnp.take_along_axis(jax.nn.log_softmax(last), tok[:, None], axis=-1)[:, 0]
            tok = jnp.where(done, self.pad_id, tok)
            tokens = tokens.at[:, i].set(tok)
            logps = logps.at[:, i].set(jnp.where(done, 0.0, lp))
            n_done = n_done + (~done).astype(jnp.int32)
            done = done | jnp.isin(tok, eos) | (n_done >= budget)
            hidden, cache = forward(self.model_cfg, params, tok[:, None], pos[:, None], cache)
            pos = pos + (~done).astype(jnp.int32)
            return (i + 1, cache, logits(self.model_cfg, params, hidden)[:, 0], pos, done, n_done,
                    tokens, logps)

        carry = (0, cache, last_logits, pos, done, n_done, tokens, logps)
        carry = jax.lax.while_loop(lambda c: (c[0] < chunk) & ~jnp.all(c[4]), body, carry)
        _, cache, last_logits, pos, done, n_done, tokens, logps = carry
        return cache, last_logits, pos, done, n_done, tokens, logps

    def _score_fn(self, width, params, tokens, starts, targets, mask):
        """Summed log-prob of `targets` [B, width] predicted from positions starts + arange."""
        self.compilations += 1
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        hidden, _ = forward(self.model_cfg, params, tokens, positions)
        idx = jnp.minimum(starts[:, None] + jnp.arange(width), tokens.shape[1] - 1)
        out = logits(self.model_cfg, params, jnp.take_along_axis(hidden, idx[:, :, None], axis=1))
        lp = jnp.take_along_axis(jax.nn.log_softmax(out), targets[:, :, None], axis=-1)[..., 0]
        return jnp.sum(lp * mask, axis=-1)

    # ------------------------------------------------------------------ host API
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int],
                 n: int = 1) -> list[list[Completion]]:
        """`n` completions per prompt; row i sample j depends only on (seeds[i], j)."""
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
        out: list[list[Completion]] = []
        per_call = max(1, self.config.max_batch // n)
        for start in range(0, len(prompts), per_call):
            out += self._generate_ids([list(p) for p in prompts[start:start + per_call]], params,
                                      list(seeds[start:start + per_call]), n)
        return out

    def _generate_ids(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int],
                      n: int) -> list[list[Completion]]:
        cfg = self.config
        p = len(prompts)
        pb = self._rows_bucket(p)
        t = _bucket(max(len(x) for x in prompts), cfg.prompt_buckets)
        # Attention reads every cache slot each step, so the cache is only as long as this call
        # needs (rounded to limit recompiles): at batch 16 it is as many bytes as the weights.
        size = min(-(-(t + params.max_new_tokens) // 128) * 128, cfg.cache_size)
        tokens = np.full((pb, t), self.pad_id, np.int32)
        lengths = np.ones(pb, np.int32)
        for i, ids in enumerate(prompts):
            tokens[i, :len(ids)] = ids
            lengths[i] = len(ids)
        place, replicate = self._place_rows, self._replicate
        logits, cache = self._prefill(self.params, place(tokens), place(lengths),
                                      self._new_cache(pb, size))

        # n samples per prompt: the prefilled cache rows are gathered, not recomputed.
        rows = p * n
        rb = self._rows_bucket(rows)
        parent = np.zeros(rb, np.int32)
        parent[:rows] = np.repeat(np.arange(p), n)
        if n > 1 or rb != pb:
            cache, logits = self._fan_out(cache, logits, replicate(parent))
        row_seed = np.zeros(rb, np.uint64)
        row_seed[:rows] = np.repeat(np.asarray([int(s) % 2**64 for s in seeds], np.uint64), n)
        sample = np.zeros(rb, np.int32)
        sample[:rows] = np.tile(np.arange(n), p)
        words = global_array(seed_words(row_seed, sample),
                             NamedSharding(self.mesh, PartitionSpec(None, *self.rows.spec)))
        pos = place(lengths[parent])
        done = replicate(np.arange(rb) >= rows)
        n_done = replicate(np.zeros(rb, np.int32))
        eos = sorted(self.eos_ids) if not params.ignore_eos else []
        eos = np.asarray((eos + [-1] * self.max_eos)[:self.max_eos], np.int32)
        knobs = tuple(replicate(x) for x in (
            np.float32(params.temperature), np.float32(params.top_p), np.int32(params.top_k),
            np.int32(params.max_new_tokens), eos))

        new_tokens: list[list[int]] = [[] for _ in range(rows)]
        new_logps: list[list[float]] = [[] for _ in range(rows)]
        results: list[Completion | None] = [None] * rows
        while True:
            cache, logits, pos, done, n_done, tok, lp = self._decode(
                self.chunk, self.params, cache, logits, pos, words, done, n_done, knobs)
            tok, lp, done_host = np.asarray(tok), np.asarray(lp), np.array(done)
            n_host = np.asarray(n_done)
            for r in range(rows):
                if results[r] is not None:
                    continue
                k = n_host[r] - len(new_tokens[r])
                new_tokens[r] += tok[r, :k].tolist()
                new_logps[r] += lp[r, :k].tolist()
                finished = self._finish(new_tokens[r], new_logps[r], params, bool(done_host[r]))
                if finished is not None:
                    results[r] = finished
                    done_host[r] = True
            if all(x is not None for x in results):
                break
            done = replicate(done_host)
        return [results[i * n:(i + 1) * n] for i in range(p)]

    def _rows_bucket(self, rows: int) -> int:
        """Rows of a device call: the batch bucket, padded to a multiple of the batch shards."""
        return -(-_bucket(rows, self.config.batch_buckets) // self.row_multiple) * self.row_multiple

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
        a prompt with fewer than C continuations has -inf in the missing places."""
        flat = [(self.encode(p), self.encode(c)) for i, p in enumerate(prompts)
                for c in continuations[i]]
        where = [(i, j) for i, c in enumerate(continuations) for j in range(len(c))]
        out = np.zeros(len(flat), np.float32)
        width = _bucket(max(len(c) for _, c in flat), (8, 16, 32, 64))
        for start in range(0, len(flat), self.config.max_batch):
            part = flat[start:start + self.config.max_batch]
            t = _bucket(max(len(p) + len(c) for p, c in part), self.config.prompt_buckets)
            b = self._rows_bucket(len(part))
            tokens = np.full((b, t), self.pad_id, np.int32)
            starts = np.zeros(b, np.int32)
            targets = np.zeros((b, width), np.int32)
            mask = np.zeros((b, width), np.float32)
            for r, (p, c) in enumerate(part):
                tokens[r, :len(p) + len(c)] = p + c
                starts[r] = len(p) - 1
                targets[r, :len(c)] = c
                mask[r, :len(c)] = 1.0
            sums = self._score(width, self.params,
                               *map(self._place_rows, (tokens, starts, targets, mask)))
            out[start:start + len(part)] = np.asarray(sums)[:len(part)]
        scores = np.full((len(prompts), max(map(len, continuations))), -np.inf, np.float32)
        scores[tuple(np.array(where).T)] = out
        return scores

