"""Two local processes joined by jax.distributed (gloo on 127.0.0.1), against one process:
- train data-parallel and write one checkpoint that a single process restores, same numbers;
- sample on one mesh across both, each reading back the single-process completions;
- run `eval` and `generate` together: process 0 writes what a single process writes;
- build one index, each process embedding its share of the chunks;
- refuse to resume from outputs the processes do not share."""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from reasonrag_jax.train import trainer
from reasonrag_jax.train.checkpoint import load_trained_policy
from test_sampling import assert_same_outputs, sampler_outputs
from test_trainer import compilation_cache, tiny_config, tiny_policy, tokenizer, write_pairs  # noqa: F401

WORKER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from reasonrag_jax.sharding import maybe_initialize_distributed
    maybe_initialize_distributed()
    import jax
    from reasonrag_jax.config import load_config
    from reasonrag_jax.train.trainer import run_train
    assert jax.process_count() == 2 and jax.device_count() == 2 and jax.local_device_count() == 1
    cfg = load_config(None, sys.argv[4:])
    run_train(cfg, Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
    print("WORKER_DONE", jax.process_index())
""")


SAMPLER_WORKER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from reasonrag_jax.sharding import maybe_initialize_distributed
    maybe_initialize_distributed()
    import jax
    from reasonrag_jax.config import MeshConfig
    from reasonrag_jax.sharding import make_mesh
    from test_sampling import sampler_outputs
    assert jax.process_count() == 2 and jax.device_count() == 2
    print("RESULT" + json.dumps(sampler_outputs(make_mesh(MeshConfig(shape={"data": -1})))))
""")


PIPELINE_WORKER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from reasonrag_jax.sharding import maybe_initialize_distributed
    maybe_initialize_distributed()
    from reasonrag_jax.config import load_config
    from reasonrag_jax.eval.evaluate import run_eval
    from reasonrag_jax.mcts.search import run_generate
    dataset, index, policy, out = sys.argv[1:5]
    cfg = load_config(None, sys.argv[5:])
    run_eval(cfg, Path(dataset), Path(index), policy, Path(out) / "eval")
    run_generate(cfg, Path(dataset), Path(index), Path(out) / "pairs.jsonl", policy)
    print("WORKER_DONE")
""")


UNSHARED_WORKER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from reasonrag_jax.sharding import maybe_initialize_distributed, resume_keys
    maybe_initialize_distributed()
    import jax
    from reasonrag_jax.io import InputError
    disk = Path(sys.argv[1]) / f"disk{jax.process_index()}"   # same path, a disk each
    disk.mkdir()
    os.chdir(disk)
    out = Path("traces.jsonl")
    out.write_text("".join(json.dumps({"id": f"q{i}"}) + "\\n"
                           for i in range(jax.process_index() + 1)))
    try:
        resume_keys(out, "id")
    except InputError as e:
        print("REFUSED", e)
""")


INDEX_WORKER = textwrap.dedent("""
    import sys
    from reasonrag_jax.sharding import maybe_initialize_distributed
    maybe_initialize_distributed()
    from reasonrag_jax.config import load_config
    from reasonrag_jax.retrieval.index import build_index
    build_index(sys.argv[1], sys.argv[2], load_config(None, sys.argv[3:]).retrieval)
    print("WORKER_DONE")
""")


def assert_close(got, want, where: str) -> None:
    """Equal JSON values, floats to 1e-6 relative."""
    if isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-6), where
    elif isinstance(want, dict):
        assert sorted(got) == sorted(want), where
        for k in want:
            assert_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, f"{where}[{i}]")
    else:
        assert got == want, where


