"""MCTS over reasoning steps for a batch of questions, and `reasonrag-jax generate`.

An iteration of one tree: select a node (UCT, arrays) → expand it by one protocol step
(retrieval included for query steps) → value the new node (SPRE: K rollouts that finish its
episode) → back the value up and select the next node (`tree.grow`). The B trees of a batch do
not wait for each other: each round is ONE batched `runner.expand` over every tree's pending
step (an expansion, or the next step of each unfinished rollout), and every tree whose new node
is valued grows in ONE tree call and joins the next round with its next expansion. A tree's
dump depends only on its own seeds, never on the batch or on when its steps ran.
Selection is standard UCT (`tree.select`): an answer node competes with its siblings like any
other node. A selected answer node cannot grow; its own value is backed up again (no new node),
so when answering is right its visits and its ancestors' values keep growing towards it.
With `mcts.untried_choice` a reasoning node whose children all made one choice expands the
other next (`untried_choice`): a policy that nearly always searches on still gets an answer
sibling (terminal: no rollouts) beside its query, so stop-or-search pairs exist at every depth.
Episodes in the search stop after `mcts.max_retrievals` queries (the original: 3 in data
generation, against 4 at inference, `agent.max_retrievals`).

Outputs next to `out` (pairs.jsonl): `pairs.trees.jsonl` (one tree dump per question, the
source of truth), `pairs.jsonl` (process pairs), `pairs.outcome.jsonl` (outcome pairs),
`pairs.summary.json` and `pairs.tree.png`. Every batch appends its trees, then their pairs, each
with one atomic write; a re-run first rebuilds both pair files from the trees (repairing a kill
between the two writes) and skips the searched questions. Seeds depend only on (seed, question
id), so a resumed run writes the same files as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import time
import zlib
from pathlib import Path
from typing import Any, Protocol

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from reasonrag_jax.agent.episodes import Episode, derive_seed, runner_scalars
from reasonrag_jax.agent.protocol import CHOICES
from reasonrag_jax.config import Config, MCTSConfig
from reasonrag_jax.data.qa import QAExample, read_qa
from reasonrag_jax.io import append_jsonl, read_jsonl, write_json_atomic, write_jsonl_atomic
from reasonrag_jax.logs import write_scalars
from reasonrag_jax.mcts import pairs as P
from reasonrag_jax.mcts import tree as T
from reasonrag_jax.mcts.render import dump_tree, render_tree
from reasonrag_jax.mcts.spre import SPRE, ValueFn, answer_f1
from reasonrag_jax.sharding import lead_process, resume_keys


class Runner(Protocol):
    """What the search needs of an episode runner (`agent.episodes.EpisodeRunner`)."""

    def start(self, examples: list[QAExample]) -> list[Episode]: ...

    def expand(self, episodes: list[Episode], n: int, temperature: float, seeds: list[int],
               choices: list[str | None] | None = None) -> list[list[Episode]]: ...


def question_seed(seed: int, qid: str) -> int:
    """Depends only on (seed, question id): resumed and re-batched runs draw the same samples."""
    return derive_seed(seed, zlib.crc32(qid.encode()))


def default_value_fn(cfg: MCTSConfig) -> ValueFn:
    return SPRE(k=cfg.spre_rollouts, beta=cfg.beta, temperature=cfg.temperature)


def untried_choice(kinds: list[str]) -> str | None:
    """The reasoning choice a node's next child should take, given its children's kinds: the
    other one when they all took one (all queries, or all answers); else the policy's (None)."""
    tried = set(kinds) & set(CHOICES)
    return next(c for c in CHOICES if c not in tried) if len(tried) == 1 else None


