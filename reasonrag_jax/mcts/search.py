"""MCTS over reasoning steps for a batch of questions, and `reasonrag-jax generate`.

Each iteration, for all B questions at once: select a node in every tree (UCT, arrays) → expand
it by one protocol step with ONE batched sampler call (retrieval included for query steps) →
value the new nodes by SPRE with ONE batched set of rollouts → back the values up. Trees are
written one JSON line per question to `<out>.trees.jsonl` as soon as their batch finishes; pair
files are rebuilt from those lines, so a killed run loses only the questions in flight and a
re-run produces the same files as an uninterrupted one.
"""
from __future__ import annotations

import time
import zlib
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from reasonrag_jax.agent.episodes import Episode, derive_seed
from reasonrag_jax.config import Config, MCTSConfig
from reasonrag_jax.data.qa import QAExample, read_qa
from reasonrag_jax.io import append_jsonl, done_keys, read_jsonl, write_json_atomic, write_jsonl_atomic
from reasonrag_jax.mcts import pairs as P
from reasonrag_jax.mcts import tree as T
from reasonrag_jax.mcts.spre import spre_values


def question_seed(seed: int, qid: str) -> int:
    """Depends only on (seed, question id): resumed and batched runs draw the same samples."""
    return derive_seed(seed, zlib.crc32(qid.encode()))


def search(runner: Any, examples: list[QAExample], cfg: MCTSConfig, seed: int) -> list[dict[str, Any]]:
    """Build one tree per example; returns their JSON dumps."""
    b, n, c = len(examples), cfg.max_rollouts + 1, cfg.max_children
    tree = T.init(b, n, c)
    table: list[dict[int, Episode]] = [{T.ROOT: ep} for ep in runner.start(examples)]
    seeds = [question_seed(seed, ex.id) for ex in examples]
    c_uct = jnp.full((b,), cfg.c_uct, jnp.float32)
    for it in range(cfg.max_rollouts):
        room = np.asarray(tree.num_nodes) < n
        if not room.any():
            break
        leaf = np.asarray(T.select(tree, c_uct))
        grow = [i for i in range(b) if room[i] and not table[i][leaf[i]].done]
        it_seeds = {i: derive_seed(seeds[i], it) for i in grow}
        children = runner.expand([table[i][leaf[i]] for i in grow], 1, cfg.temperature,
                                 [it_seeds[i] for i in grow])
        new = {i: kids[0] for i, kids in zip(grow, children) if kids}
        values = spre_values(runner, list(new.values()), [it_seeds[i] for i in new],
                             cfg.spre_rollouts, cfg.beta, cfg.temperature)
        value, kind, terminal = (np.zeros(b, np.float32), np.zeros(b, np.int32), np.zeros(b, bool))
        for (i, ep), v in zip(new.items(), values):
            value[i], kind[i], terminal[i] = v, T.KINDS.index(ep.steps[-1].kind), ep.done
        valid = np.zeros(b, bool)
        valid[list(new)] = True
        tree, child = T.add_child(tree, jnp.asarray(leaf), jnp.asarray(kind), jnp.asarray(value),
                                  jnp.asarray(terminal), jnp.asarray(valid))
        child = np.asarray(child)
        # A selected finished episode is re-visited with its own value (standard MCTS).
        revisit = np.array([room[i] and table[i][leaf[i]].done for i in range(b)])
        reward = np.asarray(tree.reward)[np.arange(b), leaf]
        node = np.where(child >= 0, child, leaf)
        tree = T.backup(tree, jnp.asarray(node), jnp.asarray(np.where(child >= 0, value, reward)),
                        jnp.asarray((child >= 0) | revisit))
        for i, ep in new.items():
            if child[i] >= 0:
                table[i][int(child[i])] = ep
    return [dump_tree(tree, i, table[i], examples[i]) for i in range(b)]


