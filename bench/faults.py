"""Fault campaign: kill commands at seeded random moments and feed every reader bad input.

Kills: `reasonrag-jax index`, `train` (SFT on a tiny random policy with the SmolLM2 tokenizer),
`generate` (MCTS + SPRE pairs) and `eval` run as subprocesses, get SIGKILL at a seeded random
50–95% of their uninterrupted wall time (past start-up, so the kill lands in the work on any
machine; `stopped_by_kill` counts the kills that did stop a run), are re-run to completion,
and their outputs are compared with an uninterrupted run: index search results, final
checkpoint params and per-step losses, the pairs/trees/outcome files, the eval summary and
traces; leftovers (`*.partial`, `*.tmp`) count as lost. `train` also gets a
SIGTERM (preemption): it must exit 130 after saving a checkpoint, and resume to the same result.
Bad inputs: corpus / QA / pairs / config files with broken lines, run through the CLI; each must
exit 2 with one line that names the file (and line or key), leaving earlier outputs intact.

Prints progress lines, then one JSON line:
{"kills", "stopped_by_kill", "compared", "resumed_identical", "bad_inputs", "clear_errors",
"lost_records", "seconds", "isa"}; `compared` counts kills whose resumed run and reference both
left real files to compare (a finished run that leaves none stops the campaign with an error).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import print_result

from reasonrag_jax.mcts.search import output_paths

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "reasonrag_jax.cli"]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONWARNINGS": "ignore"}


def run(args: list[str], kill_after: float | None = None, sig: int = signal.SIGKILL
        ) -> subprocess.CompletedProcess | None:
    """Run the CLI; with `kill_after`, send `sig` after that many seconds. None if SIGKILLed;
    after another signal, the finished process (its exit code says how it stopped)."""
    proc = subprocess.Popen(CLI + args, env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(sig)
        out, err = proc.communicate()
        if sig == signal.SIGKILL:
            return None
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def leftovers(path: Path) -> list[Path]:
    return [p for p in path.parent.rglob("*") if p.name.endswith((".partial", ".tmp", ".tmp.npy"))]


def tiny_policy(work: Path) -> Path:
    """A small random Llama with the SmolLM2 tokenizer, as a Hugging Face directory."""
    import torch
    import transformers

    from reasonrag_jax.models.weights import embedded_policy_path, load_tokenizer

    out = work / "tiny_policy"
    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=True, eos_token_id=2, bos_token_id=1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    load_tokenizer(embedded_policy_path()).save_pretrained(str(out))
    return out


def checkpoint_params(out: Path) -> dict[str, np.ndarray]:
    from flax import nnx

    from reasonrag_jax.train.checkpoint import load_trained_policy

    model, _ = load_trained_policy(out)
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.split(model)[1])}


def index_results(index: Path) -> list[list[str]]:
    from reasonrag_jax.config import RetrievalConfig
    from reasonrag_jax.retrieval.index import Retriever

    r = Retriever.load(index, RetrievalConfig(chunk_size=32))
    return [[p.id for p in row] for row in r.search(["birthplace", "film director", "founded"], 5)]


def texts(paths: list[Path], nonempty: int = 1) -> list[str] | None:
    """The files' texts; None when one is missing or one of the first `nonempty` is empty (a
    finished run writes them all, and those with content)."""
    if not all(p.is_file() for p in paths) or not all(p.stat().st_size for p in paths[:nonempty]):
        return None
    return [p.read_text() for p in paths]


def index_compare(out: Path):
    return index_results(out) if (out / "metadata.json").exists() else None


def train_compare(out: Path):
    if not (out / "checkpoints").exists() or texts([out / "metrics.jsonl"]) is None:
        return None
    params = checkpoint_params(out)
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        losses[r["step"]] = round(r["loss"], 6)
    return (sorted(losses.items()), {k: np.round(v, 6).tobytes() for k, v in params.items()})


def generate_compare(out: Path):
    """Trees (every node's text, kind, reward and value: one line per question), then the pairs
    computed from them. The tiny random policy never earns a reward, so its pair files are
    empty: the trees carry this comparison."""
    paths = output_paths(out / "pairs.jsonl")
    return texts([paths["trees"], paths["pairs"], paths["outcome"]])


def eval_compare(out: Path):
    return texts([out / "traces.jsonl", out / "summary.json"], nonempty=2)


def finished_output(name: str, compare, out: Path):
    """What `compare` reads from a finished run's `out`. Nothing to read is an error, never a
    match: two runs that both wrote nothing would otherwise count as resumed identically."""
    got = compare(out)
    if not got:
        raise RuntimeError(f"{name}: the finished run in {out} left nothing to compare")
    return got


def workload(work: Path) -> dict[str, tuple]:
    """Each killed command: name → (arguments for an output path, compare function), on small
    inputs written under `work` (synthetic data, a tiny random policy, SFT records)."""
    from reasonrag_jax.data.synthetic import write_synthetic

    data = write_synthetic(work / "data", seed=0, num_entities=80)
    policy = tiny_policy(work)
    sft = work / "sft.jsonl"
    sft.write_text("".join(json.dumps({"instruction": "Answer.", "input": f"Q{i}?",
                                       "output": f"A{i}"}) + "\n" for i in range(96)))
    qa = work / "qa.jsonl"
    qa.write_text("".join(line for line in data["train"].read_text().splitlines(True)[:6]))
    index = work / "index-ref"          # the index command's reference run
    agent = ["--checkpoint", str(policy), "--set", "agent.max_step_tokens=24",
             "--set", "sampler.max_batch=8"]
    return {
        "index": (lambda out: ["index", "--corpus", str(data["corpus"]), "--out", str(out),
                               "--set", "retrieval.chunk_size=32"], index_compare),
        "train": (lambda out: [
            "train", "--pairs", str(sft), "--init", str(policy), "--out", str(out),
            "--set", "train.objective=sft", "--set", "train.batch_size=4",
            "--set", "train.save_every=2", "--set", "train.learning_rate=1e-3",
            "--set", "train.length_buckets=[64]"], train_compare),
        "generate": (lambda out: [
            "generate", "--dataset", str(qa), "--index", str(index),
            "--out", str(out / "pairs.jsonl"), *agent, "--set", "mcts.max_rollouts=4",
            "--set", "mcts.spre_rollouts=1", "--set", "mcts.batch_questions=2"],
            generate_compare),
        "eval": (lambda out: ["eval", "--dataset", str(qa), "--index", str(index), "--out",
                              str(out), *agent, "--set", "agent.batch_size=2"], eval_compare),
    }


KILL_STATS = ("kills", "stopped", "compared", "resumed_identical", "lost_records")


def kill_campaign(work: Path, rng: random.Random, kills_per_command: int) -> dict[str, int]:
    stats = dict.fromkeys(KILL_STATS, 0)
    durations: dict[str, float] = {}
    commands = workload(work)

    def campaign(name, kills=kills_per_command, sig=signal.SIGKILL, window=(0.5, 0.95)):
        """Kill at a seeded fraction of the uninterrupted run's wall time, so every kill lands
        while the command is working, whatever the machine's speed."""
        args, compare = commands[name]
        ref = work / f"{name}-ref"
        if name not in durations:
            start = time.perf_counter()
            done = run(args(ref))
            durations[name] = time.perf_counter() - start
            if done.returncode:
                raise RuntimeError(f"{name}: reference run failed: {done.stderr[-2000:]}")
        reference = finished_output(name, compare, ref)
        for k in range(kills):
            target = work / f"{name}-{sig.name}-{k}"
            delay = rng.uniform(*window) * durations[name]
            first = run(args(target), kill_after=delay, sig=sig)
            killed = first is None or first.returncode != 0
            if sig != signal.SIGKILL and first is not None and first.returncode not in (0, 130):
                print(f"{name}: {sig.name} exit {first.returncode}: {first.stderr[-300:]}")
                stats["lost_records"] += 1
            result = run(args(target))
            ok = result is not None and result.returncode == 0
            same = ok and finished_output(name, compare, target) == reference
            lost = len(leftovers(target))
            stats["kills"] += 1
            stats["stopped"] += int(killed)
            stats["compared"] += int(ok)       # a finished run left outputs (or we raised)
            stats["resumed_identical"] += int(same)
            stats["lost_records"] += lost + (0 if ok else 1)
            print(f"{name}: {sig.name} at {delay:.1f}s of {durations[name]:.1f}s "
                  f"({'stopped' if killed else 'finished first'}) → "
                  f"resumed {'identical' if same else 'DIFFERENT'}, leftovers {lost}", flush=True)

    campaign("index")
    campaign("train")
    # Mid-run, so the signal lands inside the training loop rather than in the final save.
    campaign("train", kills=1, sig=signal.SIGTERM, window=(0.4, 0.6))
    campaign("generate")
    campaign("eval")
    return stats


BAD = {
    "corpus": [b'{"id": "1", "contents": "T\\nx"}\n{"id": "2"}\n', b"\xff\xfe\n", b"",
               b'{"id": "1", "contents": "T\\nx"}\n{"id": "1", "contents": "T\\ny"}\n',
               b'{"id": "1", "contents": "T\\nx"}\n{"id": "2", "conte'],
    "qa": [b'{"id": "a", "question": "q?"}\n', b'{"id": "a", "question": "q?", "golden_answers": []}\n',
           b'{"id": 1, "question": "q?", "golden_answers": ["x"]}\n', b"not json\n"],
    "pairs": [b'{"instruction": "", "input": "q", "chosen": "", "rejected": "b"}\n',
              b'{"instruction": "", "input": "q", "chosen": "a", "rejected": "a"}\n',
              b'{"instruction": "", "input": "q", "chosen": "a"}\n', b"[]"],
    "config": [b"train:\n  lr: 1\n", b"train:\n  beta: high\n", b"mesh:\n  shape: {data: 3, fsdp: 5}\n",
               b"- a\n"],
}


def bad_input_campaign(work: Path) -> dict[str, int]:
    pairs = work / "good-pairs.jsonl"
    pairs.write_text(json.dumps({"instruction": "", "input": "q", "chosen": "a", "rejected": "b"}) + "\n")
    stats = {"bad_inputs": 0, "clear_errors": 0, "lost_records": 0}
    for kind, cases in BAD.items():
        for i, content in enumerate(cases):
            bad = work / f"bad-{kind}-{i}.{'yaml' if kind == 'config' else 'jsonl'}"
            bad.write_bytes(content)
            sentinel = work / f"out-{kind}-{i}"
            sentinel.mkdir()
            (sentinel / "earlier.jsonl").write_text('{"kept": true}\n')
            args = {"corpus": ["index", "--corpus", str(bad), "--out", str(sentinel / "index")],
                    "qa": ["eval", "--dataset", str(bad), "--index", str(work / "none"),
                           "--out", str(sentinel)],
                    "pairs": ["train", "--pairs", str(bad), "--out", str(sentinel)],
                    "config": ["synth", "--out", str(sentinel), "--config", str(bad)]}[kind]
            if kind == "config" and b"mesh" in content:
                args = ["train", "--pairs", str(pairs), "--out", str(sentinel), "--config", str(bad)]
            result = run(args)
            lines = [ln for ln in result.stderr.splitlines() if "error:" in ln]
            clear = (result.returncode == 2 and len(lines) == 1 and
                     (bad.name in lines[0] or "mesh.shape" in lines[0]))
            intact = (sentinel / "earlier.jsonl").read_text() == '{"kept": true}\n'
            stats["bad_inputs"] += 1
            stats["clear_errors"] += int(clear)
            stats["lost_records"] += int(not intact)
            print(f"bad {kind} #{i}: exit {result.returncode} "
                  f"{lines[0] if lines else result.stderr.strip()[-200:]!r}", flush=True)
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kills", type=int, default=2, help="kill points per command")
    ap.add_argument("--skip-kills", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="reasonrag-faults-"))
    start = time.time()
    try:
        stats = bad_input_campaign(work)
        kills = (dict.fromkeys(KILL_STATS, 0) if args.skip_kills
                 else kill_campaign(work, random.Random(args.seed), args.kills))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"kills": kills["kills"], "stopped_by_kill": kills["stopped"],
              "compared": kills["compared"], "resumed_identical": kills["resumed_identical"],
              "bad_inputs": stats["bad_inputs"], "clear_errors": stats["clear_errors"],
              "lost_records": stats["lost_records"] + kills["lost_records"],
              "seconds": round(time.time() - start, 1)}
    print_result(result)


if __name__ == "__main__":
    main()