def search(runner: Runner, examples: list[QAExample], cfg: MCTSConfig, seed: int,
           value_fn: ValueFn | None = None) -> list[dict[str, Any]]:
    """Grow one tree per example for `cfg.max_rollouts` iterations; returns their JSON dumps.

    The trees advance independently, in rounds: a round is ONE `runner.expand` step (one per
    temperature) over every tree's pending work — its selected leaf's expansion, or the next
    step of each unfinished rollout from its new node — and every tree whose new node then has
    all its rollouts is grown in ONE `tree.grow` call, so its next expansion joins the next
    round while other trees are still rolling out. A tree's steps depend only on its own seeds
    (iteration seeds from `question_seed`, rollout r of a node from the node's seed and r), so
    its dump does not depend on the batch or on when its work ran. A round holds at most
    B × max(1, K) episodes: the shipped configs size `agent.batch_size` to that."""
    value_fn = value_fn or default_value_fn(cfg)
    k = value_fn.rollouts_per_node
    b, n = len(examples), cfg.max_rollouts + 1
    tree = T.init(b, n, cfg.max_children)
    table: list[dict[int, Episode]] = [{T.ROOT: ep} for ep in runner.start(examples)]  # (q, node)
    seeds = [question_seed(seed, ex.id) for ex in examples]
    node_seeds: list[dict[int, int]] = [{T.ROOT: s} for s in seeds]
    c_uct = jnp.full((b,), cfg.c_uct, jnp.float32)
    rollouts = np.zeros(b, np.int64)
    rollout_f1: list[dict[int, list[float]]] = [{} for _ in range(b)]
    kid_kinds: list[dict[int, list[str]]] = [{} for _ in range(b)]   # (q, node) → its kids' kinds
    nodes = np.ones(b, np.int64)            # tree.num_nodes, kept on the host
    it = np.zeros(b, np.int64)              # iterations each tree has run
    leaf = np.array(T.select(tree, c_uct))
    new: list[Episode | None] = [None] * b                    # each tree's node being valued
    flight: list[dict[int, Episode]] = [{} for _ in range(b)]  # its unfinished rollouts, by r
    ends: list[list[Episode]] = [[] for _ in range(b)]         # and its finished ones, by r
    while True:
        # Grow the trees whose new node is valued; back up again each selected finished leaf
        # (no new node). Repeat while a tree selects a finished leaf next.
        while True:
            valued = np.array([e is not None and not f for e, f in zip(new, flight)])
            idle = np.array([e is None for e in new]) & (it < cfg.max_rollouts) & (nodes < n)
            revisit = idle & np.array([table[i][leaf[i]].done for i in range(b)])
            if not (valued | revisit).any():
                break
            value, kind = np.zeros(b, np.float32), np.zeros(b, np.int32)
            terminal = np.zeros(b, bool)
            for i in np.flatnonzero(valued):
                value[i] = value_fn.value(new[i], ends[i])
                kind[i], terminal[i] = T.KINDS.index(new[i].steps[-1].kind), new[i].done
            tree, grown = T.grow(tree, leaf, kind, value, terminal, valued, revisit, c_uct)
            child, selected = np.asarray(grown)
            for i in np.flatnonzero(valued):
                kid_kinds[i].setdefault(int(leaf[i]), []).append(new[i].steps[-1].kind)
                if child[i] >= 0:
                    table[i][int(child[i])] = new[i]
                    node_seeds[i][int(child[i])] = derive_seed(seeds[i], int(it[i]))
                    rollout_f1[i][int(child[i])] = [answer_f1(r) for r in ends[i]]
                    nodes[i] += 1
                new[i] = None
            it += valued | revisit
            leaf = np.where(valued | revisit, selected, leaf)
        # One round: every waiting tree's expansion and every unfinished rollout's next step,
        # as (temperature, tree, rollout index or -1 for the expansion, episode, seed, choice).
        work = []
        for i in range(b):
            expanding = new[i] is None and it[i] < cfg.max_rollouts and nodes[i] < n
            if not (expanding or flight[i]):
                continue
            node_seed = derive_seed(seeds[i], int(it[i]))
            if expanding:
                choice = (untried_choice(kid_kinds[i].get(int(leaf[i]), []))
                          if cfg.untried_choice else None)
                work.append((cfg.temperature, i, -1, table[i][leaf[i]], node_seed, choice))
            work += [(value_fn.temperature, i, r, ep, derive_seed(node_seed, r), None)
                     for r, ep in flight[i].items()]
        if not work:
            break
        for temperature in sorted({w[0] for w in work}):
            rows = [w[1:] for w in work if w[0] == temperature]
            stepped = runner.expand([w[2] for w in rows], 1, temperature, [w[3] for w in rows],
                                    [w[4] for w in rows])
            for (i, r, *_), (ep,) in zip(rows, stepped):
                if r < 0:
                    new[i] = ep
                    flight[i] = {} if ep.done else dict.fromkeys(range(k), ep)
                    ends[i] = [] if ep.done else [None] * k
                    rollouts[i] += 0 if ep.done else k
                elif ep.done:
                    ends[i][r] = ep
                    del flight[i][r]
                else:
                    flight[i][r] = ep
    return [dump_tree(tree, i, table[i], rollout_f1[i], node_seeds[i], rollouts=int(rollouts[i]))
            for i in range(b)]


