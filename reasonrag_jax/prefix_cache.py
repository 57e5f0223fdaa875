"""Prompt KV kept in fixed-size pages, found by token prefix, evicted least-recently-used.

Evaluation, MCTS expansion and SPRE rollouts re-read the same prompt prefixes all the time: the
system prompt of every step, the prompt a guided step scores two scaffolds after and then
continues, the node prompt that every child and every rollout of an MCTS node starts from. The
sampler keeps the KV of every page of prompt tokens it computes in a page pool (device
arrays `[pages, ...]`, the layout paged-attention kernels read) and starts a new prompt from the
longest stored prefix, as vLLM's automatic prefix caching does.

Two halves:
- `PrefixIndex` (host): which page holds which prefix. A page of P tokens is keyed by a hash of
  (the key of the page before it, its P tokens), so a key names a whole prefix; a lookup walks a
  prompt's pages in order and stops at the first one not stored. A prompt's last, partial page
  is stored too, keyed by its m < P tokens: the next prompt of a guided step is the same prompt
  plus a scaffold, and without its tail it would recompute up to P - 1 tokens of every scored
  row and every generation after the choice (on the e2e bench, most of those calls' tokens).
- `PagePool` (device): the pages themselves, with pure functions that copy a row's pages into a
  KV cache (`load`) and a cache row's pages into the pool (`store`).

Pages are copied into a row's own cache rather than attended in place: on XLA:CPU a gather of
pages inside every attention layer would double the KV traffic of each decode step, while a
copy costs one read per admitted prompt. A page is therefore only in use between a lookup and
the copy that follows it; lookups hold their pages (a reference count) until the copy, so the
stores that evict pages never take one a waiting row is about to read. On TPU/GPU a paged
attention kernel can read the same pool through the same page table instead.

Why cached KV is exact: the sampler computes prompt KV in calls whose shapes keep XLA's kernels
row-independent (see `Sampler`), and attention over the cache is blockwise with a fixed block
(`decoder._cached_attention`), so a page computed in any call holds the same bits as the page
an uncached run computes. Outputs never depend on what happens to be cached.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from reasonrag_jax.models.decoder import DecoderConfig, KVCache, kv_dtype


def page_bytes(cfg: DecoderConfig, page_size: int) -> int:
    """Device bytes of one page: K and V of `page_size` positions in every layer."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * page_size * \
        kv_dtype(cfg).itemsize


