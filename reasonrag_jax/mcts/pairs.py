"""Preference pairs from finished search trees (RAG-ProGuide fields).

Process pairs (PRL): siblings — alternative next steps from the same state — whose MCTS values
differ by at least `min_gap` and whose tagged contents differ; the better one is chosen.
Outcome pairs (ORL, the ablation): the same branch points, but each sibling is scored only by
the final-answer F1 of the best finished trajectory through it — what an outcome-supervised
method sees — with no shortest-path discount and no credit for intermediate steps.
"""
from __future__ import annotations

from collections import Counter
from itertools import combinations
from typing import Any

import numpy as np

from reasonrag_jax.eval.metrics import f1_score

ACTION_TYPES = {"query": "Query Generation", "evidence": "Evidence Extraction",
                "answer": "Answer Generation"}


def _pair(dump: dict[str, Any], good: int, bad: int, values: list[float]) -> dict[str, Any]:
    g, b = dump["nodes"][good], dump["nodes"][bad]
    return {
        "instruction": g["instruction"], "input": g["input"], "prompt": g["prompt"],
        "chosen": g["response"], "rejected": b["response"],
        "chosen_action_type": ACTION_TYPES[g["kind"]], "rejected_action_type": ACTION_TYPES[b["kind"]],
        "chosen_content": g["content"], "rejected_content": b["content"],
        "layer": g["depth"], "question_id": dump["question_id"],
        "chosen_reward": round(float(values[good]), 6), "rejected_reward": round(float(values[bad]), 6),
    }


def _sibling_pairs(dump: dict[str, Any], values: list[float], min_gap: float) -> list[dict[str, Any]]:
    out = []
    for node in dump["nodes"]:
        kids = [c for c in node["children"] if values[c] is not None]
        for a, b in combinations(kids, 2):
            na, nb = dump["nodes"][a], dump["nodes"][b]
            if abs(values[a] - values[b]) < min_gap or na["content"] == nb["content"]:
                continue
            good, bad = (a, b) if values[a] > values[b] else (b, a)
            out.append(_pair(dump, good, bad, values))
    return out


def process_pairs(dump: dict[str, Any], min_gap: float = 0.01) -> list[dict[str, Any]]:
    """Sibling pairs by MCTS value (mean SPRE estimate backed up through the node)."""
    values = [n["q_value"] if n["visits"] else None for n in dump["nodes"]]
    return _sibling_pairs(dump, values, min_gap)


def outcome_pairs(dump: dict[str, Any], min_gap: float = 0.01) -> list[dict[str, Any]]:
    """Sibling pairs by the best final-answer F1 among finished trajectories below each node."""
    nodes, golds = dump["nodes"], dump["golden_answers"]
    best: list[float | None] = [None] * len(nodes)
    for i in sorted(range(len(nodes)), key=lambda i: -nodes[i]["depth"]):
        n = nodes[i]
        own = f1_score(n["prediction"] or "", golds) if n["terminal"] else None
        below = [best[c] for c in n["children"] if best[c] is not None]
        cands = ([own] if own is not None else []) + below
        best[i] = max(cands) if cands else None
    return _sibling_pairs(dump, best, min_gap)


def summarize(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"pairs": len(pairs),
            "by_action_type": dict(Counter(p["chosen_action_type"] for p in pairs)),
            "by_layer": {str(k): v for k, v in sorted(Counter(p["layer"] for p in pairs).items())},
            "mean_reward_gap": float(np.mean([p["chosen_reward"] - p["rejected_reward"]
                                              for p in pairs])) if pairs else 0.0}
