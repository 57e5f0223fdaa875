"""MCTS bookkeeping: the batched array tree against one Python object per node.

One iteration is what `search` does between sampler calls in every tree: `grow` (add the child
with its value, back the value up and select the next node by UCT, in one jitted call), then
bring the children and the next leaves to the host — the call and host round trip exactly as
`search` makes them (plus the one `select` a search starts with). The peer is the original's
structure: a `Node` object with a list of children, and a Python loop over the B trees. Both
get the same values and terminal flags; trees grow to 64 simulations (65 nodes, 2 children). The
peer is pure Python and runs in this process (no thread pool or cache for the two sides to
share).

`bookkeeping_fraction` is the share of a real small `generate` run's wall time (SmolLM2, guided,
synthetic questions) spent in those tree calls, timed by wrapping them during the run;
`--no-real` skips it (null). Prints the curve over B, then one JSON line:
`{"jax_iter_ms_b256", "object_tree_iter_ms_b256", "ratio_b256", "bookkeeping_fraction",
"outside_model_fraction", "real_run_s", "curve", "isa"}`.

    JAX_PLATFORMS=cpu .venv/bin/python bench/mcts.py [--no-real]
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import print_result

from reasonrag_jax.mcts import tree as T

SIMULATIONS, CHILDREN, C_UCT = 64, 2, 1.4


class Node:
    """The original's node: Python attributes and a list of child objects."""

    def __init__(self, parent=None, terminal=False):
        self.parent, self.terminal = parent, terminal
        self.depth = parent.depth + 1 if parent else 0
        self.children, self.visits, self.value, self.reward = [], 0, 0.0, 0.0
        self.exhausted = terminal

    def fully_expanded(self):
        return len(self.children) >= CHILDREN

    def uct(self, child):
        if child.visits == 0:
            return math.inf
        return child.value / child.visits + C_UCT * math.sqrt(
            math.log(max(self.visits, 1)) / child.visits)


def object_iteration(roots: list[Node], values: np.ndarray, terminal: np.ndarray) -> None:
    for b, root in enumerate(roots):
        node = root
        while not node.terminal and node.fully_expanded():
            live = [c for c in node.children if not c.exhausted] or node.children
            node = max(live, key=node.uct)
        if not node.terminal:
            child = Node(node, bool(terminal[b]))
            child.reward = float(values[b])
            node.children.append(child)
            up = node
            while up is not None and up.fully_expanded() and all(c.exhausted for c in up.children):
                up.exhausted, up = True, up.parent
            node = child
        value = node.reward        # a selected terminal node is re-backed-up with its own value
        while node is not None:
            node.visits += 1
            node.value += value
            node = node.parent


def schedule(b: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.random((SIMULATIONS, b), dtype=np.float32),
            rng.random((SIMULATIONS, b)) < 0.2)


def search_iteration(tree: T.Tree, leaf: np.ndarray, c_uct: jax.Array, rows: np.ndarray,
                     at_node: np.ndarray, nodes: np.ndarray, values: np.ndarray,
                     terminal: np.ndarray) -> tuple[T.Tree, np.ndarray]:
    """One iteration of `reasonrag_jax.mcts.search.search` without the sampler: the same tree
    call with the same host round trip (the new children come back to be filed in the table,
    the next leaves to look up their episodes). `at_node[b, node]` stands in for that table's
    `done` flags, `nodes` for its host-side node counts."""
    room = nodes < tree.parent.shape[1]
    at_end = at_node[rows, leaf]
    valid = room & ~at_end
    kind = np.where(terminal, T.KINDS.index("answer"), T.KINDS.index("query")).astype(np.int32)
    tree, grown = T.grow(tree, leaf, kind, values, terminal, valid, room & at_end, c_uct)
    child, leaf = np.asarray(grown)
    nodes += child >= 0
    at_node[rows[valid], child[valid]] = terminal[valid]
    return tree, leaf


def time_jax(b: int, repeats: int) -> float:
    values, terminal = schedule(b)
    c, rows = jnp.full((b,), C_UCT, jnp.float32), np.arange(b)
    best = math.inf
    for _ in range(repeats + 1):       # the first pass compiles
        tree = T.init(b, SIMULATIONS + 1, CHILDREN)
        at_node = np.zeros((b, SIMULATIONS + 1), bool)
        nodes = np.ones(b, np.int64)
        jax.block_until_ready(tree)
        start = time.perf_counter()
        leaf = np.asarray(T.select(tree, c))        # once per search, as `search` does
        for i in range(SIMULATIONS):
            tree, leaf = search_iteration(tree, leaf, c, rows, at_node, nodes, values[i],
                                          terminal[i])
        jax.block_until_ready(tree)
        best = min(best, time.perf_counter() - start)
    return 1e3 * best / SIMULATIONS


