"""Corpus → on-disk embeddings, in resumable chunks, for corpora larger than RAM.

Each chunk of `chunk_size` passages is embedded and saved as `chunk-XXXXX.npy` (written under a
temporary name, then renamed), so a killed run restarts at the first missing chunk. Inside a
chunk, passages are sorted by length so a batch pads little (length bucketing); the encoder
pads the batch to a power-of-two length, so only a handful of shapes are ever compiled.

In a job of P processes (a pod), process i embeds chunks i, i + P, i + 2P, ... on its own
devices; the chunk directory must then be on storage every process shares.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from reasonrag_jax.retrieval.corpus import batched, iter_corpus


def embed_texts(encoder, texts: list[str], batch_size: int, kind: str,
                bar: tqdm | None = None) -> np.ndarray:
    """float32 [N, dim] embeddings in input order, batched by similar length."""
    out = np.zeros((len(texts), encoder.dim), np.float32)
    order = np.argsort([len(t) for t in texts], kind="stable")
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        out[idx] = encoder.encode([texts[i] for i in idx], kind)
        if bar is not None:
            bar.update(len(idx))
    return out


def embed_corpus(encoder, corpus: str | os.PathLike, work: Path, chunk_size: int,
                 batch_size: int, dtype: str = "float16") -> list[str]:
    """Embed this process's share of `corpus` into chunk files under `work` (skipping finished
    ones); returns the doc ids of the whole corpus."""
    work.mkdir(parents=True, exist_ok=True)
    ids: list[str] = []
    with tqdm(desc="embed", unit="passage") as bar:
        for c, chunk in enumerate(batched(iter_corpus(corpus), chunk_size)):
            ids.extend(i for i, _ in chunk)
            path = work / f"chunk-{c:05d}.npy"
            if c % jax.process_count() != jax.process_index():
                continue
            if path.exists():
                bar.update(len(chunk))
                continue
            emb = embed_texts(encoder, [t for _, t in chunk], batch_size, "passage", bar)
            tmp = work / f".chunk-{c:05d}.tmp.npy"
            np.save(tmp, emb.astype(dtype))
            os.replace(tmp, path)
    return ids


def gather_chunks(work: Path, n: int, dim: int, dtype: str, out: Path) -> np.memmap:
    """Concatenate the chunk files into one `.npy` on disk, never holding more than a chunk."""
    arr = np.lib.format.open_memmap(out, mode="w+", dtype=dtype, shape=(n, dim))
    lo = 0
    for path in sorted(work.glob("chunk-*.npy")):
        part = np.load(path)
        arr[lo:lo + len(part)] = part
        lo += len(part)
    if lo != n:
        raise RuntimeError(f"{work}: chunks hold {lo} embeddings, the corpus has {n} (in a "
                           "multi-process job, --out must be on storage every process shares)")
    arr.flush()
    return arr
