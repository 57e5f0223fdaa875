"""Preference pairs from finished search trees (RAG-ProGuide fields).

Both kinds of pair are single steps — one (instruction, input) prompt and two alternative
responses from the same state — so one DPO trainer reads both files and the ablation changes
only how a step is judged:

- Process pairs (PRL): siblings whose MCTS values (mean SPRE estimate backed up through the node)
  differ by at least `min_gap` and whose tagged contents differ; the higher value is chosen.
- Outcome pairs (ORL): the same siblings, each labelled by the final-answer F1 of one complete
  trajectory through it — the first one the search sampled (its own answer for an answer node,
  else its first SPRE rollout, a sampled finish of the episode from that node). No average over
  rollouts, no length discount: the one sparse outcome an outcome-reward method credits to every
  step of the episode it sampled. Where the two first outcomes tie (both wrong, or both right at
  different lengths) there is no pair; where one lucky or unlucky rollout disagrees with the
  average, the label follows the rollout. That credit noise is what process supervision removes.

Why this is the outcome counterpart on step pairs: an outcome method sees each sampled episode's
final reward and nothing else about its steps. Trajectory-level DPO would compare whole
continuations from a branch point, which are multi-prompt sequences the step-level trainer
cannot read (later steps have different prompts on the two sides); what it can read is the
first step of each continuation, labelled by the outcome of the episode it was sampled in.
An earlier version labelled each sibling pair by the largest F1 gap among all trajectories
through the two siblings; that best-against-worst choice reads every rollout the search made,
and in the ablation's first 16 trees it gave exactly PRL's pairs (16 of 16), so the two
methods could not differ. Preferring every later step of the better trajectory needs
multi-step pairs in the trainer (`train/data.py`); not built.
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


def _sibling_pairs(dump: dict[str, Any], value: dict[int, float], min_gap: float
                   ) -> list[dict[str, Any]]:
    """Every pair of siblings that both have a `value`, differ by ≥ `min_gap` in it and differ
    in tagged content, in tree order (parent id, then the children's creation order); the
    higher value is chosen."""
    nodes = dump["nodes"]
    out = []
    for node in nodes:
        kids = [c for c in node["children"] if c in value]
        for a, b in combinations(kids, 2):
            va, vb = value[a], value[b]
            if abs(va - vb) < min_gap or nodes[a]["content"] == nodes[b]["content"]:
                continue
            good, bad = (a, b) if va > vb else (b, a)
            out.append(_pair(dump, good, bad, max(va, vb), min(va, vb)))
    return out


def process_pairs(dump: dict[str, Any], min_gap: float = 0.01) -> list[dict[str, Any]]:
    """Visited siblings labelled by their MCTS value (see the module docstring)."""
    return _sibling_pairs(dump, {n["id"]: n["q_value"] for n in dump["nodes"] if n["visits"] > 0},
                          min_gap)


def _path(nodes: list[dict[str, Any]], i: int) -> list[int]:
    path = [i]
    while nodes[path[-1]]["parent"] >= 0:
        path.append(nodes[path[-1]]["parent"])
    return path[::-1]


def first_outcomes(dump: dict[str, Any]) -> dict[int, float]:
    """Node → final-answer F1 of the first complete trajectory sampled through it. Node ids are
    creation order and a node's own answer or SPRE rollouts are sampled when it is created,
    before any descendant exists, so the first trajectory in node order is the first in time."""
    nodes, golds = dump["nodes"], dump["golden_answers"]
    first: dict[int, float] = {}
    for n in nodes:
        f1s = [f1_score(n["prediction"] or "", golds)] if n["terminal"] else []
        f1s += n.get("rollout_f1", [])
        if f1s:
            for i in _path(nodes, n["id"]):
                first.setdefault(i, f1s[0])
    return first


def outcome_pairs(dump: dict[str, Any], min_gap: float = 0.01) -> list[dict[str, Any]]:
    """Siblings labelled by the final-answer F1 of one sampled trajectory each (see the module
    docstring)."""
    return _sibling_pairs(dump, first_outcomes(dump), min_gap)


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
