"""QA reader errors; the synthetic knowledge base (deterministic, balanced, answerable,
unambiguous); the TFDS builders on tiny local files."""
import itertools
import json
import re
import time
from collections import Counter

import pytest

from ci import missing
from reasonrag_jax.data.qa import QAExample, read_qa, write_qa
from reasonrag_jax.data.synthetic import build_knowledge_base, write_splits, write_synthetic
from reasonrag_jax.eval.metrics import normalize_answer
from reasonrag_jax.io import InputError, read_jsonl

SPLITS = ("train", "dev", "test")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("kb"))          # the demo's defaults


@pytest.fixture(scope="module")
def corpus(synth):
    return {obj["id"]: obj["contents"] for _, obj in read_jsonl(synth["corpus"], unique="id")}


@pytest.fixture(scope="module")
def questions(synth):
    return {s: read_qa(synth[s]) for s in SPLITS}


# ---------------------------------------------------------------------------------------------
# synthetic data

def test_deterministic_and_fast(synth, tmp_path):
    start = time.process_time()
    again = write_synthetic(tmp_path / "again")
    assert time.process_time() - start < 2.0
    for name, path in synth.items():
        assert path.read_bytes() == again[name].read_bytes(), name
    other = write_synthetic(tmp_path / "other", seed=1)
    assert other["corpus"].read_bytes() != synth["corpus"].read_bytes()
    assert sorted(p.name for p in tmp_path.joinpath("again").iterdir()) == [
        "corpus.jsonl", "dev.jsonl", "test.jsonl", "train.jsonl"]   # no temp files left


def test_held_out_splits_do_not_depend_on_train_size(synth, tmp_path):
    small = write_synthetic(tmp_path, num_train=50)
    assert small["test"].read_bytes() == synth["test"].read_bytes()
    assert small["dev"].read_bytes() == synth["dev"].read_bytes()
    assert len(read_qa(small["train"])) == 50


def test_sizes_and_balance(synth, corpus, questions):
    assert len(corpus) == 300
    assert {s: len(q) for s, q in questions.items()} == {"train": 600, "dev": 100, "test": 100}
    assert Counter(ex.metadata["hops"] for ex in questions["train"]) == {1: 200, 2: 200, 3: 200}
    assert Counter(ex.metadata["hops"] for ex in questions["test"]) == {1: 34, 2: 33, 3: 33}
    # every prefix is balanced too (the demo evaluates the first N test questions)
    assert [ex.metadata["hops"] for ex in questions["test"][:6]] == [1, 2, 3, 1, 2, 3]
    types = Counter(ex.metadata["type"] for ex in questions["train"])
    assert set(types) == {"attribute", "composition", "comparison"}
    assert types["comparison"] >= 30
    ids = [ex.id for q in questions.values() for ex in q]
    texts = [ex.question for q in questions.values() for ex in q]
    assert len(set(ids)) == len(ids) and len(set(texts)) == len(texts)


def test_passages_are_flashrag_and_state_each_fact_once(corpus, questions):
    for contents in corpus.values():
        title, text = contents.split("\n")
        assert title and text.startswith(title) and text.count(". ") >= 2   # several sentences
    evidence = {h["evidence"] for q in questions.values() for ex in q
                for h in ex.metadata["gold_chain"]}
    for sentence in evidence:   # so each hop needs one specific retrieval
        assert sum(sentence in c for c in corpus.values()) == 1, sentence


def test_every_gold_chain_is_answerable(corpus, questions):
    titles = {doc_id: c.split("\n")[0] for doc_id, c in corpus.items()}
    for ex in (ex for q in questions.values() for ex in q):
        meta, (answer,) = ex.metadata, ex.golden_answers
        chain = meta["gold_chain"]
        assert meta["hops"] == len(chain) and 1 <= len(chain) <= 3
        for link in chain:
            assert link["evidence"] in corpus[link["doc_id"]]
            assert titles[link["doc_id"]] in link["query"]    # the query names its passage's entity
        if meta["type"] == "comparison":
            a, b = (titles[link["doc_id"]] for link in chain)
            assert ex.question.endswith(f"{a} or {b}?") and answer in (a, b)
            years = [int(re.findall(r"\b\d{4}\b", link["evidence"])[-1]) for link in chain]
            assert years[0] != years[1] and answer == (a, b)[years.index(min(years))]
        else:
            assert titles[chain[0]["doc_id"]] in ex.question   # the chain starts from the question
            for link, nxt in itertools.pairwise(chain):         # each hop finds the next entity
                assert titles[nxt["doc_id"]] in link["evidence"]
            assert answer in chain[-1]["evidence"] and answer not in ex.question


