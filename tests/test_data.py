"""QA reader errors, and the synthetic knowledge base: deterministic and answerable."""
import json

import pytest

from reasonrag_jax.data.qa import read_qa
from reasonrag_jax.data.synthetic import write_synthetic
from reasonrag_jax.io import InputError, read_jsonl


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("kb"), seed=3, num_entities=120)


def test_synthetic_is_deterministic(synth, tmp_path):
    again = write_synthetic(tmp_path, seed=3, num_entities=120)
    for name, path in synth.items():
        assert path.read_bytes() == again[name].read_bytes(), name
    other = write_synthetic(tmp_path / "other", seed=4, num_entities=120)
    assert other["corpus"].read_bytes() != synth["corpus"].read_bytes()


def test_every_gold_chain_is_answerable_from_the_corpus(synth):
    corpus = {obj["id"]: obj["contents"] for _, obj in read_jsonl(synth["corpus"])}
    hops = set()
    for split in ("train", "dev", "test"):
        for ex in read_qa(synth[split]):
            chain = ex.metadata["gold_chain"]
            hops.add(ex.metadata["hops"])
            assert ex.metadata["hops"] == len(chain)
            for link, nxt in zip(chain, chain[1:] + [None]):
                assert link["evidence"] in corpus[link["doc_id"]]
                if nxt is not None and ex.metadata["type"] == "composition":
                    # the evidence names the entity the next hop asks about
                    assert nxt["query"].rsplit(" ", 1)[0] in link["evidence"]
            if ex.metadata["type"] == "comparison":
                assert ex.golden_answers[0] in ex.question
            else:
                assert ex.golden_answers[0] in chain[-1]["evidence"]
    assert hops == {1, 2, 3}


def test_splits_are_disjoint(synth):
    questions = [ex.question for s in ("train", "dev", "test") for ex in read_qa(synth[s])]
    assert len(questions) == len(set(questions))


@pytest.mark.parametrize("line, message", [
    ({"id": "a", "question": "q?"}, "field 'golden_answers' is missing"),
    ({"id": "a", "question": "q?", "golden_answers": []}, "field 'golden_answers' should be a non-empty"),
    ({"id": "a", "question": " ", "golden_answers": ["x"]}, "field 'question' is empty"),
    ({"id": 3, "question": "q?", "golden_answers": ["x"]}, "field 'id' should be str"),
    ({"id": "a", "question": "q?", "golden_answers": ["x"], "metadata": [1]}, "field 'metadata'"),
])
def test_bad_qa_lines(tmp_path, line, message):
    path = tmp_path / "qa.jsonl"
    ok = {"id": "ok", "question": "fine?", "golden_answers": ["y"]}
    path.write_text(json.dumps(ok) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(InputError, match=r"qa.jsonl:2: " + message[:20]):
        read_qa(path)
