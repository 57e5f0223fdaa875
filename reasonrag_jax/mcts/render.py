"""One search tree for people: a JSON dump (arrays + node texts) and a PNG picture.

The dump is the one place where the arrays and the host-side episode table meet; pair mining
and the picture read only dumps, so they work on a finished run's `*.trees.jsonl` alone.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from reasonrag_jax.io import save_figure
from reasonrag_jax.mcts import tree as T

_FIELDS = ("parent", "depth", "kind", "visits", "value_sum", "reward", "terminal", "children")


def dump_tree(tree: T.Tree, i: int, episodes: dict[int, Any],
              rollout_f1: dict[int, list[float]] | None = None,
              seeds: dict[int, int] | None = None, **extra: Any) -> dict[str, Any]:
    """Tree `i` of the batch as JSON: one record per node with its statistics, its step, the
    answer F1 of each value rollout run from it and the seed its step and rollouts were drawn
    with (rollout r of a node replays as `runner.finish([its episode], T, [seed], k)[0][r]`;
    the root's is the question's, which the iteration seeds derive from)."""
    rollout_f1, seeds = rollout_f1 or {}, seeds or {}
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
            "seed": seeds.get(node),
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


def _label(node: dict[str, Any], width: int = 28) -> str:
    """`kind #id`, the step's content shortened to two lines, and `Q=value N=visits`."""
    content = " ".join((node["content"] or node["prediction"] or "").split())
    lines = textwrap.wrap(content, width, max_lines=2, placeholder="…") if node["id"] else []
    head = "question" if node["id"] == T.ROOT else f"{node['kind']} #{node['id']}"
    return "\n".join([head, *lines, f"Q={node['q_value']:.2f}  N={node['visits']}"])


def _pair_marks(dump: dict[str, Any], pairs: list[dict[str, Any]]) -> dict[int, str]:
    """node id → 'chosen' / 'rejected' for the sibling steps of `pairs` (matched by prompt and
    response, which identify a step within one tree)."""
    by_step = {(n["input"], n["response"]): n["id"] for n in dump["nodes"][1:]}
    marks: dict[int, str] = {}
    for p in pairs:
        for side in ("rejected", "chosen"):         # a node chosen in one pair stays chosen
            node = by_step.get((p["input"], p[side]))
            if node is not None:
                marks[node] = side
    return marks


def render_tree(dump: dict[str, Any], path: str | Path,
                pairs: list[dict[str, Any]] | None = None) -> Any:
    """PNG of one tree: each node's step (shortened), value Q and visits N, colour = value,
    black ring = answer node, green / red ring = the chosen / rejected step of a process pair
    (`pairs`, default: the tree's own process pairs), the question wrapped to fit.
    Returns the (already saved) matplotlib Figure."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from reasonrag_jax.mcts.pairs import process_pairs

    nodes = dump["nodes"]
    marks = _pair_marks(dump, process_pairs(dump) if pairs is None else pairs)
    pos = _layout(nodes)
    leaves = 1 + max(x for x, _ in pos.values())
    depth = 1 + max(n["depth"] for n in nodes)
    width = min(48.0, max(7.0, 2.3 * leaves + 2))
    fig = Figure(figsize=(width, 1.9 * depth + 1.8), dpi=100)
    ax = fig.subplots()
    for n in nodes[1:]:
        (x0, y0), (x1, y1) = pos[n["parent"]], pos[n["id"]]
        ax.plot([x0, x1], [y0, y1], color="0.7", lw=1, zorder=1)
    ring = {"chosen": "tab:green", "rejected": "tab:red"}
    xs, ys = zip(*(pos[n["id"]] for n in nodes))
    dots = ax.scatter(xs, ys, c=[n["q_value"] for n in nodes], cmap="RdYlGn", vmin=0, vmax=1,
                      s=160, zorder=2, linewidths=[3 if n["id"] in marks else 1.5 for n in nodes],
                      edgecolors=[ring.get(marks.get(n["id"]), "black" if n["terminal"] else "none")
                                  for n in nodes])
    for n in nodes:
        x, y = pos[n["id"]]
        ax.text(x, y - 0.12, _label(n), fontsize=6.5, ha="center", va="top", zorder=3,
                bbox={"fc": "white", "ec": ring.get(marks.get(n["id"]), "0.85"), "pad": 1.5})
    ax.set_xlim(-0.7, leaves - 0.3)
    ax.set_ylim(-depth + 0.25, 0.35)
    ax.set_axis_off()
    fig.colorbar(dots, ax=ax, label="MCTS value Q (mean SPRE)", fraction=0.02, pad=0.01)
    ax.legend(handles=[Line2D([], [], ls="", marker="o", mfc="white", mec=c, mew=2, label=k)
                       for k, c in [("chosen", ring["chosen"]), ("rejected", ring["rejected"]),
                                    ("answer", "black")]], loc="upper left", fontsize=7,
              frameon=False)
    gold = ", ".join(dump["golden_answers"])
    chars = max(40, int(width * 12))                 # ~12 title characters per inch at 9 pt
    fig.suptitle(textwrap.fill(f"{dump['question']}  (gold: {gold})", chars), fontsize=9)
    save_figure(fig, path)
    return fig
