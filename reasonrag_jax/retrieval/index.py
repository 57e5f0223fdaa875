"""Dense retrieval: corpus → embeddings (chunked, resumable) → ScaNN or exact index → passages.

An index directory holds `metadata.json` (doc ids, encoder, dim, corpus checksum, backend and
ScaNN parameters), `passages.jsonl` (a copy of the corpus contents, so a moved index needs
nothing else) and `embeddings.npy` / `scann/`. It is built under a temporary name and renamed
when complete, so a half-built directory is never taken for a finished one.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from reasonrag_jax.config import EMBEDDED, RetrievalConfig
from reasonrag_jax.io import InputError, atomic_dir, file_checksum, read_jsonl, where

CORPUS_SCHEMA = {"id": str, "contents": str}
EXACT_MAX = 20_000   # below this many passages exact search is as fast as ScaNN and exact


@dataclass(frozen=True)
class Passage:
    id: str
    contents: str     # "Title\ntext"
    score: float


def read_corpus(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(ids, contents) of a FlashRAG corpus, streaming with line-numbered errors."""
    ids, contents = [], []
    for lineno, obj in read_jsonl(path, CORPUS_SCHEMA, unique="id"):
        if not obj["contents"].strip():
            raise InputError(f"{where(path, lineno, 'contents')} is empty")
        ids.append(obj["id"])
        contents.append(obj["contents"])
    return ids, contents


def load_encoder(cfg: RetrievalConfig):
    from reasonrag_jax.models.encoder import TextEncoder, embedded_encoder_dir

    path = embedded_encoder_dir() if cfg.encoder == EMBEDDED else Path(cfg.encoder)
    return TextEncoder(path, pooling=cfg.pooling, normalize=cfg.normalize,
                       max_length=cfg.max_length, query_prefix=cfg.query_prefix,
                       passage_prefix=cfg.passage_prefix)


def encoder_id(cfg: RetrievalConfig) -> dict[str, Any]:
    """What must match between index time and query time."""
    return {"encoder": cfg.encoder, "pooling": cfg.pooling, "normalize": cfg.normalize,
            "max_length": cfg.max_length, "query_prefix": cfg.query_prefix,
            "passage_prefix": cfg.passage_prefix}


def embed_corpus(encoder, contents: list[str], work: Path, cfg: RetrievalConfig) -> np.ndarray:
    """Embed in chunks saved as `chunk-XXXXX.npy`; a re-run skips finished chunks.

    Inside a chunk, passages are sorted by length so each batch pads little.
    """
    work.mkdir(parents=True, exist_ok=True)
    n_chunks = max(1, math.ceil(len(contents) / cfg.chunk_size))
    dtype = np.dtype(cfg.embed_dtype)
    with tqdm(total=len(contents), desc="embed", unit="passage") as bar:
        for c in range(n_chunks):
            path = work / f"chunk-{c:05d}.npy"
            lo, hi = c * cfg.chunk_size, min(len(contents), (c + 1) * cfg.chunk_size)
            if path.exists():
                bar.update(hi - lo)
                continue
            texts = contents[lo:hi]
            order = np.argsort([len(t) for t in texts], kind="stable")
            out = np.zeros((hi - lo, encoder.dim), dtype)
            for s in range(0, len(order), cfg.embed_batch_size):
                idx = order[s:s + cfg.embed_batch_size]
                out[idx] = encoder.encode([texts[i] for i in idx], "passage")
                bar.update(len(idx))
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, out)
            os.replace(tmp, path)
    return np.concatenate([np.load(work / f"chunk-{c:05d}.npy") for c in range(n_chunks)])


