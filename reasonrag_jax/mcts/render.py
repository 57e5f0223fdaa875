"""One search tree for people: a JSON dump (arrays + node texts) and a PNG picture.

The dump is the one place where the arrays and the host-side episode table meet; pair mining
and the picture read only dumps, so they work on a finished run's `*.trees.jsonl` alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from reasonrag_jax.io import save_figure
from reasonrag_jax.mcts import tree as T

_FIELDS = ("parent", "depth", "kind", "visits", "value_sum", "reward", "terminal", "children")


def dump_tree(tree: T.Tree, i: int, episodes: dict[int, Any],
              rollout_f1: dict[int, list[float]] | None = None, **extra: Any) -> dict[str, Any]:
    """Tree `i` of the batch as JSON: one record per node with its statistics, its step and the
    answer F1 of each value rollout run from it."""
    rollout_f1 = rollout_f1 or {}
    arr = {k: np.asarray(getattr(tree, k)[i]) for k in _FIELDS}
    example = episodes[T.ROOT].example
    nodes = []
    for node in range(int(tree.num_nodes[i])):
        ep = episodes[node]
        step = ep.steps[-1] if node != T.ROOT else None
        visits = int(arr["visits"][node])
        nodes.append({
            "id": node, "parent": int(arr["parent"][node]), "depth": int(arr["depth"][node]),
            "kind": T.KINDS[int(arr["kind"][node])], "visits": visits,
            "q_value": float(arr["value_sum"][node]) / max(1, visits),
            "reward": float(arr["reward"][node]), "terminal": bool(arr["terminal"][node]),
            "children": [int(x) for x in arr["children"][node] if x >= 0],
            "instruction": step.instruction if step else "", "input": step.input if step else "",
            "prompt": step.prompt if step else "", "response": step.response if step else "",
            "content": step.content if step else "", "prediction": ep.prediction,
            "retrieved": [p.id for p in step.retrieved] if step else [],
            "rollout_f1": [round(float(f), 6) for f in rollout_f1.get(node, [])],
        })
    return {"question_id": example.id, "question": example.question,
            "golden_answers": list(example.golden_answers), **extra, "nodes": nodes}


def _layout(nodes: list[dict[str, Any]]) -> dict[int, tuple[float, float]]:
    """Leaves get consecutive x positions; a parent sits above the middle of its children."""
    pos: dict[int, tuple[float, float]] = {}
    next_x = [0.0]

    def place(i: int) -> float:
        kids = nodes[i]["children"]
        if kids:
            x = float(np.mean([place(k) for k in kids]))
        else:
            x, next_x[0] = next_x[0], next_x[0] + 1.0
        pos[i] = (x, -nodes[i]["depth"])
        return x

    place(T.ROOT)
    return pos


def render_tree(dump: dict[str, Any], path: str | Path) -> None:
    """PNG of one tree: node colour = MCTS value, black ring = answer node, edge label = kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = dump["nodes"]
    pos = _layout(nodes)
    width = min(24.0, max(5.0, 0.7 * max(x for x, _ in pos.values()) + 3))
    height = 1.2 * (1 + max(n["depth"] for n in nodes)) + 1.5
    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    for n in nodes[1:]:
        (x0, y0), (x1, y1) = pos[n["parent"]], pos[n["id"]]
        ax.plot([x0, x1], [y0, y1], color="0.65", lw=1, zorder=1)
        ax.text((x0 + x1) / 2, (y0 + y1) / 2, n["kind"], fontsize=6, color="0.25",
                ha="center", va="center", bbox={"fc": "white", "ec": "none", "pad": 0.5})
    xs, ys = zip(*(pos[n["id"]] for n in nodes))
    dots = ax.scatter(xs, ys, c=[n["q_value"] for n in nodes], cmap="RdYlGn", vmin=0, vmax=1,
                      s=140, linewidths=1.5, zorder=2,
                      edgecolors=["black" if n["terminal"] else "none" for n in nodes])
    fig.colorbar(dots, ax=ax, label="MCTS value (mean SPRE)")
    gold = dump["golden_answers"][0] if dump["golden_answers"] else ""
    ax.set_title(f"{dump['question'][:90]}  (gold: {gold})", fontsize=9)
    ax.set_axis_off()
    save_figure(fig, path)
