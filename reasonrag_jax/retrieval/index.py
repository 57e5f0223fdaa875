"""Dense retrieval index: embeddings → ScaNN or exact (matmul) search → passages.

An index directory holds `metadata.json` (doc ids, encoder and its weights checksum, dim,
corpus checksum, backend, ScaNN parameters), `passages.jsonl` + `offsets.npy` (the corpus
text, read lazily through mmap so a moved index needs nothing else and 21M passages do not
sit in RAM), `embeddings.npy` and, for ScaNN, `scann/` serialised with relative asset paths so
the directory can move. It is built under a temporary name and renamed when complete.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import mmap
import shutil
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reasonrag_jax.config import EMBEDDED, RetrievalConfig
from reasonrag_jax.io import InputError, atomic_dir, file_checksum
from reasonrag_jax.logs import get_logger
from reasonrag_jax.retrieval.corpus import iter_corpus
from reasonrag_jax.retrieval.embed import embed_corpus, embed_texts, gather_chunks
from reasonrag_jax.sharding import lead_process, sync_processes

log = get_logger(__name__)
EXACT_MAX = 20_000   # up to this many passages exact search is fast and needs no training
# ScaNN parameters that are also search-time knobs: `retrieval.scann` overrides them at load
SEARCH_KNOBS = {"num_leaves_to_search": "leaves_to_search", "reorder": "pre_reorder_num_neighbors"}


@dataclass(frozen=True)
class Passage:
    id: str
    contents: str     # "Title\ntext"
    score: float


def load_encoder(cfg: RetrievalConfig):
    from reasonrag_jax.models.encoder import TextEncoder, embedded_encoder_dir

    path = embedded_encoder_dir() if cfg.encoder == EMBEDDED else Path(cfg.encoder)
    return TextEncoder(path, pooling=cfg.pooling, normalize=cfg.normalize,
                       max_length=cfg.max_length, query_prefix=cfg.query_prefix,
                       passage_prefix=cfg.passage_prefix)


def encoder_id(cfg: RetrievalConfig, encoder) -> dict[str, Any]:
    """What must match between index time and query time (the weights by checksum, not path)."""
    return {"encoder_fingerprint": encoder.fingerprint(), "dim": encoder.dim,
            "pooling": cfg.pooling, "normalize": cfg.normalize, "max_length": cfg.max_length,
            "query_prefix": cfg.query_prefix, "passage_prefix": cfg.passage_prefix}


def scann_params(n: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """Brute force for small corpora, AH + reorder, then tree + AH + reorder with √n leaves."""
    if n < EXACT_MAX:
        params: dict[str, Any] = {"mode": "brute"}
    elif n < 100_000:
        params = {"mode": "ah", "dims_per_block": 2, "reorder": 100, "training_sample_size": 100_000}
    else:
        leaves = int(math.sqrt(n))
        params = {"mode": "tree_ah", "num_leaves": leaves, "num_leaves_to_search": max(1, leaves // 20),
                  "training_sample_size": min(n, 250_000), "dims_per_block": 2, "reorder": 200}
    unknown = set(overrides) - {"mode", "num_leaves", "num_leaves_to_search", "training_sample_size",
                                "dims_per_block", "reorder", "threshold"}
    if unknown:
        raise InputError(f"retrieval.scann: unknown parameter(s) {sorted(unknown)}")
    params.update(overrides)
    if params["mode"] not in ("brute", "ah", "tree_ah"):
        raise InputError(f"retrieval.scann.mode: {params['mode']!r} is not brute, ah or tree_ah")
    return params


def build_scann(db: np.ndarray, params: dict[str, Any], k: int = 10):
    from scann.scann_ops.py import scann_ops_pybind as pybind

    builder = pybind.builder(np.ascontiguousarray(db, np.float32), k, "dot_product")
    if params["mode"] == "brute":
        return builder.score_brute_force().build()
    if params["mode"] == "tree_ah":
        builder = builder.tree(num_leaves=params["num_leaves"],
                               num_leaves_to_search=params["num_leaves_to_search"],
                               training_sample_size=params["training_sample_size"])
    return (builder.score_ah(params["dims_per_block"],
                             anisotropic_quantization_threshold=params.get("threshold", 0.2),
                             training_sample_size=params["training_sample_size"])
            .reorder(params["reorder"]).build())


def save_scann(searcher, scann_dir: Path) -> None:
    """Serialise with asset paths relative to `scann_dir` (ScaNN writes absolute ones by default)."""
    scann_dir.mkdir()
    searcher.serialize(str(scann_dir), relative_path=True)


def load_scann(scann_dir: Path):
    """Load a serialised searcher; relative asset paths resolve against `scann_dir`, wherever it is."""
    from scann.scann_ops.py import scann_ops_pybind as pybind

    assets = (scann_dir / "scann_assets.pbtxt").read_text()
    return pybind.ScannSearcher(pybind.scann_pybind.ScannNumpy(str(scann_dir), assets))


def _work_dir(out_dir: Path, checksum: str, ident: dict[str, Any], dtype: str, chunk: int) -> Path:
    """Embedding chunks are keyed by corpus, encoder and chunking, so a resume never mixes runs."""
    key = hashlib.sha256(json.dumps([checksum, ident, dtype, chunk], sort_keys=True).encode())
    return out_dir.parent / f".{out_dir.name}.embeddings-{key.hexdigest()[:12]}"


def _backend(cfg: RetrievalConfig, n: int) -> str:
    """`auto` → exact up to EXACT_MAX passages, else ScaNN; ScaNN where it is not installed
    (its wheels are Linux-only) → exact, with a one-line notice."""
    backend = cfg.backend if cfg.backend != "auto" else ("exact" if n <= EXACT_MAX else "scann")
    if backend == "scann" and importlib.util.find_spec("scann") is None:
        log.warning("ScaNN is not installed (Linux-only wheels): using exact search")
        return "exact"
    return backend


def _write_index(corpus: Path, out_dir: Path, cfg: RetrievalConfig, ids: list[str],
                 write_embeddings: Callable[[Path], np.ndarray], meta: dict[str, Any]) -> Path:
    """The index directory (atomic): embeddings written by `write_embeddings(path)`, the corpus
    text, ScaNN when chosen, and `meta` plus the ids and backend."""
    backend = _backend(cfg, len(ids))
    meta = {"doc_ids": ids, "num_passages": len(ids), "backend": backend,
            "embed_dtype": cfg.embed_dtype, **meta}
    with atomic_dir(out_dir) as tmp:
        emb = write_embeddings(tmp / "embeddings.npy")
        offsets = array("q", [0])
        with open(tmp / "passages.jsonl", "wb") as f:
            for doc_id, contents in iter_corpus(corpus):
                line = json.dumps({"id": doc_id, "contents": contents}, ensure_ascii=False) + "\n"
                offsets.append(offsets[-1] + f.write(line.encode("utf-8")))
        np.save(tmp / "offsets.npy", np.frombuffer(offsets, np.int64))
        if backend == "scann":
            meta["scann"] = scann_params(len(ids), cfg.scann)
            save_scann(build_scann(emb, meta["scann"]), tmp / "scann")
        del emb
        (tmp / "metadata.json").write_text(json.dumps(meta))
    return out_dir


def build_index(corpus: str | Path, out_dir: str | Path, cfg: RetrievalConfig, encoder=None) -> Path:
    """Embed `corpus` and build the index at `out_dir` (atomic; embedding resumes by chunk)."""
    corpus, out_dir = Path(corpus), Path(out_dir)
    checksum = file_checksum(corpus)
    encoder = encoder or load_encoder(cfg)
    ident = encoder_id(cfg, encoder)
    work = _work_dir(out_dir, checksum, ident, cfg.embed_dtype, cfg.chunk_size)
    ids = embed_corpus(encoder, corpus, work, cfg.chunk_size, cfg.embed_batch_size, cfg.embed_dtype)
    sync_processes(f"embedded {work}")
    if not lead_process():                       # the lead builds from every process's chunks
        sync_processes(f"built {out_dir}")
        return out_dir
    meta = {"corpus_checksum": checksum, "corpus": str(corpus), "encoder": cfg.encoder,
            "encoder_name": encoder.name, **ident}
    _write_index(corpus, out_dir, cfg, ids, lambda path: gather_chunks(
        work, len(ids), encoder.dim, cfg.embed_dtype, path), meta)
    shutil.rmtree(work, ignore_errors=True)
    sync_processes(f"built {out_dir}")
    return out_dir


def read_faiss_flat(path: Path) -> Any:
    """A FAISS Flat index (FlashRAG's prebuilt `e5_Flat.index`, ...) opened for its vectors."""
    try:
        import faiss
    except ImportError:
        raise InputError(f"{path}: reading a FAISS index needs faiss-cpu "
                         "(pip install 'reasonrag-jax[faiss]')") from None
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)   # already the concrete class
    except RuntimeError as e:
        raise InputError(f"{path}: not a FAISS index ({str(e).splitlines()[-1]})") from None
    if not isinstance(index, faiss.IndexFlat):
        raise InputError(f"{path}: a FAISS {type(index).__name__} holds no exact vectors "
                         "(only Flat indexes can be read back)")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise InputError(f"{path}: FAISS metric {index.metric_type} is not inner product, "
                         "which is what this retriever searches")
    return index


