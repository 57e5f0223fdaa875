"""Every reader of user files, fed arbitrary bytes: it returns records or raises one InputError
that names the file — never another exception — and never changes the file it read.

Hand-written cases for each reader live beside the reader's own tests; these properties cover
what nobody thought to write down (broken UTF-8 mid-line, stray brackets, YAML oddities).
"""
import json
from pathlib import Path

import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reasonrag_jax.config import load_config
from reasonrag_jax.data.qa import read_qa
from reasonrag_jax.io import InputError
from reasonrag_jax.models.decoder import Decoder
from reasonrag_jax.retrieval.corpus import iter_corpus
from reasonrag_jax.train import checkpoint
from reasonrag_jax.train.data import read_pairs, read_sft

READERS = {
    "qa.jsonl": read_qa,
    "corpus.jsonl": lambda p: list(iter_corpus(p)),
    "pairs.jsonl": read_pairs,
    "sft.jsonl": read_sft,
    "config.yaml": load_config,
}

# Lines that are almost right: valid records with one field broken, plus raw noise.
GOOD = {
    "qa.jsonl": {"id": "q1", "question": "Who?", "golden_answers": ["Ann"]},
    "corpus.jsonl": {"id": "d1", "contents": "Title\ntext"},
    "pairs.jsonl": {"instruction": "Answer.", "input": "q", "chosen": "a", "rejected": "b"},
    "sft.jsonl": {"instruction": "Answer.", "input": "q", "output": "a"},
}
values = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8),
                   st.lists(st.text(max_size=4), max_size=2), st.just({}))


@st.composite
def jsonl_bytes(draw, name):
    lines = []
    for _ in range(draw(st.integers(0, 4))):
        record = dict(GOOD[name])
        if draw(st.booleans()):
            key = draw(st.sampled_from([*record, "extra"]))
            if draw(st.booleans()):
                record.pop(key, None)
            else:
                record[key] = draw(values)
        line = json.dumps(record).encode()
        if draw(st.integers(0, 5)) == 0:        # torn or corrupted line
            cut = draw(st.integers(0, len(line)))
            line = line[:cut] + draw(st.binary(max_size=3))
        lines.append(line)
    return b"\n".join(lines) + draw(st.sampled_from([b"", b"\n"]))


def file_bytes(name):
    structured = (jsonl_bytes(name) if name in GOOD else
                  st.text(max_size=60).map(str.encode) | st.sampled_from(
                      [b"train:\n  beta: high\n", b"- a\n", b"mesh: {shape: {data: 0}}\n",
                       b"train:\n  lr: 1\n", b"sampler:\n  prefill_buckets: [1, x]\n"]))
    return structured | st.binary(max_size=80)


@pytest.mark.parametrize("name", sorted(READERS))
def test_reader_returns_records_or_one_clear_error(tmp_path_factory, name):
    work = tmp_path_factory.mktemp("readers")

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=file_bytes(name))
    def check(data):
        path = work / name
        path.write_bytes(data)
        try:
            READERS[name](path)
        except InputError as e:
            message = str(e)
            assert name in message and "\n" not in message, message
        assert path.read_bytes() == data

    check()


@pytest.fixture(scope="module")
def saved_policy(tmp_path_factory, tiny_llama_cfg):
    """A training directory with one finished checkpoint of a tiny decoder."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    model = Decoder(tiny_llama_cfg, rngs=nnx.Rngs(0))
    mngr = checkpoint.manager(out, keep=1, async_save=False)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    checkpoint.save(mngr, 1, params, {"count": 0}, {"step": 1})
    mngr.wait_until_finished()
    mngr.close()
    (out / "policy.json").write_text(json.dumps({
        "decoder": tiny_llama_cfg.to_hf(), "dtype": "float32", "param_dtype": "float32",
        "base": "test"}))
    return out


def _break(run: Path, how: str) -> None:
    if how == "no policy card":
        (run / "policy.json").unlink()
    elif how == "corrupt policy card":
        (run / "policy.json").write_text('{"decoder": {"hidden_size": ')
    elif how == "wrong model":
        card = json.loads((run / "policy.json").read_text())
        card["decoder"]["hidden_size"] *= 2
        (run / "policy.json").write_text(json.dumps(card))
    elif how == "no checkpoint":
        for step in (run / "checkpoints").iterdir():
            for f in sorted(step.rglob("*"), reverse=True):
                f.unlink() if f.is_file() else f.rmdir()
            step.rmdir()
    elif how == "params deleted":
        for f in (run / "checkpoints").glob("*/params/*"):
            if f.is_file():
                f.unlink()


@pytest.mark.parametrize("how", ["no policy card", "corrupt policy card", "wrong model",
                                 "no checkpoint", "params deleted"])
def test_broken_checkpoint_is_one_clear_error(saved_policy, tmp_path, how):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(saved_policy, run)
    _break(run, how)
    with pytest.raises(InputError) as err:
        checkpoint.load_trained_policy(run)
    assert str(run) in str(err.value) and "\n" not in str(err.value)
