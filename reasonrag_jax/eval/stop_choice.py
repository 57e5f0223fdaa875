"""`reasonrag-jax stop-choice`: the guided stop-or-search decision of one or more policies, measured on
the same reasoning states.

In guided mode a reasoning step answers when log P("So the answer is <answer>") exceeds
log P("So the next query is <query>") given the prompt (greedy; sampled from the two otherwise).
That margin is what SPRE's length discount should move: stop once the evidence holds the answer,
search while it does not. Retrieval counts show the behaviour after training; the margins show
the decision itself, state by state, on identical prompts for every checkpoint: the non-forced
reasoning prompts of an `eval` run's `traces.jsonl`, grouped by retrievals so far and by whether
the evidence so far contains a gold answer (SQuAD-normalised, whole words). Within a group each
question has at most one state, so its bootstrap interval is over questions.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reasonrag_jax.agent import protocol as P
from reasonrag_jax.config import Config
from reasonrag_jax.eval.metrics import normalize_answer
from reasonrag_jax.eval.stats import bootstrap_ci, paired_ci
from reasonrag_jax.io import InputError, read_jsonl, where, write_json_atomic


@dataclass(frozen=True)
class ReasoningState:
    id: str
    hops: Any
    retrievals: int         # usable queries before this step
    knows: bool             # the evidence so far contains a gold answer
    prompt: str

    @property
    def group(self) -> str:
        counted = f"{self.retrievals} retrieval{'' if self.retrievals == 1 else 's'}"
        return f"{counted}, {'answer in' if self.knows else 'no answer in'} evidence"


def answer_margins(sampler: Any, prompts: Sequence[str]) -> np.ndarray:
    """[P] log P(answer scaffold) − log P(query scaffold) in nats: > 0 means a greedy guided
    step answers. One `score` call (each prompt read once with the prefix cache)."""
    if not prompts:
        return np.zeros(0, np.float64)
    scores = np.asarray(sampler.score(list(prompts), [list(P.CHOICE_SCAFFOLDS)] * len(prompts)),
                        np.float64)
    return scores[:, P.CHOICES.index(P.ANSWER)] - scores[:, P.CHOICES.index(P.QUERY)]


def _contains(text: str, golds: Sequence[str]) -> bool:
    padded = f" {normalize_answer(text)} "
    return any(g and f" {g} " in padded for g in map(normalize_answer, golds))


def reasoning_states(traces: Iterable[tuple[int, dict[str, Any]]], path: Path
                     ) -> list[ReasoningState]:
    """Every reasoning step of each trace where the policy could choose (the forced answer at
    the cap and after an unusable query is not a choice), with what it had seen by then."""
    states = []
    for line, rec in traces:
        for name in ("id", "golden_answers", "steps"):
            if name not in rec:
                raise InputError(f"{where(path, line, name)} is missing (not an eval traces file?)")
        retrievals, evidence = 0, []
        for k, step in enumerate(rec["steps"]):
            for name in ("state", "kind", "prompt"):
                if name not in step:
                    raise InputError(f"{where(path, line, f'steps[{k}].{name}')} is missing")
            if step["state"] == P.REASONING and P.FORCED_TASK not in step["prompt"]:
                states.append(ReasoningState(rec["id"], rec.get("hops"), retrievals,
                                             any(_contains(e, rec["golden_answers"])
                                                 for e in evidence),
                                             step["prompt"]))
            if step["kind"] == P.QUERY and step.get("query"):
                retrievals += 1
            if step["kind"] == P.EVIDENCE and step.get("evidence"):
                evidence.append(step["evidence"])
    return states


def compare(states: Sequence[ReasoningState], margins: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per group and policy: states, mean margin with its 95 % interval, the share of states the
    policy answers at; and each later policy's mean margin minus the first's (paired)."""
    names = list(margins)
    groups: dict[str, list[int]] = {}
    for i in sorted(range(len(states)), key=lambda i: (states[i].retrievals, not states[i].knows)):
        groups.setdefault(states[i].group, []).append(i)
    out: dict[str, Any] = {"policies": names, "states": len(states), "groups": {}}
    for group, idx in groups.items():
        row: dict[str, Any] = {"states": len(idx)}
        for name in names:
            m = margins[name][idx]
            ci = bootstrap_ci(m)
            row[name] = {"margin": ci.mean, "ci": [ci.low, ci.high],
                         "answers": float((m > 0).mean())}
            if name != names[0]:
                d = paired_ci(m, margins[names[0]][idx])
                row[name]["minus_first"] = {"margin": d.mean, "ci": [d.low, d.high]}
        out["groups"][group] = row
    return out


def format_table(result: dict[str, Any]) -> str:
    """Markdown: one row per group, one column per policy — mean margin [95 % CI], answer share,
    and for later policies the paired difference from the first."""
    names = result["policies"]
    head = ["state", "n"] + [f"`{n}`" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group, row in result["groups"].items():
        cells = [group, str(row["states"])]
        for name in names:
            c = row[name]
            cell = f"{c['margin']:+.2f} [{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}], answers {c['answers']:.0%}"
            if "minus_first" in c:
                d = c["minus_first"]
                cell += f"; Δ {d['margin']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_stop_choice(cfg: Config, traces: Path, checkpoints: Sequence[str], out: Path) -> dict[str, Any]:
    """Score every non-forced reasoning state of `traces` under each checkpoint, write
    `out` (JSON: the comparison and every state's margins) and return the comparison."""
    from reasonrag_jax.agent.episodes import sampler_from_config

    twice = sorted({c for c in checkpoints if list(checkpoints).count(c) > 1})
    if twice:
        raise InputError(f"--checkpoint {twice[0]} is given twice: each policy is one column")
    states = reasoning_states(read_jsonl(traces), traces)
    if not states:
        raise InputError(f"{traces}: no reasoning step where the policy could choose")
    margins = {}
    for ckpt in checkpoints:
        margins[ckpt] = answer_margins(sampler_from_config(cfg, ckpt), [s.prompt for s in states])
    result = compare(states, margins)
    write_json_atomic(out, {**result, "traces": str(traces), "per_state": [
        {"id": s.id, "hops": s.hops, "retrievals": s.retrievals, "knows": s.knows,
         **{name: float(margins[name][i]) for name in margins}} for i, s in enumerate(states)]})
    return result
