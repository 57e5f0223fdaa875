"""Preference pairs from finished search trees (RAG-ProGuide fields).

Both kinds of pair are single steps — one (instruction, input) prompt and two alternative
responses from the same state — so one DPO trainer reads both files and the ablation changes
only how a step is judged:

- Process pairs (PRL): siblings whose MCTS values (mean SPRE estimate backed up through the node)
  differ by at least `min_gap` and whose tagged contents differ; the higher value is chosen.
- Outcome pairs (ORL): complete trajectories of the same question compared by final-answer F1
  only — no length discount, no credit for intermediate steps. The trajectories are the tree's
  answer nodes and the SPRE rollouts (each a sampled finish of the episode at the node it started
  from; their F1s are in the dump's `rollout_f1`), so ORL sees every episode the search sampled,
  as an outcome-reward method would. Two trajectories share every step up to their branch point,
  so what the comparison can teach is the first step where they differ: chosen/rejected are
  those two sibling steps, the rewards are the two trajectories' F1 (trajectories on one
  root-to-node path have no branch point and are not compared). Pairing whole trajectories
  instead would give multi-prompt sequences the step-level trainer cannot use. Many trajectory
  pairs meet at the same sibling pair; we keep one per sibling pair (the comparison with the
  largest F1 gap, first found on ties), so both files are per-branch-point and of comparable
  size. Outcome comparisons may still point "the wrong way" for a step (a good query followed by
  a bad answer) — that credit noise is exactly what process supervision removes, so it is kept.

Why this is the outcome counterpart: trajectory-level DPO on a better and a worse trajectory
sums each side's step log-ratios, and the shared steps before the branch point cancel, so what
it compares is the two continuations from the branch point on. A step-level trainer can only
take the first of those steps (later ones have different prompts on each side), which is the
pair kept here, labelled by final-answer F1 alone. Both pair sets therefore sit at sibling
branch points of the same trees, and the ablation differs only in the label: PRL's discounted
subtree mean (SPRE) against ORL's single-trajectory outcome. Preferring every later step of the
better trajectory needs multi-step pairs in the trainer (`train/data.py`).
"""
from __future__ import annotations

from collections import Counter
from itertools import combinations
from typing import Any

import numpy as np

from reasonrag_jax.eval.metrics import f1_score

ACTION_TYPES = {"query": "Query Generation", "evidence": "Evidence Extraction",
                "answer": "Answer Generation"}


def _pair(dump: dict[str, Any], good: int, bad: int, good_reward: float,
          bad_reward: float) -> dict[str, Any]:
    g, b = dump["nodes"][good], dump["nodes"][bad]
    return {
        "instruction": g["instruction"], "input": g["input"], "prompt": g["prompt"],
        "chosen": g["response"], "rejected": b["response"],
        "chosen_action_type": ACTION_TYPES[g["kind"]],
        "rejected_action_type": ACTION_TYPES[b["kind"]],
        "chosen_content": g["content"], "rejected_content": b["content"],
        "layer": g["depth"] - 1, "question_id": dump["question_id"],   # the parent's depth
        "chosen_reward": round(float(good_reward), 6),
        "rejected_reward": round(float(bad_reward), 6),
    }


def process_pairs(dump: dict[str, Any], min_gap: float = 0.01) -> list[dict[str, Any]]:
    """Every pair of visited siblings with a value gap ≥ `min_gap` and different contents,
    in tree order (parent id, then the children's creation order)."""
    nodes = dump["nodes"]
    out = []
    for node in nodes:
        kids = [c for c in node["children"] if nodes[c]["visits"] > 0]
        for a, b in combinations(kids, 2):
            va, vb = nodes[a]["q_value"], nodes[b]["q_value"]
            if abs(va - vb) < min_gap or nodes[a]["content"] == nodes[b]["content"]:
                continue
            good, bad = (a, b) if va > vb else (b, a)
            out.append(_pair(dump, good, bad, max(va, vb), min(va, vb)))
    return out


