"""Files users already have, each read from a small file written here: FlashRAG corpora with
title/text and int ids, FlashRAG's prebuilt FAISS Flat indexes, TRL preference and SFT data."""
import json
import sys

import numpy as np
import pytest

from reasonrag_jax.config import RetrievalConfig
from reasonrag_jax.io import InputError
from reasonrag_jax.retrieval.corpus import iter_corpus
from reasonrag_jax.retrieval.index import Retriever, build_index_from_faiss
from reasonrag_jax.train.data import encode_pairs, encode_sft, prompt_ids, read_pairs, read_sft
from test_retrieval import FakeEncoder


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_flashrag_title_text_corpus_with_int_ids(tmp_path):
    path = write_jsonl(tmp_path / "wiki.jsonl", [
        {"id": 0, "title": "Ann Bell", "text": "Ann Bell was born in Oxa."},
        {"id": "1", "contents": "Oxa\nOxa is a town."},
        {"id": 2, "text": "No title here."}])
    assert list(iter_corpus(path)) == [("0", "Ann Bell\nAnn Bell was born in Oxa."),
                                       ("1", "Oxa\nOxa is a town."), ("2", "No title here.")]
    write_jsonl(path, [{"id": 7, "title": "A", "text": "a"}, {"id": "7", "contents": "B\nb"}])
    with pytest.raises(InputError, match=r"wiki.jsonl:2: field 'id': duplicate value '7'"):
        list(iter_corpus(path))
    write_jsonl(path, [{"id": 1, "title": "A"}])
    with pytest.raises(InputError, match=r"wiki.jsonl:1: field 'contents' is missing"):
        list(iter_corpus(path))
    write_jsonl(path, [{"id": 1.5, "contents": "A\na"}])
    with pytest.raises(InputError, match=r"wiki.jsonl:1: field 'id' should be str or int"):
        list(iter_corpus(path))


def faiss_flat(tmp_path, vectors, metric="ip"):
    faiss = pytest.importorskip("faiss")
    index = (faiss.IndexFlatIP if metric == "ip" else faiss.IndexFlatL2)(vectors.shape[1])
    index.add(vectors)
    path = tmp_path / "e5_Flat.index"
    faiss.write_index(index, str(path))
    return path


def test_index_from_a_faiss_flat_index_searches_its_vectors(tmp_path):
    """The vectors come out of the FAISS file unchanged (no re-embedding): searching with one of
    them finds its own passage, with the FAISS file's score."""
    n, enc = 50, FakeEncoder()
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [
        {"id": i, "title": f"T{i}", "text": f"passage {i}"} for i in range(n)])
    vectors = np.random.default_rng(0).normal(size=(n, enc.dim)).astype(np.float32)
    cfg = RetrievalConfig(embed_dtype="float32")
    out = build_index_from_faiss(faiss_flat(tmp_path, vectors), corpus, tmp_path / "idx", cfg,
                                 encoder=enc, block=16)
    retriever = Retriever.load(out, cfg, encoder=enc, corpus=corpus)
    np.testing.assert_array_equal(np.asarray(retriever.embeddings), vectors)
    idx, scores = retriever.search_vectors(vectors[[3, 41]], 1)
    assert idx[:, 0].tolist() == [3, 41]
    np.testing.assert_allclose(scores[:, 0], (vectors[[3, 41]] ** 2).sum(1), rtol=1e-5)
    assert retriever.passage(41, 0.0).contents == "T41\npassage 41"


@pytest.mark.parametrize("case, message", [
    ("count", r"e5_Flat.index: holds 5 vectors but .*corpus.jsonl has 4 passages"),
    ("dim", r"e5_Flat.index: vectors have dimension 8 but encoder fake embeds into 16"),
    ("metric", r"e5_Flat.index: FAISS metric 1 is not inner product"),
    ("garbage", r"e5_Flat.index: not a FAISS index"),
    ("no faiss", r"e5_Flat.index: reading a FAISS index needs faiss-cpu"),
])
def test_faiss_mismatches_are_one_line_errors(tmp_path, monkeypatch, case, message):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": i, "contents": f"T\n{i}"}
                                                     for i in range(4)])
    dim = 8 if case == "dim" else 16
    vectors = np.ones((5 if case == "count" else 4, dim), np.float32)
    path = faiss_flat(tmp_path, vectors, "l2" if case == "metric" else "ip")
    if case == "garbage":
        path.write_bytes(b"not an index")
    if case == "no faiss":
        monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(InputError, match=message) as err:
        build_index_from_faiss(path, corpus, tmp_path / "idx", RetrievalConfig(),
                               encoder=FakeEncoder())
    assert "\n" not in str(err.value)


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who wrote X?"}]
CHOSEN, REJECTED = "<query>author of X</query>", "<answer>Y</answer>"


