"""Config loading: YAML + overrides, and one-line errors that name the file and the key."""
from pathlib import Path

import pytest

from reasonrag_jax.config import Config, load_config, shipped_configs, to_dict
from reasonrag_jax.io import InputError

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.agent.num_passages == 3  # the paper's top-3 everywhere


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["train.beta=0.1", "sampler.prefill_buckets=[32, 64]",
                             "mesh.shape={data: 2, fsdp: 4, tensor: 1}", "agent.mode=free"])
    assert cfg.train.beta == 0.1
    assert cfg.sampler.prefill_buckets == (32, 64)
    assert cfg.mesh.shape == {"data": 2, "fsdp": 4, "tensor": 1}
    assert cfg.agent.mode == "free"
    assert load_config(None, ["train.learning_rate=1"]).train.learning_rate == 1.0


def test_round_trip_through_dict(tmp_path):
    import yaml

    cfg = load_config(None, ["mcts.beta=0.8"])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(path) == cfg


@pytest.mark.parametrize("text, message", [
    ("train:\n  lr: 1\n", "c.yaml: unknown key 'train.lr'"),
    ("train:\n  beta: high\n", "c.yaml: key 'train.beta': expected float, got str 'high'"),
    ("train: 3\n", "c.yaml: key 'train': expected a mapping, got int"),
    ("- a\n- b\n", "c.yaml: expected a mapping at top level"),
    ("train: [unclosed\n", "c.yaml:2: invalid YAML"),
])
def test_bad_config_files_name_file_and_key(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        load_config(path)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_overrides():
    with pytest.raises(InputError, match="unknown key 'nope'"):
        load_config(None, ["nope.x=1"])
    with pytest.raises(InputError, match="expected key=value"):
        load_config(None, ["train.beta"])
    with pytest.raises(InputError, match="missing.yaml: config file not found"):
        load_config("missing.yaml")


def test_every_repository_config_ships_and_loads_by_name():
    """`--config qwen2_5_7b_8xh100` reads the packaged copy, which is the repository's file."""
    assert shipped_configs() == [p.stem for p in CONFIGS]
    for path in CONFIGS:
        assert load_config(path.stem) == load_config(path) == load_config(path.name)
    with pytest.raises(InputError, match="nope: config file not found \\(shipped configs: "):
        load_config("nope")


def test_config_command_prints_the_resolved_config(capsys):
    import yaml

    from reasonrag_jax.cli import main

    assert main(["config", "--config", "qwen2_5_7b_8xh100", "--set", "train.beta=0.25"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_dict(load_config("qwen2_5_7b_8xh100", ["train.beta=0.25"]))
    assert printed["train"]["beta"] == 0.25


@pytest.mark.parametrize("precision", ["highest", "default"])
def test_the_cli_traces_float32_products_at_the_configured_precision(tmp_path, precision):
    """`model.matmul_precision` reaches the compiler: on a GPU "default" would let a float32
    product run in TF32 (the CPU computes float32 either way, so the lowered program is checked)."""
    import jax
    import jax.numpy as jnp

    from reasonrag_jax.cli import main

    before = jax.config.jax_default_matmul_precision
    try:
        assert main(["synth", "--out", str(tmp_path), "--set",
                     f"model.matmul_precision={precision}"]) == 0
        x = jnp.ones((4, 4), jnp.float32)
        lowered = jax.jit(jnp.dot).lower(x, x).as_text()
    finally:
        jax.config.update("jax_default_matmul_precision", before)
    assert ("precision = [HIGHEST, HIGHEST]" in lowered) == (precision == "highest"), lowered


def test_version_through_python_dash_m():
    import subprocess
    import sys

    import reasonrag_jax

    r = subprocess.run([sys.executable, "-m", "reasonrag_jax", "--version"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == f"reasonrag-jax {reasonrag_jax.__version__}\n"
