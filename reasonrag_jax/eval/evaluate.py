"""`reasonrag-jax eval`: run the policy's episodes on a QA set and score them.

An evaluation is a rollout at the agent temperature (0 by default) through the same runner that
MCTS uses. Each finished question is appended to `traces.jsonl` with its metrics at once, so a
killed run loses only the questions in flight and a re-run continues; `summary.json` is always
recomputed from the traces.
"""
from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from reasonrag_jax.agent.episodes import (Episode, EpisodeRunner, derive_seed, runner_from_config,
                                          runner_scalars)
from reasonrag_jax.config import Config
from reasonrag_jax.data.qa import QAExample, read_qa
from reasonrag_jax.eval.metrics import accuracy, exact_match, f1_score, retrieval_recall
from reasonrag_jax.io import InputError, append_jsonl, read_jsonl, write_json_atomic
from reasonrag_jax.logs import write_scalars
from reasonrag_jax.sharding import lead_process, resume_keys, sync_processes

METRICS = ("em", "f1", "acc", "retrieval_recall")


def score_episode(ep: Episode) -> dict[str, float]:
    pred, golds = ep.prediction or "", list(ep.example.golden_answers)
    return {"em": exact_match(pred, golds), "f1": f1_score(pred, golds),
            "acc": accuracy(pred, golds),
            "retrieval_recall": retrieval_recall([p.contents for p in ep.passages], golds)}


def trace_record(ep: Episode) -> dict[str, Any]:
    return {**ep.to_trace(), "hops": ep.example.metadata.get("hops"), "metrics": score_episode(ep)}


def _mean(rows: list[dict[str, Any]]) -> dict[str, float]:
    n = max(len(rows), 1)
    out: dict[str, Any] = {"count": len(rows)}
    out.update({m: sum(r["metrics"][m] for r in rows) / n for m in METRICS})
    out["avg_retrievals"] = sum(r["retrievals"] for r in rows) / n
    out["avg_iterations"] = sum(r["iterations"] for r in rows) / n
    return out


def summarize(examples: Sequence[QAExample], traces: Path) -> dict[str, Any]:
    """Overall means and, when questions carry `metadata.hops`, means per hop count."""
    wanted = {ex.id for ex in examples}
    rows = {obj["id"]: obj for _, obj in read_jsonl(traces, allow_empty=True)
            if obj.get("id") in wanted}
    rows_in_order = [rows[ex.id] for ex in examples if ex.id in rows]
    summary = _mean(rows_in_order)
    hops = sorted({r["hops"] for r in rows_in_order if r.get("hops") is not None}, key=str)
    summary["by_hops"] = {str(h): _mean([r for r in rows_in_order if r.get("hops") == h])
                          for h in hops}
    return summary


def format_table(name: str, summary: dict[str, Any]) -> str:
    head = f"{'subset':<10}{'n':>6}{'EM':>7}{'F1':>7}{'Acc':>7}{'Recall':>8}{'Retr':>6}{'Iter':>6}"

    def line(label: str, s: dict[str, Any]) -> str:
        return (f"{label:<10}{s['count']:>6}" + "".join(
            f"{100 * s[m]:>{w}.1f}" for m, w in zip(METRICS, (7, 7, 7, 8)))
            + f"{s['avg_retrievals']:>6.2f}{s['avg_iterations']:>6.2f}")

    rows = [line("all", summary)] + [line(f"{h}-hop", s) for h, s in summary["by_hops"].items()]
    return "\n".join([f"== {name} ==", head, *rows])


def evaluate(runner: EpisodeRunner | None, examples: Sequence[QAExample], out: Path, *,
             temperature: float = 0.0, seed: int = 0, name: str = "eval") -> dict[str, Any]:
    """Run the questions of `examples` not yet in `out/traces.jsonl`, then summarise them all.

    `runner` may be None when nothing is left to run. A question's seed comes from its id, so a
    resumed run equals an uninterrupted one at any temperature.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    traces = out / "traces.jsonl"
    done = resume_keys(traces, "id")
    todo = [ex for ex in examples if ex.id not in done]
    lead = lead_process()
    if todo:
        if runner is None:
            raise ValueError("questions left to run but no runner given")
        seeds = [derive_seed(seed, zlib.crc32(ex.id.encode())) for ex in todo]
        with tqdm(total=len(examples), initial=len(examples) - len(todo), desc=name,
                  unit="q", disable=not lead) as bar:
            for _, _, ep in runner.rollouts(runner.start(todo), temperature, seeds):
                if lead:
                    append_jsonl(traces, [trace_record(ep)])
                bar.update(1)
    sync_processes(f"{traces} written")
    summary = summarize(examples, traces)
    if lead:
        write_json_atomic(out / "summary.json", summary)
        write_scalars(out / "tensorboard", {"eval": summary, **runner_scalars(runner)})
        print(format_table(name, summary))
    return summary



def _policy_identity(policy: str) -> str:
    """A local checkpoint by its absolute path, so a relative and an absolute `--out` resume
    the same run; a model name (e.g. `embedded`) as written."""
    return str(Path(policy).resolve()) if Path(policy).exists() else str(policy)


def _stored_run(marker: Path) -> dict[str, Any]:
    """The run a marker describes; markers written before `_policy_identity` hold the policy
    relative to the working directory."""
    run = json.loads(marker.read_text())
    return {**run, "policy": _policy_identity(run["policy"])}


def run_eval(cfg: Config, dataset: Path, index_dir: Path, checkpoint: str | None,
             out: Path) -> dict[str, Any]:
    """Evaluate `checkpoint` (default `cfg.model.policy`) on `dataset`; returns the summary."""
    dataset, out = Path(dataset), Path(out)
    examples = read_qa(dataset)
    policy = checkpoint or cfg.model.policy
    agent = {k: v for k, v in dataclasses.asdict(cfg.agent).items() if k != "batch_size"}
    run = {"dataset": str(dataset.resolve()), "index": str(Path(index_dir).resolve()),
           "policy": _policy_identity(policy), "agent": agent, "seed": cfg.seed}
    marker, done = out / "run.json", resume_keys(out / "traces.jsonl", "id")
    if done and marker.exists() and _stored_run(marker) != run:
        raise InputError(f"{out}: holds traces of a run with other settings (see {marker}); "
                         "use another --out")
    if lead_process():
        write_json_atomic(marker, run)

    todo = any(ex.id not in done for ex in examples)
    runner = runner_from_config(cfg, policy, index_dir) if todo else None
    return evaluate(runner, examples, out, temperature=cfg.agent.temperature, seed=cfg.seed,
                    name=dataset.name)