def scann_params(n: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """Brute force for small corpora, AH + reorder, then tree + AH + reorder with √n leaves."""
    if n < 50_000:
        params = {"mode": "brute"}
    elif n < 500_000:
        params = {"mode": "ah", "dims_per_block": 2, "reorder": 100}
    else:
        leaves = int(math.sqrt(n))
        params = {"mode": "tree_ah", "num_leaves": leaves, "num_leaves_to_search": max(1, leaves // 20),
                  "training_sample_size": min(n, 250_000), "dims_per_block": 2, "reorder": 100}
    params.update(overrides)
    return params


def build_scann(db: np.ndarray, params: dict[str, Any], k: int = 10):
    import scann

    builder = scann.scann_ops_pybind.builder(np.ascontiguousarray(db, np.float32), k, "dot_product")
    if params["mode"] == "brute":
        return builder.score_brute_force().build()
    if params["mode"] == "tree_ah":
        builder = builder.tree(num_leaves=params["num_leaves"],
                               num_leaves_to_search=params["num_leaves_to_search"],
                               training_sample_size=params["training_sample_size"])
    return (builder.score_ah(params["dims_per_block"], anisotropic_quantization_threshold=0.2)
            .reorder(params["reorder"]).build())


def _relativise_assets(scann_dir: Path) -> None:
    """ScaNN writes absolute asset paths; store bare file names so the directory can move."""
    pbtxt = scann_dir / "scann_assets.pbtxt"
    text = pbtxt.read_text().replace(str(scann_dir.resolve()) + "/", "")
    pbtxt.write_text(text)


def _load_scann(scann_dir: Path):
    """Point the asset names at this directory in memory, then load (no pickle is read)."""
    import scann
    from scann.scann_ops.py import scann_ops_pybind as pybind

    text = (scann_dir / "scann_assets.pbtxt").read_text()
    for f in scann_dir.iterdir():
        text = text.replace(f'"{f.name}"', f'"{f.resolve()}"')
    del scann
    return pybind.ScannSearcher(pybind.scann_pybind.ScannNumpy(str(scann_dir), text), None)


def build_index(corpus: str | Path, out_dir: str | Path, cfg: RetrievalConfig) -> Path:
    """Embed `corpus` and build the index at `out_dir` (atomically; resumable embedding)."""
    corpus, out_dir = Path(corpus), Path(out_dir)
    ids, contents = read_corpus(corpus)
    checksum = file_checksum(corpus)
    work = out_dir.parent / f".{out_dir.name}.embeddings-{checksum[:12]}"
    encoder = load_encoder(cfg)
    emb = embed_corpus(encoder, contents, work, cfg)
    backend = cfg.backend if cfg.backend != "auto" else ("exact" if len(ids) <= EXACT_MAX else "scann")
    if backend not in ("exact", "scann"):
        raise InputError(f"retrieval.backend: {backend!r} is not auto, exact or scann")
    meta = {"doc_ids": ids, "dim": int(emb.shape[1]), "corpus_checksum": checksum,
            "corpus": str(corpus), "backend": backend, **encoder_id(cfg)}
    with atomic_dir(out_dir) as tmp:
        np.save(tmp / "embeddings.npy", emb)
        with open(tmp / "passages.jsonl", "w", encoding="utf-8") as f:
            for i, c in zip(ids, contents):
                f.write(json.dumps({"id": i, "contents": c}, ensure_ascii=False) + "\n")
        if backend == "scann":
            meta["scann"] = scann_params(len(ids), cfg.scann)
            searcher = build_scann(emb, meta["scann"])
            (tmp / "scann").mkdir()
            searcher.serialize(str(tmp / "scann"))
            _relativise_assets(tmp / "scann")
        (tmp / "metadata.json").write_text(json.dumps(meta))
    shutil.rmtree(work, ignore_errors=True)
    return out_dir


class Retriever:
    """Batched top-k search over a built index directory."""

    def __init__(self, index_dir: Path, meta: dict[str, Any], encoder, embeddings: np.ndarray,
                 contents: list[str], scann_searcher=None):
        self.index_dir, self.meta, self.encoder = index_dir, meta, encoder
        self.embeddings, self.contents, self.scann = embeddings, contents, scann_searcher
        self.doc_ids = meta["doc_ids"]

    @classmethod
    def load(cls, index_dir: str | Path, cfg: RetrievalConfig, encoder=None) -> Retriever:
        index_dir = Path(index_dir)
        meta_file = index_dir / "metadata.json"
        if not meta_file.is_file():
            raise InputError(f"{index_dir}: not an index (no metadata.json); build it with "
                             "`reasonrag-jax index`")
        meta = json.loads(meta_file.read_text())
        want = encoder_id(cfg)
        for key, value in want.items():
            if meta.get(key) != value:
                raise InputError(f"{meta_file}: index was built with {key}={meta.get(key)!r} but "
                                 f"the config has retrieval.{key}={value!r}")
        contents = [obj["contents"] for _, obj in read_jsonl(index_dir / "passages.jsonl")]
        emb = np.load(index_dir / "embeddings.npy", mmap_mode="r")
        searcher = _load_scann(index_dir / "scann") if meta["backend"] == "scann" else None
        return cls(index_dir, meta, encoder or load_encoder(cfg), emb, contents, searcher)

    def search_vectors(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices [Q, k], scores [Q, k]) for query embeddings."""
        if self.scann is not None:
            idx, scores = self.scann.search_batched(np.asarray(queries, np.float32), final_num_neighbors=k)
            return np.asarray(idx), np.asarray(scores)
        return exact_search(self.embeddings, queries, k)

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        if not queries:
            return []
        vecs = np.concatenate([self.encoder.encode(queries[i:i + 64], "query")
                               for i in range(0, len(queries), 64)])
        idx, scores = self.search_vectors(vecs, k)
        return [[Passage(self.doc_ids[j], self.contents[j], float(s)) for j, s in zip(row, srow)]
                for row, srow in zip(idx, scores)]


def exact_search(db: np.ndarray, queries: np.ndarray, k: int, block: int = 65536
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k, blocked over the database so memory stays bounded."""
    queries = np.asarray(queries, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    best_s = np.zeros((len(queries), 0), np.float32)
    for lo in range(0, len(db), block):
        s = queries @ np.asarray(db[lo:lo + block], np.float32).T
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        best_i = np.concatenate([best_i, part + lo], axis=1)
        best_s = np.concatenate([best_s, np.take_along_axis(s, part, axis=1)], axis=1)
        if best_i.shape[1] > k:
            keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
            best_i = np.take_along_axis(best_i, keep, axis=1)
            best_s = np.take_along_axis(best_s, keep, axis=1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, axis=1), np.take_along_axis(best_s, order, axis=1)