def dump_tree(tree: T.Tree, i: int, episodes: dict[int, Episode], example: QAExample) -> dict[str, Any]:
    arr = {k: np.asarray(getattr(tree, k)[i]) for k in
           ("parent", "depth", "kind", "visits", "value_sum", "reward", "terminal", "children")}
    nodes = []
    for node in range(int(tree.num_nodes[i])):
        ep = episodes[node]
        step = ep.steps[-1] if node != T.ROOT else None
        nodes.append({
            "id": node, "parent": int(arr["parent"][node]), "depth": int(arr["depth"][node]),
            "kind": T.KINDS[int(arr["kind"][node])], "visits": int(arr["visits"][node]),
            "q_value": float(arr["value_sum"][node] / max(1, arr["visits"][node])),
            "reward": float(arr["reward"][node]), "terminal": bool(arr["terminal"][node]),
            "children": [int(x) for x in arr["children"][node] if x >= 0],
            "instruction": step.instruction if step else "", "input": step.input if step else "",
            "prompt": step.prompt if step else "", "response": step.response if step else "",
            "content": step.content if step else "", "prediction": ep.prediction,
            "retrieved": [p.id for p in step.retrieved] if step else [],
        })
    return {"question_id": example.id, "question": example.question,
            "golden_answers": list(example.golden_answers), "nodes": nodes}


def output_paths(out: Path) -> dict[str, Path]:
    stem = out.name.removesuffix(".jsonl")
    return {"pairs": out, "outcome": out.with_name(f"{stem}.outcome.jsonl"),
            "trees": out.with_name(f"{stem}.trees.jsonl"), "summary": out.with_name(f"{stem}.summary.json"),
            "picture": out.with_name(f"{stem}.tree.png")}


def write_pairs(examples: list[QAExample], paths: dict[str, Path], min_gap: float) -> dict[str, Any]:
    """Rebuild both pair files and the summary from the tree lines, in dataset order."""
    trees = {obj["question_id"]: obj for _, obj in read_jsonl(paths["trees"], allow_empty=True)}
    dumps = [trees[ex.id] for ex in examples if ex.id in trees]
    prl = [p for d in dumps for p in P.process_pairs(d, min_gap)]
    orl = [p for d in dumps for p in P.outcome_pairs(d, min_gap)]
    write_jsonl_atomic(paths["pairs"], prl)
    write_jsonl_atomic(paths["outcome"], orl)
    summary = {"questions": len(dumps), "process": P.summarize(prl), "outcome": P.summarize(orl)}
    write_json_atomic(paths["summary"], summary)
    if dumps:
        from reasonrag_jax.mcts.render import render_tree

        render_tree(max(dumps, key=lambda d: len(d["nodes"])), paths["picture"])
    return summary


def run_generate(cfg: Config, dataset: Path, index_dir: Path, out: Path,
                 checkpoint: str | None = None) -> dict[str, Any]:
    """`reasonrag-jax generate`: MCTS + SPRE over `dataset` → RAG-ProGuide pairs at `out`."""
    examples = read_qa(dataset)
    paths = output_paths(Path(out))
    done = done_keys(paths["trees"], "question_id")
    todo = [ex for ex in examples if ex.id not in done]
    if todo:
        from reasonrag_jax.agent.episodes import EpisodeRunner
        from reasonrag_jax.models.weights import load_policy
        from reasonrag_jax.retrieval.index import Retriever
        from reasonrag_jax.sampling import Sampler

        model, tokenizer = load_policy(checkpoint or cfg.model.policy, dtype=cfg.model.dtype,
                                       param_dtype=cfg.model.param_dtype)
        runner = EpisodeRunner(Sampler(model, tokenizer, cfg.sampler),
                               Retriever.load(index_dir, cfg.retrieval), cfg.agent)
        generate(runner, todo, paths, cfg.mcts, cfg.seed, total=len(examples))
    summary = write_pairs(examples, paths, cfg.mcts.min_value_gap)
    print(f"[generate] {summary['questions']} trees → {summary['process']['pairs']} process pairs "
          f"{summary['process']['by_action_type']}, {summary['outcome']['pairs']} outcome pairs")
    return summary


def generate(runner: Any, todo: list[QAExample], paths: dict[str, Path], cfg: MCTSConfig, seed: int,
             total: int) -> None:
    """Search `todo` in batches of `cfg.batch_questions`, appending each batch's trees."""
    start, nodes = time.time(), 0
    with tqdm(total=total, initial=total - len(todo), desc="mcts", unit="q") as bar:
        for lo in range(0, len(todo), cfg.batch_questions):
            dumps = search(runner, todo[lo:lo + cfg.batch_questions], cfg, seed)
            append_jsonl(paths["trees"], dumps)
            nodes += sum(len(d["nodes"]) - 1 for d in dumps)
            pairs = sum(len(P.process_pairs(d, cfg.min_value_gap)) for d in dumps)
            bar.update(len(dumps))
            bar.set_postfix(pairs=pairs, nodes_per_s=f"{nodes / (time.time() - start):.2f}")