def time_objects(b: int, repeats: int) -> float:
    values, terminal = schedule(b)
    best = math.inf
    for _ in range(repeats):
        roots = [Node() for _ in range(b)]
        start = time.perf_counter()
        for i in range(SIMULATIONS):
            object_iteration(roots, values[i], terminal[i])
        best = min(best, time.perf_counter() - start)
    return 1e3 * best / SIMULATIONS


def real_run_fractions(questions: int = 4, rollouts: int = 8) -> dict[str, float]:
    """Shares of a real small `generate` run's wall time (SmolLM2, guided, synthetic questions):
    `bookkeeping_fraction` in the tree calls `search` makes (select and grow, each
    waited for, so its device time counts where it is spent) and `outside_model_fraction`
    outside the sampler and retriever (tree calls, SPRE arithmetic, pairs, files)."""
    from reasonrag_jax.agent.episodes import EpisodeRunner
    from reasonrag_jax.config import load_config
    from reasonrag_jax.data.qa import read_qa
    from reasonrag_jax.data.synthetic import write_synthetic
    from reasonrag_jax.mcts.search import generate, output_paths
    from reasonrag_jax.models.weights import load_policy
    from reasonrag_jax.retrieval.index import Retriever, build_index
    from reasonrag_jax.sampling import Sampler

    cfg = load_config(None, [f"mcts.max_rollouts={rollouts}", "mcts.spre_rollouts=2",
                             f"mcts.batch_questions={questions}", "agent.max_retrievals=2",
                             "agent.max_step_tokens=32"])
    work = Path(tempfile.mkdtemp(prefix="bench_mcts_"))
    files = write_synthetic(work / "data", seed=0, num_entities=40)
    index = build_index(files["corpus"], work / "index", cfg.retrieval)
    model, tokenizer = load_policy("embedded")
    sampler = Sampler(model, tokenizer, cfg.sampler)
    retriever = Retriever.load(index, cfg.retrieval)
    spent = {"tree": 0.0, "model": 0.0}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return jax.block_until_ready(fn(*args, **kwargs))
            finally:
                spent[key] += time.perf_counter() - start
        return wrapper

    for obj, names, key in ((sampler, ("generate", "score"), "model"),
                            (retriever, ("search",), "model"),
                            (T, ("select", "grow"), "tree")):
        for name in names:
            setattr(obj, name, timed(getattr(obj, name), key))
    runner = EpisodeRunner(sampler, retriever, cfg.agent)
    examples = read_qa(files["train"])
    # Warm-up on other questions of the same batch size: compiles the sampler buckets and the
    # tree ops for these shapes, and imports matplotlib, so the timed run measures steady state.
    generate(runner, examples[questions:2 * questions], output_paths(work / "warm.jsonl"),
             cfg.mcts, 0)
    spent.update(tree=0.0, model=0.0)
    start = time.perf_counter()
    generate(runner, examples[:questions], output_paths(work / "pairs.jsonl"), cfg.mcts, 0)
    wall = time.perf_counter() - start
    print(f"real run: {wall:.1f} s wall, {spent['model']:.1f} s in sampler + retriever, "
          f"{spent['tree']:.3f} s in tree calls", flush=True)
    return {"bookkeeping_fraction": spent["tree"] / wall,
            "outside_model_fraction": (wall - spent["model"]) / wall, "real_run_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-real", action="store_true", help="skip the real-run fraction")
    args = ap.parse_args()
    curve = {}
    for b in args.batches:
        jax_ms, obj_ms = time_jax(b, args.repeats), time_objects(b, args.repeats)
        curve[b] = (jax_ms, obj_ms)
        print(f"B={b:5d}  jax {jax_ms:8.3f} ms/iter  objects {obj_ms:8.3f} ms/iter  "
              f"ratio {obj_ms / jax_ms:7.1f}", flush=True)
    jax_256, obj_256 = curve.get(256, (math.nan, math.nan))
    real = dict.fromkeys(("bookkeeping_fraction", "outside_model_fraction", "real_run_s"))
    if not args.no_real:
        real = real_run_fractions()
    print_result({"jax_iter_ms_b256": round(jax_256, 4),
                  "object_tree_iter_ms_b256": round(obj_256, 4),
                  "ratio_b256": round(obj_256 / jax_256, 2),
                  **{k: None if v is None else round(v, 4) for k, v in real.items()},
                  "curve": {str(b): {"jax_ms": round(j, 4), "object_ms": round(o, 4)}
                            for b, (j, o) in curve.items()}})


if __name__ == "__main__":
    main()