def test_trl_preference_formats_read_and_encode_like_rag_proguide(tmp_path, tokenizer):
    """TRL's conversational pair and RAG-ProGuide's pair of the same chat give the same rows;
    a plain-string TRL prompt is used as written (no template)."""
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"instruction": "Be brief.", "input": "Who wrote X?", "chosen": CHOSEN,
         "rejected": REJECTED},
        {"prompt": CHAT, "chosen": [{"role": "assistant", "content": CHOSEN}],
         "rejected": [{"role": "assistant", "content": REJECTED}]},
        {"prompt": "Q: Who wrote X?\nA:", "chosen": " Ann", "rejected": " Bo"}])
    pairs = read_pairs(path)
    assert pairs[1] == {"prompt": CHAT, "chosen": CHOSEN, "rejected": REJECTED}
    assert pairs[2] == {"prompt": "Q: Who wrote X?\nA:", "chosen": " Ann", "rejected": " Bo"}
    enc = encode_pairs(tokenizer, pairs, 256)
    np.testing.assert_array_equal(enc.tokens[0], enc.tokens[1])
    np.testing.assert_array_equal(enc.slots[0], enc.slots[1])
    raw = tokenizer("Q: Who wrote X?\nA:", add_special_tokens=False)["input_ids"]
    assert enc.tokens[2, :len(raw)].tolist() == raw and enc.slots[2, len(raw) - 1] == -1
    assert enc.slots[2, len(raw)] == 0


def test_trl_sft_formats_read_and_encode_like_llama_factory(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"instruction": "Be brief.", "input": "Who wrote X?", "output": CHOSEN},
        {"messages": [*CHAT, {"role": "assistant", "content": CHOSEN}]},
        {"prompt": CHAT, "completion": [{"role": "assistant", "content": CHOSEN}]},
        {"prompt": "Q: Who wrote X?\nA:", "completion": " Ann"}])
    records = read_sft(path)
    assert records[1] == records[2] == {"prompt": CHAT, "completion": CHOSEN}
    enc = encode_sft(tokenizer, records, 256)
    for i in (1, 2):
        np.testing.assert_array_equal(enc.tokens[i], enc.tokens[0])
        np.testing.assert_array_equal(enc.slots[i], enc.slots[0])
    p = prompt_ids(tokenizer, "Be brief.", "Who wrote X?")
    assert (enc.slots[0, :len(p)] == -1).all() and enc.slots[0, len(p)] == 0


def test_output_prefix_is_prompt_tokenized_as_the_sampler_reads_it(tmp_path, tokenizer):
    """A forced answer's scaffold is written by the runner: prompt tokens, no loss, and the row
    is the same token sequence the sampler sees (prompt text + scaffold, then the answer)."""
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"instruction": "Be brief.", "input": "Who wrote X?", "output_prefix": "So the answer is <answer>",
         "output": "Ann</answer>"}])
    [record] = read_sft(path)
    enc = encode_sft(tokenizer, [record], 256)
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who wrote X?"}],
        tokenize=False, add_generation_prompt=True) + "So the answer is <answer>"
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    answer = tokenizer("Ann</answer>", add_special_tokens=False)["input_ids"]
    n = enc.lengths[0]
    assert enc.tokens[0, :n].tolist() == prompt + answer + [tokenizer.eos_token_id]
    assert enc.slots[0, :n].tolist() == [-1] * len(prompt) + [0] * (len(answer) + 1)


@pytest.mark.parametrize("reader, record, message", [
    (read_pairs, {"prompt": CHAT, "chosen": [{"role": "user", "content": "x"}], "rejected": "y"},
     r"f.jsonl:1: field 'chosen' should be one assistant message"),
    (read_pairs, {"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"},
     r"f.jsonl:1: field 'prompt\[0\]' should be \{\"role\": str, \"content\": str\}"),
    (read_pairs, {"prompt": "q", "chosen": "a"}, r"f.jsonl:1: field 'rejected' is missing"),
    (read_pairs, {"prompt": "q", "chosen": "a", "rejected": "a"},
     r"f.jsonl:1: field 'rejected' is identical to 'chosen'"),
    (read_pairs, {"prompt": 3, "chosen": "a", "rejected": "b"},
     r"f.jsonl:1: field 'prompt' should be a string or a non-empty list of messages, got int"),
    (read_sft, {"messages": CHAT}, r"f.jsonl:1: field 'messages' should end with an assistant"),
    (read_sft, {"prompt": "q", "completion": " "}, r"f.jsonl:1: field 'completion' is empty"),
    (read_pairs, {"prompt": "", "chosen": "a", "rejected": "b"},
     r"f.jsonl:1: field 'prompt' is empty"),
])
def test_bad_trl_records_name_line_and_field(tmp_path, reader, record, message):
    with pytest.raises(InputError, match=message) as err:
        reader(write_jsonl(tmp_path / "f.jsonl", [record]))
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def tokenizer():
    from reasonrag_jax.models.weights import embedded_policy_path, gguf_as_hf_dir, load_tokenizer

    return load_tokenizer(gguf_as_hf_dir(embedded_policy_path()))


def test_index_command_from_faiss(tmp_path, capsys):
    """`reasonrag-jax index --from-faiss FILE --corpus FILE --encoder DIR --out DIR`."""
    from reasonrag_jax.cli import main
    from reasonrag_jax.models.encoder import embedded_encoder_dir

    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": i, "title": f"T{i}", "text": "x"}
                                                     for i in range(6)])
    vectors = np.random.default_rng(1).normal(size=(6, 384)).astype(np.float32)
    path = faiss_flat(tmp_path, vectors)
    args = ["index", "--from-faiss", str(path), "--corpus", str(corpus), "--out",
            str(tmp_path / "idx"), "--encoder", str(embedded_encoder_dir())]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "idx")
    assert (tmp_path / "idx" / "metadata.json").is_file()
    write_jsonl(corpus, [{"id": i, "contents": "T\nx"} for i in range(5)])
    assert main(args) == 2
    assert "holds 6 vectors but" in capsys.readouterr().err