def build_index_from_faiss(faiss_file: str | Path, corpus: str | Path, out_dir: str | Path,
                           cfg: RetrievalConfig, encoder=None, block: int = 1 << 16) -> Path:
    """An index from the vectors of a FAISS Flat index instead of embedding the corpus again
    (wiki-18 would take days to embed on a CPU). Row i of the FAISS index is line i of the
    corpus; counts and the encoder's dimension must agree. Lead process only."""
    faiss_file, corpus, out_dir = Path(faiss_file), Path(corpus), Path(out_dir)
    index = read_faiss_flat(faiss_file)
    encoder = encoder or load_encoder(cfg)
    ids = [doc_id for doc_id, _ in iter_corpus(corpus)]
    if index.ntotal != len(ids):
        raise InputError(f"{faiss_file}: holds {index.ntotal} vectors but {corpus} has "
                         f"{len(ids)} passages")
    if index.d != encoder.dim:
        raise InputError(f"{faiss_file}: vectors have dimension {index.d} but encoder "
                         f"{encoder.name} embeds into {encoder.dim}")

    def write(path: Path) -> np.ndarray:
        emb = np.lib.format.open_memmap(path, mode="w+", dtype=cfg.embed_dtype,
                                        shape=(len(ids), index.d))
        for lo in range(0, len(ids), block):
            n = min(block, len(ids) - lo)
            emb[lo:lo + n] = index.reconstruct_n(lo, n)
        emb.flush()
        return emb

    meta = {"corpus_checksum": file_checksum(corpus), "corpus": str(corpus),
            "encoder": cfg.encoder, "encoder_name": encoder.name, "faiss": str(faiss_file),
            **encoder_id(cfg, encoder)}
    return _write_index(corpus, out_dir, cfg, ids, write, meta)


