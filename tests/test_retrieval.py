"""ScaNN recall vs exact search, movable indexes, clear errors, resumable embedding."""
import hashlib
import json
import shutil

import numpy as np
import pytest

from reasonrag_jax.config import RetrievalConfig
from reasonrag_jax.io import InputError
from reasonrag_jax.retrieval.corpus import iter_corpus
from reasonrag_jax.retrieval.index import (Retriever, build_index, build_scann, exact_search,
                                           load_scann, save_scann, scann_params)


def clustered(n, dim=384, clusters=200, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class FakeEncoder:
    """Deterministic text → unit vector (a hash seeds the RNG); counts passages, can fail."""

    name, dim = "fake", 16

    def __init__(self, fingerprint="fake-v1", fail_after=None):
        self._fingerprint, self.fail_after, self.encoded = fingerprint, fail_after, 0

    def fingerprint(self):
        return self._fingerprint

    def encode(self, texts, kind):
        if self.fail_after is not None and self.encoded >= self.fail_after:
            raise KeyboardInterrupt
        self.encoded += len(texts)
        seeds = [int(hashlib.sha256(t.encode()).hexdigest()[:8], 16) for t in texts]
        x = np.stack([np.random.default_rng(s).normal(size=self.dim) for s in seeds])
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_corpus(path, n):
    docs = [(f"doc-{i}", f"Title {i}\nPassage number {i} about topic {i % 7}.") for i in range(n)]
    path.write_text("".join(json.dumps({"id": i, "contents": c}) + "\n" for i, c in docs))
    return docs


def test_exact_search_is_exact():
    rng = np.random.default_rng(0)
    db, q = rng.normal(size=(1000, 16)).astype(np.float32), rng.normal(size=(7, 16)).astype(np.float32)
    idx, scores = exact_search(db, q, 5, block=128)
    want = np.argsort(-(q @ db.T), axis=1)[:, :5]
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ db.T, want, 1), rtol=1e-5)


def test_scann_params_by_size_and_overrides():
    assert scann_params(10_000, {})["mode"] == "brute"
    assert scann_params(50_000, {})["mode"] == "ah"
    assert scann_params(100_000, {})["num_leaves"] == 316
    big = scann_params(1_000_000, {"reorder": 300})
    assert (big["mode"], big["num_leaves"], big["reorder"]) == ("tree_ah", 1000, 300)
    with pytest.raises(InputError, match="unknown parameter"):
        scann_params(10, {"leaves": 3})


def test_scann_recall_and_move(tmp_path):
    db = clustered(50_000)
    rng = np.random.default_rng(1)
    queries = db[rng.integers(0, len(db), 500)] + 0.1 * rng.normal(size=(500, 384)).astype(np.float32)
    searcher = build_scann(db, scann_params(len(db), {"mode": "tree_ah", "num_leaves": 100,
                                                      "num_leaves_to_search": 15,
                                                      "training_sample_size": 25_000,
                                                      "reorder": 200}))
    got, _ = searcher.search_batched(queries, final_num_neighbors=10)
    want, _ = exact_search(db, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(np.asarray(got), want)])
    assert recall >= 0.95
    save_scann(searcher, tmp_path / "a")
    assert str(tmp_path) not in (tmp_path / "a" / "scann_assets.pbtxt").read_text()
    moved = tmp_path / "elsewhere" / "b"
    moved.parent.mkdir()
    shutil.move(str(tmp_path / "a"), str(moved))
    again, _ = load_scann(moved).search_batched(queries, final_num_neighbors=10)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(got))


@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_build_move_load_search(tmp_path, backend):
    docs = write_corpus(tmp_path / "corpus.jsonl", 300)
    cfg = RetrievalConfig(backend=backend, chunk_size=64, embed_batch_size=16)
    built = build_index(tmp_path / "corpus.jsonl", tmp_path / "idx", cfg, encoder=FakeEncoder())
    assert not list(tmp_path.glob(".idx*")), "no partial or work directory is left behind"
    queries = [docs[5][1], docs[250][1]]
    before = Retriever.load(built, cfg, encoder=FakeEncoder()).search(queries, k=3)
    shutil.move(str(built), str(tmp_path / "moved"))
    shutil.move(str(tmp_path / "corpus.jsonl"), str(tmp_path / "corpus2.jsonl"))
    r = Retriever.load(tmp_path / "moved", cfg, encoder=FakeEncoder(), corpus=tmp_path / "corpus2.jsonl")
    after = r.search(queries, k=3)
    assert after == before
    assert [h[0].id for h in after] == ["doc-5", "doc-250"]
    assert after[1][0].contents == docs[250][1]
    assert after[0][0].score == pytest.approx(1.0, abs=2e-3)   # float16 embeddings on disk
    meta = json.loads((tmp_path / "moved" / "metadata.json").read_text())
    assert meta["doc_ids"] == [i for i, _ in docs] and meta["dim"] == 16 and meta["backend"] == backend


