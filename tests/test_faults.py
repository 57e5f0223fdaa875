"""bench/faults.py compares what the commands really write: each compare function reads a
finished run of its command (tiny inputs, the bench's own arguments), and a run that left
nothing is refused rather than counted as a match."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import faults  # noqa: E402


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """name → (output dir of one finished run, compare function), for every killed command."""
    work = tmp_path_factory.mktemp("faults")
    commands = faults.workload(work)
    outs = {}
    for name in ("index", "train", "generate", "eval"):     # generate and eval read the index
        args, compare = commands[name]
        out = work / f"{name}-ref"
        done = faults.run(args(out))
        assert done.returncode == 0, done.stderr[-3000:]
        outs[name] = (out, compare)
    return outs


@pytest.mark.parametrize("name", ["index", "train", "generate", "eval"])
def test_compare_reads_a_finished_run(finished, name, tmp_path):
    out, compare = finished[name]
    got = faults.finished_output(name, compare, out)
    assert got and got == compare(out)            # real content, read the same way twice
    with pytest.raises(RuntimeError, match="left nothing to compare"):
        faults.finished_output(name, compare, tmp_path / "missing")


def test_generate_compare_reads_the_files_generate_writes(finished, tmp_path):
    import shutil

    out, compare = finished["generate"]
    trees, pairs, outcome = compare(out)
    assert trees.count("\n") == 6                 # one tree per question
    assert (out / "pairs.trees.jsonl").read_text() == trees
    assert (out / "pairs.jsonl").read_text() == pairs
    assert (out / "pairs.outcome.jsonl").read_text() == outcome
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "pairs.jsonl").write_text('{"chosen": "a", "rejected": "b"}\n')
    assert compare(copy) != compare(out)          # a different pairs file is a difference


@pytest.mark.parametrize("name,emptied", [("generate", "pairs.trees.jsonl"),
                                          ("eval", "traces.jsonl"), ("eval", "summary.json"),
                                          ("train", "metrics.jsonl")])
def test_an_empty_output_is_refused(finished, name, emptied, tmp_path):
    import shutil

    out, compare = finished[name]
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / emptied).write_text("")
    with pytest.raises(RuntimeError, match="left nothing to compare"):
        faults.finished_output(name, compare, copy)
