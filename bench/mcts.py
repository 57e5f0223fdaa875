"""MCTS bookkeeping: the batched array tree against one Python object per node.

One iteration is what the search loop does between sampler calls in every tree: select a node
by UCT, add a child with its value, back the value up. The reference is the original's
structure: a `Node` object with a list of children, and a Python loop over the B trees. Both get
the same values and terminal flags; trees grow to 64 simulations (65 nodes, 2 children).

`bookkeeping_fraction` is measured on a real small `generate` run (SmolLM2, guided, synthetic
questions) as the share of wall time spent outside the sampler and retriever calls; `--no-real`
skips it (reported as null). Prints the curve over B, then one JSON line:
`{"jax_iter_ms_b256", "object_tree_iter_ms_b256", "ratio_b256", "bookkeeping_fraction", ...}`.

    JAX_PLATFORMS=cpu .venv/bin/python bench/mcts.py [--no-real]
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

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


def time_jax(b: int, repeats: int) -> float:
    values, terminal = schedule(b)
    values, terminal = list(jnp.asarray(values)), list(jnp.asarray(terminal))
    kind, c = jnp.ones((b,), jnp.int32), jnp.full((b,), C_UCT, jnp.float32)
    best = math.inf
    for _ in range(repeats + 1):       # the first pass compiles
        tree = T.init(b, SIMULATIONS + 1, CHILDREN)
        jax.block_until_ready(tree)
        start = time.perf_counter()
        for i in range(SIMULATIONS):
            tree, _, _ = T.iteration(tree, c, kind, values[i], terminal[i])
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


def bookkeeping_fraction(questions: int = 4, rollouts: int = 8) -> float:
    """Share of a real small `generate` run's wall time spent outside sampler and retriever."""
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
    inside = [0.0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                inside[0] += time.perf_counter() - start
        return wrapper

    for obj, names in ((sampler, ("generate", "score")), (retriever, ("search",))):
        for name in names:
            setattr(obj, name, timed(getattr(obj, name)))
    runner = EpisodeRunner(sampler, retriever, cfg.agent)
    examples = read_qa(files["train"])
    # Warm-up on other questions of the same batch size: compiles the sampler buckets and the
    # tree ops for these shapes, and imports matplotlib, so the timed run measures steady state.
    generate(runner, examples[questions:2 * questions], output_paths(work / "warm.jsonl"),
             cfg.mcts, 0)
    examples = examples[:questions]
    inside[0] = 0.0
    start = time.perf_counter()
    generate(runner, examples, output_paths(work / "pairs.jsonl"), cfg.mcts, 0)
    wall = time.perf_counter() - start
    print(f"real run: {wall:.1f} s wall, {inside[0]:.1f} s in sampler + retriever", flush=True)
    return (wall - inside[0]) / wall


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
    result = {"jax_iter_ms_b256": round(jax_256, 4), "object_tree_iter_ms_b256": round(obj_256, 4),
              "ratio_b256": round(obj_256 / jax_256, 2),
              "bookkeeping_fraction": None if args.no_real else round(bookkeeping_fraction(), 4),
              "curve": {str(b): {"jax_ms": round(j, 4), "object_ms": round(o, 4)}
                        for b, (j, o) in curve.items()}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