def _path(nodes: list[dict[str, Any]], i: int) -> list[int]:
    path = [i]
    while nodes[path[-1]]["parent"] >= 0:
        path.append(nodes[path[-1]]["parent"])
    return path[::-1]


def outcome_pairs(dump: dict[str, Any], min_gap: float = 0.01) -> list[dict[str, Any]]:
    """One pair per sibling pair where two complete trajectories (answer nodes and rollouts)
    branch and their final-answer F1 differ by ≥ `min_gap` (see the module docstring), ordered
    by branch point."""
    nodes, golds = dump["nodes"], dump["golden_answers"]
    ends = []   # (node the trajectory passes last in the tree, its answer F1), in node order
    for n in nodes:
        if n["terminal"]:
            ends.append((n["id"], f1_score(n["prediction"] or "", golds)))
        ends += [(n["id"], f) for f in n.get("rollout_f1", [])]
    paths = {t: _path(nodes, t) for t in {t for t, _ in ends}}   # many trajectories per node
    best: dict[tuple[int, int], tuple[float, int, float, int, float]] = {}  # gap, good, f1, bad, f1
    for (t1, f1), (t2, f2) in combinations(ends, 2):
        gap = abs(f1 - f2)
        if gap < min_gap:
            continue
        p1, p2 = paths[t1], paths[t2]
        d = next((i for i, (x, y) in enumerate(zip(p1, p2)) if x != y), None)
        if d is None:
            continue
        a, b = p1[d], p2[d]
        if nodes[a]["content"] == nodes[b]["content"]:
            continue
        key = (min(a, b), max(a, b))
        if key not in best or gap > best[key][0]:
            best[key] = (gap, *((a, f1, b, f2) if f1 > f2 else (b, f2, a, f1)))
    out = []
    for key in sorted(best, key=lambda k: (nodes[k[0]]["parent"], k)):
        _, good, good_f1, bad, bad_f1 = best[key]
        out.append(_pair(dump, good, bad, good_f1, bad_f1))
    return out


def summarize(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts per action type and per layer, and the reward gap (mean and quartiles)."""
    gaps = [p["chosen_reward"] - p["rejected_reward"] for p in pairs]
    return {"pairs": len(pairs),
            "by_action_type": dict(Counter(p["chosen_action_type"] for p in pairs)),
            "by_layer": {str(k): v for k, v in sorted(Counter(p["layer"] for p in pairs).items())},
            "mean_reward_gap": float(np.mean(gaps)) if gaps else 0.0,
            "reward_gap_quartiles": [round(float(q), 6) for q in np.quantile(gaps, [.25, .5, .75])]
            if gaps else []}


def search_stats(dumps: list[dict[str, Any]]) -> dict[str, Any]:
    """What the trees offer pair mining: how many hold an answer node, how many found a correct
    answer on some trajectory (an answer node or a rollout with F1 = 1), the mean best F1, and
    whether answering at the root beat searching (the root's answer child's value against its
    best query child's, where both were tried) — the stop/continue signal SPRE is there for."""
    with_answer = correct = answer_first = both = 0
    best = []
    for dump in dumps:
        nodes, golds = dump["nodes"], dump["golden_answers"]
        f1s = [f1_score(n["prediction"] or "", golds) for n in nodes if n["terminal"]]
        f1s += [f for n in nodes for f in n.get("rollout_f1", [])]
        with_answer += any(n["terminal"] for n in nodes)
        correct += any(f >= 1.0 for f in f1s)
        best.append(max(f1s, default=0.0))
        kids = [nodes[c] for c in nodes[0]["children"] if nodes[c]["visits"] > 0]
        answer = [k["q_value"] for k in kids if k["kind"] == "answer"]
        query = [k["q_value"] for k in kids if k["kind"] == "query"]
        if answer and query:
            both += 1
            answer_first += max(answer) > max(query)
    n = max(len(dumps), 1)
    return {"trees": len(dumps), "with_answer_node": with_answer / n, "found_correct": correct / n,
            "mean_best_f1": float(np.mean(best)) if best else 0.0,
            "root_answer_vs_query": both, "root_answer_preferred": answer_first / max(both, 1)}
