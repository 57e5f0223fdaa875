"""A picture of one search tree: nodes coloured by MCTS value, edges labelled by step kind."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from reasonrag_jax.io import write_bytes_atomic


def _layout(nodes: list[dict[str, Any]]) -> dict[int, tuple[float, float]]:
    """Leaves get consecutive x positions; a parent sits above the middle of its children."""
    pos: dict[int, tuple[float, float]] = {}
    next_x = [0.0]

    def place(i: int) -> float:
        kids = nodes[i]["children"]
        if not kids:
            x = next_x[0]
            next_x[0] += 1.0
        else:
            xs = [place(k) for k in kids]
            x = sum(xs) / len(xs)
        pos[i] = (x, -nodes[i]["depth"])
        return x

    place(0)
    return pos


def render_tree(dump: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = dump["nodes"]
    pos = _layout(nodes)
    width = max(4.0, 0.6 * max(x for x, _ in pos.values()) + 2)
    fig, ax = plt.subplots(figsize=(min(width, 24), 1.2 * (1 + max(n["depth"] for n in nodes)) + 1), dpi=110)
    cmap = plt.get_cmap("RdYlGn")
    for n in nodes:
        if n["parent"] >= 0:
            (x0, y0), (x1, y1) = pos[n["parent"]], pos[n["id"]]
            ax.plot([x0, x1], [y0, y1], color="0.6", lw=1, zorder=1)
            ax.text((x0 + x1) / 2, (y0 + y1) / 2, n["kind"][0].upper(), fontsize=7, color="0.3")
    xs, ys = zip(*(pos[n["id"]] for n in nodes))
    sc = ax.scatter(xs, ys, c=[n["q_value"] for n in nodes], cmap=cmap, vmin=0, vmax=1, s=120,
                    edgecolors=["black" if n["terminal"] else "none" for n in nodes], zorder=2)
    fig.colorbar(sc, ax=ax, label="MCTS value (mean SPRE)")
    ax.set_title(f"{dump['question'][:80]}  (gold: {dump['golden_answers'][0]})", fontsize=9)
    ax.set_axis_off()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