def test_answers_are_unambiguous():
    """Names are unique and none is inside another, so a right answer can't also be wrong."""
    kb = build_knowledge_base()
    names = [normalize_answer(d.title) for d in kb.docs]
    assert len(set(names)) == len(names)
    for a, b in itertools.permutations(names, 2):
        assert a not in b, (a, b)
    for p in kb.people.values():
        assert p.name.split()[1] in p.employer_fact


def test_small_knowledge_bases_still_work(tmp_path):
    """Too few questions for the asked sizes: every split gets its proportional share."""
    paths = write_synthetic(tmp_path, num_entities=20)
    sizes = {s: Counter(ex.metadata["hops"] for ex in read_qa(paths[s])) for s in SPLITS}
    assert all(set(c) == {1, 2, 3} for c in sizes.values())
    assert sizes["dev"] == sizes["test"]
    assert all(sizes["train"][h] >= 5 * sizes["test"][h] > 0 for h in (1, 2, 3))
    assert [ex.metadata["hops"] for ex in read_qa(paths["test"])[:3]] == [1, 2, 3]
    with pytest.raises(ValueError, match="at least 20"):
        build_knowledge_base(num_entities=19)


# ---------------------------------------------------------------------------------------------
# QA reader / writer

def test_qa_round_trip(tmp_path):
    examples = [QAExample("a", "Who?", ("X", "Y"), {"hops": 2}), QAExample("b", "Why?", ("Z",))]
    write_qa(tmp_path / "qa.jsonl", examples)
    back = read_qa(tmp_path / "qa.jsonl")
    assert back == examples and back[0].metadata == {"hops": 2} and back[1].metadata == {}


@pytest.mark.parametrize("line, message", [
    ({"id": "a", "question": "q?"}, "field 'golden_answers' is missing"),
    ({"id": "a", "question": "q?", "golden_answers": []}, "field 'golden_answers' should be"),
    ({"id": "a", "question": "q?", "golden_answers": ["x", " "]},
     "field 'golden_answers\\[1\\]' should be a non-empty string, got ' '"),
    ({"id": "a", "question": "q?", "golden_answers": ["x", 3]},
     "field 'golden_answers\\[1\\]' should be a non-empty string, got int"),
    ({"id": "a", "question": "q?", "golden_answers": "x"}, "field 'golden_answers' should be list"),
    ({"id": "a", "question": " ", "golden_answers": ["x"]}, "field 'question' is empty"),
    ({"id": "", "question": "q?", "golden_answers": ["x"]}, "field 'id' is empty"),
    ({"id": 3, "question": "q?", "golden_answers": ["x"]}, "field 'id' should be str, got int"),
    ({"id": "a", "question": "q?", "golden_answers": ["x"], "metadata": [1]},
     "field 'metadata' should be an object, got list"),
    ({"id": "ok", "question": "q?", "golden_answers": ["x"]}, "field 'id': duplicate value 'ok'"),
    ([1, 2], "expected a JSON object, got list"),
])
def test_bad_qa_lines(tmp_path, line, message):
    path = tmp_path / "qa.jsonl"
    ok = {"id": "ok", "question": "fine?", "golden_answers": ["y"]}
    path.write_text(json.dumps(ok) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(InputError, match=re.escape(f"{path}:2: ") + message) as err:
        read_qa(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("payload, message", [
    (b"", "file is empty"),
    (b'{"id": "a", "question": "q?", "golden_answers": ["x"]}\n{"id": "b", "quest',
     ":2: invalid JSON"),
    (b'{"id": "a", "question": "q\xff?", "golden_answers": ["x"]}\n', ":1: invalid UTF-8"),
])
def test_bad_qa_files(tmp_path, payload, message):
    path = tmp_path / "qa.jsonl"
    path.write_bytes(payload)
    with pytest.raises(InputError, match=re.escape(message)):
        read_qa(path)


# ---------------------------------------------------------------------------------------------
# TFDS builders (TensorFlow-free: array_record + as_data_source)

@pytest.fixture(scope="module")
def tfds_prepare():
    try:
        import array_record  # noqa: F401
        import tensorflow_datasets  # noqa: F401
    except ImportError as e:
        missing(e.name)
    from reasonrag_jax.data.tfds import prepare
    return prepare


def test_tfds_flashrag_qa(tfds_prepare, tmp_path):
    manual = tmp_path / "hotpotqa"
    examples = {"train": [QAExample("t1", "Who?", ("A", "B"), {"hops": 2}),
                          QAExample("t2", "Where?", ("C",))],
                "dev": [QAExample("d1", "When?", ("1901",), {"type": "comparison"})]}
    for split, rows in examples.items():
        write_qa(manual / f"{split}.jsonl", rows)
    sources = tfds_prepare("flashrag_qa", manual, tmp_path / "data", config="hotpotqa")
    assert set(sources) == {"train", "dev"}
    for split, rows in examples.items():
        got = sorted(sources[split], key=lambda r: r["id"])
        assert [QAExample(r["id"].decode(), r["question"].decode(),
                          tuple(a.decode() for a in r["golden_answers"]),
                          json.loads(r["metadata"])) for r in got] == rows
        assert [json.loads(r["metadata"]) for r in got] == [ex.metadata for ex in rows]


def test_tfds_flashrag_qa_bad_input(tfds_prepare, tmp_path):
    with pytest.raises(InputError, match="manual_dir is not a directory"):
        tfds_prepare("flashrag_qa", tmp_path / "missing", tmp_path / "data")
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "notes.txt").write_text("no QA files here")
    with pytest.raises(InputError, match="no <split>.jsonl files"):
        tfds_prepare("flashrag_qa", tmp_path / "manual", tmp_path / "data")
    write_qa(tmp_path / "manual" / "test.jsonl", [QAExample("a", "q?", ("x",))] * 2)
    with pytest.raises(InputError, match="test.jsonl:2: field 'id': duplicate value 'a'"):
        tfds_prepare("flashrag_qa", tmp_path / "manual", tmp_path / "data")


def test_tfds_rag_proguide(tfds_prepare, tmp_path):
    pairs = [{"instruction": "sys", "input": "Question: q", "prompt": "p",
              "chosen": "So the next query is <query>a</query>", "rejected": "So the answer is",
              "chosen_action_type": "Query Generation", "rejected_action_type": "Answer Generation",
              "chosen_content": "a", "rejected_content": "b", "layer": 2},
             {"input": "Question: r", "chosen": "yes", "rejected": "no", "layer": "3"}]
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "RAG_ProGuide.json").write_text(json.dumps(pairs))
    sources = tfds_prepare("rag_proguide", manual, tmp_path / "data")
    got = sorted(sources["train"], key=lambda r: int(r["layer"]))
    assert len(got) == 2
    decoded = {k: (v.decode() if isinstance(v, bytes) else int(v)) for k, v in got[0].items()}
    assert decoded == pairs[0]
    assert got[1]["instruction"] == b"" and int(got[1]["layer"]) == 3


