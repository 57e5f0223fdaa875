"""Encoder parity with transformers, ScaNN recall vs exact search, movable indexes, bad corpora."""
import json
import shutil

import numpy as np
import pytest

from reasonrag_jax.config import RetrievalConfig
from reasonrag_jax.io import InputError
from reasonrag_jax.retrieval.index import (Retriever, _load_scann, _relativise_assets, build_index,
                                           build_scann, exact_search, read_corpus, scann_params)


def clustered(n, dim=384, clusters=200, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def vectors():
    db = clustered(50_000)
    rng = np.random.default_rng(1)
    queries = db[rng.integers(0, len(db), 500)] + 0.1 * rng.normal(size=(500, 384)).astype(np.float32)
    return db, queries


def test_exact_search_is_exact():
    rng = np.random.default_rng(0)
    db, q = rng.normal(size=(1000, 16)).astype(np.float32), rng.normal(size=(7, 16)).astype(np.float32)
    idx, scores = exact_search(db, q, 5, block=128)
    want = np.argsort(-(q @ db.T), axis=1)[:, :5]
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ db.T, want, 1), rtol=1e-5)


def test_scann_recall_and_move(vectors, tmp_path):
    db, queries = vectors
    params = scann_params(len(db), {})
    assert params["mode"] == "ah"
    searcher = build_scann(db, params)
    got, _ = searcher.search_batched(queries, final_num_neighbors=10)
    want, _ = exact_search(db, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(np.asarray(got), want)])
    assert recall >= 0.95
    first = tmp_path / "a"
    first.mkdir()
    searcher.serialize(str(first))
    _relativise_assets(first)
    assert str(first) not in (first / "scann_assets.pbtxt").read_text()
    moved = tmp_path / "elsewhere" / "b"
    moved.parent.mkdir()
    shutil.move(str(first), str(moved))
    again, _ = _load_scann(moved).search_batched(queries, final_num_neighbors=10)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(got))


@pytest.mark.parametrize("content, message", [
    (b"", "c.jsonl: file is empty"),
    (b'{"id": "1", "contents": "T\\nx"}\n{"id": "2"}\n', "c.jsonl:2: field 'contents' is missing"),
    (b'{"id": "1", "contents": "T\\nx"}\n{"id": "1", "contents": "U\\ny"}\n', "c.jsonl:2: field 'id': duplicate"),
    (b'{"id": "1", "contents": "  "}\n', "c.jsonl:1: field 'contents' is empty"),
    (b'{"id": "1", "contents": "T\\nx"}\n{"id": "2", "cont', "c.jsonl:2: invalid JSON"),
])
def test_bad_corpus(tmp_path, content, message):
    path = tmp_path / "c.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        read_corpus(path)


@pytest.mark.slow
def test_index_end_to_end_with_the_embedded_encoder(tmp_path):
    """MiniLM in Flax equals transformers' BertModel + mean pooling; the built index moves."""
    import torch
    import transformers

    corpus = tmp_path / "corpus.jsonl"
    docs = [("city-0", "Zyper\nZyper is a city in Poumkuquex. It was founded in 1562."),
            ("person-0", "Ada Quill\nAda Quill was born in Zyper in 1930."),
            ("work-0", "The Voyage\nThe Voyage is a 1961 film directed by Ada Quill.")]
    corpus.write_text("".join(json.dumps({"id": i, "contents": c}) + "\n" for i, c in docs))
    cfg = RetrievalConfig(chunk_size=2, embed_batch_size=2)
    built = build_index(corpus, tmp_path / "idx", cfg)
    moved = tmp_path / "moved"
    shutil.move(str(built), str(moved))
    retriever = Retriever.load(moved, cfg)
    hits = retriever.search(["where was Ada Quill born", "who directed The Voyage"], k=2)
    assert [h[0].id for h in hits] == ["person-0", "work-0"]

    enc = retriever.encoder
    ours = enc.encode([c for _, c in docs], "passage")
    tok = transformers.AutoTokenizer.from_pretrained(str(enc.path))
    bert = transformers.BertModel.from_pretrained(str(enc.path)).eval()
    batch = tok([c for _, c in docs], padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = bert(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    np.testing.assert_allclose(np.load(moved / "embeddings.npy").astype(np.float32), ref, atol=2e-3)

    with pytest.raises(InputError, match="built with pooling='mean' but the config has retrieval.pooling='cls'"):
        Retriever.load(moved, RetrievalConfig(pooling="cls"))