def test_wrong_encoder_or_corpus_is_a_clear_error(tmp_path):
    write_corpus(tmp_path / "corpus.jsonl", 20)
    cfg = RetrievalConfig()
    build_index(tmp_path / "corpus.jsonl", tmp_path / "idx", cfg, encoder=FakeEncoder())
    with pytest.raises(InputError, match=r"built with encoder 'embedded' \(fake, weights fake-v1\) "
                                         r"but retrieval.encoder='embedded' is a different model"):
        Retriever.load(tmp_path / "idx", cfg, encoder=FakeEncoder("fake-v2"))
    with pytest.raises(InputError, match="built with pooling='mean' but the config has "
                                         "retrieval.pooling='cls'"):
        Retriever.load(tmp_path / "idx", RetrievalConfig(pooling="cls"), encoder=FakeEncoder())
    write_corpus(tmp_path / "other.jsonl", 21)
    with pytest.raises(InputError, match="built from a different corpus than"):
        Retriever.load(tmp_path / "idx", cfg, encoder=FakeEncoder(), corpus=tmp_path / "other.jsonl")
    with pytest.raises(InputError, match="not an index"):
        Retriever.load(tmp_path, cfg, encoder=FakeEncoder())


def test_interrupted_embedding_resumes_at_the_last_finished_chunk(tmp_path):
    write_corpus(tmp_path / "corpus.jsonl", 50)
    cfg = RetrievalConfig(chunk_size=10, embed_batch_size=5)
    with pytest.raises(KeyboardInterrupt):
        build_index(tmp_path / "corpus.jsonl", tmp_path / "idx", cfg, encoder=FakeEncoder(fail_after=25))
    assert not (tmp_path / "idx").exists()
    (work,) = tmp_path.glob(".idx.embeddings-*")
    assert len(list(work.glob("chunk-*.npy"))) == 2          # chunk 3 was cut mid-way
    resumed = FakeEncoder()
    build_index(tmp_path / "corpus.jsonl", tmp_path / "idx", cfg, encoder=resumed)
    assert resumed.encoded == 30
    fresh = build_index(tmp_path / "corpus.jsonl", tmp_path / "fresh", cfg, encoder=FakeEncoder())
    np.testing.assert_array_equal(np.load(tmp_path / "idx" / "embeddings.npy"),
                                  np.load(fresh / "embeddings.npy"))


@pytest.mark.parametrize("content, message", [
    (b"", "c.jsonl: file is empty"),
    (b'{"id": "1", "contents": "T\\nx"}\n{"id": "2"}\n', "c.jsonl:2: field 'contents' is missing"),
    (b'{"id": "1", "contents": "T\\nx"}\n{"id": "1", "contents": "U\\ny"}\n',
     "c.jsonl:2: field 'id': duplicate"),
    (b'{"id": "1", "contents": "  "}\n', "c.jsonl:1: field 'contents' is empty"),
    (b'{"id": "1", "contents": "T\\nx"}\n{"id": "2", "cont', "c.jsonl:2: invalid JSON"),
])
def test_bad_corpus(tmp_path, content, message):
    path = tmp_path / "c.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        list(iter_corpus(path))
    with pytest.raises(InputError, match=message):
        build_index(path, tmp_path / "idx", RetrievalConfig(), encoder=FakeEncoder())


@pytest.mark.slow
def test_index_end_to_end_with_the_embedded_encoder(tmp_path):
    """The real MiniLM: build with the default config, move, load, find the right passages."""
    corpus = tmp_path / "corpus.jsonl"
    docs = [("city-0", "Zyper\nZyper is a city in Poumkuquex. It was founded in 1562."),
            ("person-0", "Ada Quill\nAda Quill was born in Zyper in 1930."),
            ("work-0", "The Voyage\nThe Voyage is a 1961 film directed by Ada Quill.")]
    corpus.write_text("".join(json.dumps({"id": i, "contents": c}) + "\n" for i, c in docs))
    cfg = RetrievalConfig(chunk_size=2, embed_batch_size=2)
    built = build_index(corpus, tmp_path / "idx", cfg)
    shutil.move(str(built), str(tmp_path / "moved"))
    retriever = Retriever.load(tmp_path / "moved", cfg)
    hits = retriever.search(["where was Ada Quill born", "who directed The Voyage"], k=2)
    assert [h[0].id for h in hits] == ["person-0", "work-0"]
    np.testing.assert_allclose(np.load(tmp_path / "moved" / "embeddings.npy").astype(np.float32),
                               retriever.encoder.encode([c for _, c in docs], "passage"), atol=2e-3)