def output_paths(out: str | Path) -> dict[str, Path]:
    out = Path(out)
    stem = out.name.removesuffix(".jsonl")
    return {"pairs": out, "outcome": out.with_name(f"{stem}.outcome.jsonl"),
            "trees": out.with_name(f"{stem}.trees.jsonl"),
            "summary": out.with_name(f"{stem}.summary.json"),
            "tensorboard": out.with_name(f"{stem}.tensorboard"),
            "picture": out.with_name(f"{stem}.tree.png")}


def _pairs(dumps: list[dict[str, Any]], min_gap: float) -> tuple[list[dict], list[dict]]:
    return ([p for d in dumps for p in P.process_pairs(d, min_gap)],
            [p for d in dumps for p in P.outcome_pairs(d, min_gap)])


def generate(runner: Runner | None, examples: list[QAExample], paths: dict[str, Path], cfg: MCTSConfig,
             seed: int, value_fn: ValueFn | None = None) -> dict[str, Any]:
    """Search the not yet searched `examples` in batches of `cfg.batch_questions`, appending
    trees and pairs per batch; then write the summary and the picture. Returns the summary."""
    done = resume_keys(paths["trees"], "question_id")     # also drops a torn last line
    dumps = [obj for _, obj in read_jsonl(paths["trees"], allow_empty=True)] if done else []
    prl, orl = _pairs(dumps, cfg.min_value_gap)
    lead = lead_process()                              # the one process that writes
    if lead:
        write_jsonl_atomic(paths["pairs"], prl)      # repair a kill between the two appends
        write_jsonl_atomic(paths["outcome"], orl)
    todo = [ex for ex in examples if ex.id not in done]
    start, rollouts, num_pairs = time.time(), 0, len(prl)
    with tqdm(total=len(examples), initial=len(examples) - len(todo), desc="mcts", unit="q",
              disable=not lead) as bar:
        for lo in range(0, len(todo), cfg.batch_questions):
            batch = search(runner, todo[lo:lo + cfg.batch_questions], cfg, seed, value_fn)
            new_prl, new_orl = _pairs(batch, cfg.min_value_gap)
            if lead:
                append_jsonl(paths["trees"], batch)
                append_jsonl(paths["pairs"], new_prl)
                append_jsonl(paths["outcome"], new_orl)
            dumps += batch
            prl += new_prl
            orl += new_orl
            rollouts += sum(d["rollouts"] for d in batch)
            num_pairs += len(new_prl)
            bar.update(len(batch))
            rate = rollouts / (time.time() - start)
            bar.set_postfix(pairs=num_pairs, rollouts_per_s=f"{rate:.2f}")
    summary = {"questions": len(dumps), "search": P.search_stats(dumps),
               "process": P.summarize(prl), "outcome": P.summarize(orl)}
    if lead:
        write_json_atomic(paths["summary"], summary)
        write_scalars(paths["tensorboard"], {"generate": summary, **runner_scalars(runner)})
        if dumps:
            render_tree(max(dumps, key=lambda d: len(d["nodes"])), paths["picture"])
    return summary


def search_config(cfg: Config) -> Config:
    """`cfg` with the search's query cap as the agent's: the runner caps what it is given."""
    return dataclasses.replace(cfg, agent=dataclasses.replace(
        cfg.agent, max_retrievals=cfg.mcts.max_retrievals))


def run_generate(cfg: Config, dataset: str | Path, index_dir: str | Path, out: str | Path,
                 checkpoint: str | None = None) -> dict[str, Any]:
    """`reasonrag-jax generate`: MCTS + SPRE over `dataset` → RAG-ProGuide pairs at `out`."""
    examples = read_qa(dataset)
    paths = output_paths(out)
    runner = None
    if {ex.id for ex in examples} - resume_keys(paths["trees"], "question_id"):
        from reasonrag_jax.agent.episodes import runner_from_config

        runner = runner_from_config(search_config(cfg), checkpoint or cfg.model.policy, index_dir)
    summary = generate(runner, examples, paths, cfg.mcts, cfg.seed)
    process = summary["process"]
    print(f"[generate] {summary['questions']} trees → {process['pairs']} process pairs "
          f"{process['by_action_type']}, {summary['outcome']['pairs']} outcome pairs "
          f"→ {paths['pairs']} (tree picture: {paths['picture']})")
    return summary