@pytest.mark.parametrize("pairs, message", [
    ([{"input": "q", "chosen": "a"}], "RAG_ProGuide.json:1: field 'rejected' is missing"),
    ([{"input": "q", "chosen": "a", "rejected": " "}], ":1: field 'rejected' is empty"),
    ([{"input": "q", "chosen": "a", "rejected": "b"}, {"input": 1, "chosen": "a", "rejected": "b"}],
     ":2: field 'input' should be str, got int"),
    ([{"input": "q", "chosen": "a", "rejected": "b", "layer": 1.5}], ":1: field 'layer' should be"),
    ({"input": "q"}, "expected a non-empty JSON list"),
])
def test_tfds_rag_proguide_bad_input(tfds_prepare, tmp_path, pairs, message):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "RAG_ProGuide.json").write_text(json.dumps(pairs))
    with pytest.raises(InputError, match=re.escape(message)):
        tfds_prepare("rag_proguide", manual, tmp_path / "data")


def test_experiment_splits_are_disjoint(synth, questions, tmp_path):
    """The demo's SFT / MCTS / dev / test splits share no question (by id or by text), each
    has its size balanced over hop counts, and test is the same file as `write_synthetic`'s."""
    sizes = {"test": 100, "dev": 30, "mcts": 150, "sft": 60}
    paths = write_splits(tmp_path, sizes)
    assert paths["test"].read_bytes() == synth["test"].read_bytes()
    got = {s: read_qa(paths[s]) for s in sizes}
    for split, n in sizes.items():
        assert len(got[split]) == n
        assert Counter(ex.metadata["hops"] for ex in got[split]) == {
            h: n // 3 + (h <= n % 3) for h in (1, 2, 3)}
    for a, b in itertools.combinations(sizes, 2):
        assert not {ex.question for ex in got[a]} & {ex.question for ex in got[b]}, (a, b)
        assert not {ex.id for ex in got[a]} & {ex.id for ex in got[b]}, (a, b)