def run_two(script: str, *args: str) -> list[str]:
    """Run `script` in two processes joined on 127.0.0.1; → their outputs (both must exit 0)."""
    port = free_port()
    procs = []
    for i in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i), "XLA_FLAGS": ""}
        procs.append(subprocess.Popen([sys.executable, "-c", script, *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        logs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return logs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_train_and_one_restores(tmp_path, tiny_policy):  # noqa: F811
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    overrides = ["train.batch_size=2", "train.max_steps=3", "train.save_every=3",
                 "train.learning_rate=1e-3", "train.max_length=64", "train.length_buckets=[64]"]
    logs = run_two(WORKER, str(pairs), str(tmp_path / "multi"), str(tiny_policy), *overrides)
    for i, log in enumerate(logs):
        assert f"WORKER_DONE {i}" in log, log[-3000:]
    assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in logs[0]
    assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["3"]
    # only the lead process writes logs: one line per step
    multi = [json.loads(x) for x in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in multi] == [1, 2, 3]

    single = trainer.run_train(tiny_config(max_steps=3, save_every=3), pairs, tmp_path / "single",
                               str(tiny_policy))
    ref = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(multi, ref):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    restored, _ = load_trained_policy(tmp_path / "multi")
    want, _ = load_trained_policy(single)
    leaves = lambda m: jax.tree.leaves(nnx.state(m, nnx.Param))  # noqa: E731
    for x, y in zip(leaves(restored), leaves(want)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)


@pytest.mark.multiprocess
def test_two_processes_sample_on_one_mesh():
    """Rows split over a device in each process; every process reads back all of them."""
    logs = run_two(SAMPLER_WORKER, str(Path(__file__).parent))
    want = sampler_outputs()
    for log in logs:
        got = json.loads(log.split("RESULT", 1)[1].splitlines()[0])
        assert got["specs"]["k"] == [["data", "fsdp"], "tensor", None, None]
        assert_same_outputs(got, want)


@pytest.mark.multiprocess
def test_two_processes_run_eval_and_generate_like_one(tmp_path, tiny_policy):  # noqa: F811
    """Sampling at temperature > 0, rows over both processes: the files hold what a single
    process writes (log-prob sums to float rounding: the two meshes reduce in another order)."""
    from reasonrag_jax.config import load_config
    from reasonrag_jax.data.qa import read_qa, write_qa
    from reasonrag_jax.data.synthetic import write_synthetic
    from reasonrag_jax.eval.evaluate import run_eval
    from reasonrag_jax.mcts.search import run_generate
    from reasonrag_jax.retrieval.index import build_index

    overrides = ["agent.max_retrievals=2", "agent.max_step_tokens=6", "agent.batch_size=4",
                 "agent.temperature=0.8", "mcts.max_rollouts=3", "mcts.spre_rollouts=2",
                 "mcts.batch_questions=2"]
    cfg = load_config(None, overrides)
    data = write_synthetic(tmp_path / "data", seed=0, num_entities=20)
    index = build_index(data["corpus"], tmp_path / "index", cfg.retrieval)
    dataset = tmp_path / "qa.jsonl"
    write_qa(dataset, read_qa(data["test"])[:3])
    logs = run_two(PIPELINE_WORKER, str(dataset), str(index), str(tiny_policy),
                   str(tmp_path / "multi"), *overrides)
    assert all("WORKER_DONE" in log for log in logs)
    run_eval(cfg, dataset, index, str(tiny_policy), tmp_path / "one" / "eval")
    run_generate(cfg, dataset, index, tmp_path / "one" / "pairs.jsonl", str(tiny_policy))
    for name in ("eval/traces.jsonl", "eval/summary.json", "pairs.trees.jsonl", "pairs.jsonl",
                 "pairs.outcome.jsonl", "pairs.summary.json"):
        got, want = ((tmp_path / run / name).read_text() for run in ("multi", "one"))
        if name.endswith(".jsonl"):
            got, want = ([json.loads(x) for x in text.splitlines()] for text in (got, want))
        else:
            got, want = json.loads(got), json.loads(want)
        assert_close(got, want, name)
    assert len((tmp_path / "one" / "eval/traces.jsonl").read_text().splitlines()) == 3


@pytest.mark.multiprocess
def test_processes_resuming_from_different_outputs_are_refused(tmp_path):
    """Outputs on disks the processes do not share would make them run different questions and
    wait on each other's collectives forever: a clear error instead."""
    for log in run_two(UNSHARED_WORKER, str(tmp_path)):
        assert "REFUSED" in log and "storage that every process shares" in log, log[-2000:]


@pytest.mark.multiprocess
def test_two_processes_build_the_index_one_process_builds(tmp_path):
    """Chunks alternate between the processes; the lead gathers them and builds the index."""
    from reasonrag_jax.config import load_config
    from reasonrag_jax.data.synthetic import write_synthetic
    from reasonrag_jax.retrieval.index import build_index

    corpus = write_synthetic(tmp_path / "data", seed=0, num_entities=20)["corpus"]
    overrides = ["retrieval.chunk_size=8"]
    logs = run_two(INDEX_WORKER, str(corpus), str(tmp_path / "multi"), *overrides)
    assert all("WORKER_DONE" in log for log in logs)
    single = build_index(corpus, tmp_path / "one", load_config(None, overrides).retrieval)
    for name in ("metadata.json", "passages.jsonl"):
        assert (tmp_path / "multi" / name).read_text() == (single / name).read_text()
    np.testing.assert_allclose(np.load(tmp_path / "multi" / "embeddings.npy"),
                               np.load(single / "embeddings.npy"), atol=1e-3)
    assert len(json.loads((single / "metadata.json").read_text())["doc_ids"]) > 16  # 3+ chunks
    assert not list(tmp_path.glob(".multi.embeddings-*"))        # chunk files cleaned up
