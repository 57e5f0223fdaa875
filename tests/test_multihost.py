"""Two local processes joined by jax.distributed (gloo on 127.0.0.1) train data-parallel and write
one checkpoint that a single process restores, with the single-process run's numbers; and sample
on one mesh across both processes, each getting the single-process completions."""
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