class Retriever:
    """Batched top-k search over a built index directory."""

    def __init__(self, index_dir: Path, meta: dict[str, Any], encoder, embeddings: np.ndarray,
                 scann_searcher=None, scann_knobs: dict[str, int] | None = None,
                 batch_size: int = 64):
        self.index_dir, self.meta, self.encoder = index_dir, meta, encoder
        self.embeddings, self.scann, self.batch_size = embeddings, scann_searcher, batch_size
        self.scann_knobs = scann_knobs or {}
        self.doc_ids: list[str] = meta["doc_ids"]
        self._offsets = np.load(index_dir / "offsets.npy")
        with open(index_dir / "passages.jsonl", "rb") as f:
            self._text = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    @classmethod
    def load(cls, index_dir: str | Path, cfg: RetrievalConfig, encoder=None,
             corpus: str | Path | None = None) -> Retriever:
        """Open an index; a different encoder (or `corpus`, when given) is a clear InputError."""
        index_dir = Path(index_dir)
        meta_file = index_dir / "metadata.json"
        if not meta_file.is_file():
            raise InputError(f"{index_dir}: not an index (no metadata.json); build it with "
                             "`reasonrag-jax index`")
        meta = json.loads(meta_file.read_text())
        encoder = encoder or load_encoder(cfg)
        for key, value in encoder_id(cfg, encoder).items():
            if meta.get(key) == value:
                continue
            if key == "encoder_fingerprint":
                raise InputError(
                    f"{meta_file}: index was built with encoder {meta['encoder']!r} "
                    f"({meta['encoder_name']}, weights {meta[key][:12]}) but retrieval.encoder="
                    f"{cfg.encoder!r} is a different model ({encoder.name}, weights {value[:12]})")
            raise InputError(f"{meta_file}: index was built with {key}={meta.get(key)!r} but "
                             f"the config has retrieval.{key}={value!r}")
        if corpus is not None and file_checksum(corpus) != meta["corpus_checksum"]:
            raise InputError(f"{meta_file}: index was built from a different corpus than {corpus} "
                             f"(checksum {meta['corpus_checksum'][:12]}); rebuild it")
        emb = np.load(index_dir / "embeddings.npy", mmap_mode="r")
        if emb.shape != (meta["num_passages"], meta["dim"]):
            raise InputError(f"{index_dir / 'embeddings.npy'}: shape {emb.shape} does not match "
                             f"metadata ({meta['num_passages']}, {meta['dim']})")
        scann = meta["backend"] == "scann" and importlib.util.find_spec("scann") is not None
        if meta["backend"] == "scann" and not scann:
            log.warning("ScaNN is not installed (Linux-only wheels): searching %s exactly",
                        index_dir)
        if not scann:
            emb = np.asarray(emb, np.float32)
        searcher = load_scann(index_dir / "scann") if scann else None
        knobs = {kw: int(cfg.scann[key]) for key, kw in SEARCH_KNOBS.items() if key in cfg.scann}
        return cls(index_dir, meta, encoder, emb, searcher, knobs, cfg.embed_batch_size)

    def passage(self, j: int, score: float) -> Passage:
        obj = json.loads(self._text[self._offsets[j]:self._offsets[j + 1]])
        return Passage(obj["id"], obj["contents"], score)

    def search_vectors(self, queries: np.ndarray, k: int, exact: bool = False
                       ) -> tuple[np.ndarray, np.ndarray]:
        """(indices [Q, k], scores [Q, k]) for query embeddings; `exact` bypasses ScaNN."""
        queries = np.ascontiguousarray(queries, np.float32)
        if self.scann is not None and not exact:
            idx, scores = self.scann.search_batched_parallel(queries, k, **self.scann_knobs)
            return np.asarray(idx), np.asarray(scores)
        return exact_search(self.embeddings, queries, k)

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        if not queries:
            return []
        vecs = embed_texts(self.encoder, queries, self.batch_size, "query")
        idx, scores = self.search_vectors(vecs, k)
        return [[self.passage(int(j), float(s)) for j, s in zip(row, srow)]
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