class PrefixIndex:
    """Host-side page table: prefix keys → page ids, LRU order, free list.

    Fields: `page_size` (tokens per page); `num_pages`; `pages` (key → page id, least recently used first);
    `free` (unused page ids); `refs` (page id → lookups not yet released: such a page is never
    evicted, since a row is about to copy it); `hits` / `looked_up` (tokens found / asked for).
    """

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need at least one page of at least one token, got {num_pages} "
                             f"pages of {page_size}")
        self.page_size, self.num_pages = page_size, num_pages
        self.pages: OrderedDict[bytes, int] = OrderedDict()
        self.free = list(range(num_pages - 1, -1, -1))
        self.refs: dict[int, int] = {}
        self.hits = self.looked_up = 0
        # A row's last hidden state, by the row's tokens: a prompt whose every token is cached
        # and whose end is known (a scored continuation, an earlier prompt) needs no prefill.
        self.ends: OrderedDict[bytes, np.ndarray] = OrderedDict()

    def keys(self, tokens: Sequence[int], count: int) -> list[bytes]:
        """Chained keys of the first `count` full pages of `tokens`."""
        out, prev, p = [], b"", self.page_size
        for i in range(count):
            prev = hashlib.blake2b(prev + np.asarray(tokens[i * p:(i + 1) * p], np.int64)
                                   .tobytes(), digest_size=16).digest()
            out.append(prev)
        return out

    @staticmethod
    def tail_key(prev: bytes, tokens: Sequence[int]) -> bytes:
        """Key of a partial page: its tokens after the prefix named by `prev` (the key of the
        full page before it, or b"" for the first page); never equal to a full page's key."""
        return hashlib.blake2b(prev + np.asarray(tokens, np.int64).tobytes(), digest_size=16,
                               person=b"tail").digest()

    def match(self, tokens: Sequence[int]) -> tuple[list[int], int]:
        """(page ids, tokens they hold) of the longest stored prefix of `tokens`: full pages,
        then at most one partial page (the longest stored tail of the next page), held until
        `release`. Found pages become the most recently used, deepest first, so a prefix's
        first pages outlive its later ones (a later page is useless without them)."""
        p = self.page_size
        found: list[tuple[bytes, int]] = []
        for key in self.keys(tokens, len(tokens) // p):
            page = self.pages.get(key)
            if page is None:
                break
            found.append((key, page))
        cached = len(found) * p
        prev = found[-1][0] if found else b""
        for m in range(min(p - 1, len(tokens) - cached), 0, -1):
            key = self.tail_key(prev, tokens[cached:cached + m])
            if key in self.pages:
                found.append((key, self.pages[key]))
                cached += m
                break
        for key, _ in reversed(found):
            self.pages.move_to_end(key)
        self.hits += cached
        self.looked_up += len(tokens)
        pages = [page for _, page in found]
        for page in pages:
            self.refs[page] = self.refs.get(page, 0) + 1
        return pages, cached

    @staticmethod
    def row_key(tokens: Sequence[int]) -> bytes:
        return hashlib.blake2b(np.asarray(tokens, np.int64).tobytes(), digest_size=16,
                               person=b"end").digest()

    def end(self, tokens: Sequence[int]) -> np.ndarray | None:
        """The stored hidden state at the last of `tokens`, if any (most recently used now)."""
        key = self.row_key(tokens)
        hidden = self.ends.get(key)
        if hidden is not None:
            self.ends.move_to_end(key)
        return hidden

    def store_end(self, tokens: Sequence[int], hidden: np.ndarray) -> None:
        """Keep `hidden`, the state at the last of `tokens`, for as many rows as there are
        pages (a row's end is useless without its pages, and a few KB beside them)."""
        key = self.row_key(tokens)
        self.ends[key] = hidden
        self.ends.move_to_end(key)
        while len(self.ends) > self.num_pages:
            self.ends.popitem(last=False)

    def release(self, pages: Sequence[int]) -> None:
        """The pages of a `match` have been copied: they may be evicted again."""
        for page in pages:
            self.refs[page] -= 1
            if not self.refs[page]:
                del self.refs[page]

    def _evict(self, keep: set[int]) -> bool:
        """Free the least recently used page that is neither held nor in `keep`."""
        for key, page in self.pages.items():
            if page not in self.refs and page not in keep:
                del self.pages[key]
                self.free.append(page)
                return True
        return False

    def allocate(self, rows: Sequence[tuple[Sequence[int], int]]) -> list[list[tuple[int, int]]]:
        """Pages for every row's full pages from `first` on and its partial last page (`rows`:
        (tokens, first)) that are not stored yet, evicting least recently used pages when none
        is free → per row `[(page index in its tokens, page id)]`, for the caller to fill
        (`PagePool.store`) before anything else reads the pool. Pages handed out by this call
        are never evicted by it (one store must not write a page twice); past that budget the
        rest is not stored."""
        out: list[list[tuple[int, int]]] = []
        fresh: set[int] = set()
        p = self.page_size
        for tokens, first in rows:
            full = self.keys(tokens, len(tokens) // p)
            wanted = [(i, key) for i, key in enumerate(full) if i >= first]
            if len(tokens) % p:
                tail = tokens[len(full) * p:]
                wanted.append((len(full), self.tail_key(full[-1] if full else b"", tail)))
            row = []
            for i, key in wanted:
                if key in self.pages:
                    continue
                if not self.free and not self._evict(fresh):
                    break
                page = self.free.pop()
                self.pages[key] = page
                fresh.add(page)
                row.append((i, page))
            out.append(row)
        return out

    def clear(self) -> None:
        """Forget every page (new weights make every stored KV stale)."""
        if self.refs:
            raise RuntimeError("pages are held by a lookup that was not released")
        self.free += list(self.pages.values())
        self.pages.clear()
        self.ends.clear()


class PagePool(flax.struct.PyTreeNode):
    """The pages: per layer, K as [pages, KV heads, head_dim, P] and V as [pages, KV heads, P,
    head_dim] — the same per-position layout as `KVCache`, cut into pages."""
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @classmethod
    def init(cls, cfg: DecoderConfig, num_pages: int, page_size: int) -> PagePool:
        """Zero pages: a pool is laid out as a cache of `num_pages` rows of `page_size` slots."""
        cache = KVCache.init(cfg, num_pages, page_size)
        return cls(k=cache.k, v=cache.v)

    @property
    def page_size(self) -> int:
        return self.k[0].shape[-1]

    def load(self, cache: KVCache, page_ids: jax.Array) -> KVCache:
        """Copy pages into cache slots: row r's slots [i·P, (i+1)·P) get page `page_ids[r, i]`.
        Entries past a row's prefix may name any page: those slots lie past the row's cached
        prefix, so the row's own tokens overwrite them before anything attends to them."""
        b, n = page_ids.shape
        width = n * self.page_size

        def put(dst, block):
            return jax.lax.dynamic_update_slice(dst, block.astype(dst.dtype), (0,) * dst.ndim)

        # K: [B, n, KVH, D, P] → [B, KVH, D, n·P];  V: [B, n, KVH, P, D] → [B, KVH, n·P, D].
        k = tuple(put(c, jnp.transpose(pool[page_ids], (0, 2, 3, 1, 4))
                      .reshape(b, *pool.shape[1:3], width)) for c, pool in zip(cache.k, self.k))
        v = tuple(put(c, jnp.transpose(pool[page_ids], (0, 2, 1, 3, 4))
                      .reshape(b, pool.shape[1], width, pool.shape[3]))
                  for c, pool in zip(cache.v, self.v))
        return KVCache(k=k, v=v)

    def store(self, cache: KVCache, rows: jax.Array, starts: jax.Array, page_ids: jax.Array
              ) -> PagePool:
        """Page `page_ids[i]` ← cache row `rows[i]`, slots [starts[i], starts[i] + P). Entries
        with a page id past the pool (padding) are dropped."""
        p = self.page_size

        def take_k(c):     # [B, KVH, D, S] → [R, KVH, D, P]
            return jax.vmap(lambda r, s: jax.lax.dynamic_slice_in_dim(c[r], s, p, axis=2))(
                rows, starts)

        def take_v(c):     # [B, KVH, S, D] → [R, KVH, P, D]
            return jax.vmap(lambda r, s: jax.lax.dynamic_slice_in_dim(c[r], s, p, axis=1))(
                rows, starts)

        k = tuple(pool.at[page_ids].set(take_k(c).astype(pool.dtype), mode="drop")
                  for pool, c in zip(self.k, cache.k))
        v = tuple(pool.at[page_ids].set(take_v(c).astype(pool.dtype), mode="drop")
                  for pool, c in zip(self.v, cache.v))
        return PagePool(k=k, v=v)
