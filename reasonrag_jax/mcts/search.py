"""MCTS over reasoning steps for a batch of questions, and `reasonrag-jax generate`.

Each iteration, for all B questions at once: select a node in every tree (UCT, arrays) → expand
it by one protocol step with ONE batched `runner.expand` (retrieval included for query steps) →
value the new nodes with ONE batched value-function call (SPRE rollouts) → back the values up
and select the next nodes in ONE tree call (`tree.grow`).
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
from reasonrag_jax.mcts.spre import SPRE, ValueFn
from reasonrag_jax.sharding import lead_process, resume_keys


class Runner(Protocol):
    """What the search needs of an episode runner (`agent.episodes.EpisodeRunner`)."""

    def start(self, examples: list[QAExample]) -> list[Episode]: ...

    def expand(self, episodes: list[Episode], n: int, temperature: float, seeds: list[int],
               choices: list[str | None] | None = None) -> list[list[Episode]]: ...

    def finish(self, episodes: list[Episode], temperature: float, seeds: list[int],
               k: int = 1) -> list[list[Episode]]: ...


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
    """Grow one tree per example for `cfg.max_rollouts` iterations; returns their JSON dumps."""
    value_fn = value_fn or default_value_fn(cfg)
    b, n = len(examples), cfg.max_rollouts + 1
    tree = T.init(b, n, cfg.max_children)
    table: list[dict[int, Episode]] = [{T.ROOT: ep} for ep in runner.start(examples)]  # (q, node)
    seeds = [question_seed(seed, ex.id) for ex in examples]
    c_uct = jnp.full((b,), cfg.c_uct, jnp.float32)
    rollouts = np.zeros(b, np.int64)
    rollout_f1: list[dict[int, list[float]]] = [{} for _ in range(b)]
    nodes = np.ones(b, np.int64)            # tree.num_nodes, kept on the host
    kid_kinds: list[dict[int, list[str]]] = [{} for _ in range(b)]   # (q, node) → its kids' kinds
    leaf = np.asarray(T.select(tree, c_uct))
    for it in range(cfg.max_rollouts):
        room = nodes < n
        if not room.any():
            break
        at_end = np.array([table[i][leaf[i]].done for i in range(b)])
        grow = [i for i in range(b) if room[i] and not at_end[i]]
        it_seeds = [derive_seed(seeds[i], it) for i in grow]
        choices = [untried_choice(kid_kinds[i].get(int(leaf[i]), [])) if cfg.untried_choice
                   else None for i in grow]
        new = [kid[0] for kid in runner.expand([table[i][leaf[i]] for i in grow], 1,
                                               cfg.temperature, it_seeds, choices)] if grow else []
        valuation = value_fn(runner, new, it_seeds) if grow else None
        value, kind = np.zeros(b, np.float32), np.zeros(b, np.int32)
        terminal, valid = np.zeros(b, bool), np.zeros(b, bool)
        for j, (i, ep) in enumerate(zip(grow, new)):
            value[i], kind[i] = valuation.values[j], T.KINDS.index(ep.steps[-1].kind)
            terminal[i], valid[i] = ep.done, True
            rollouts[i] += 0 if ep.done else value_fn.rollouts_per_node
        tree, grown = T.grow(tree, leaf, kind, value, terminal, valid, room & at_end, c_uct)
        parent = leaf
        child, leaf = np.asarray(grown)
        nodes += child >= 0
        for j, (i, ep) in enumerate(zip(grow, new)):
            kid_kinds[i].setdefault(int(parent[i]), []).append(ep.steps[-1].kind)
            table[i][int(child[i])] = ep
            rollout_f1[i][int(child[i])] = valuation.rollout_f1[j]
    return [dump_tree(tree, i, table[i], rollout_f1[i], rollouts=int(rollouts[i]))
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
