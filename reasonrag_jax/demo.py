"""`reasonrag-jax demo`: the paper's ablation (Base / SFT / ORL / PRL) on the embedded default.

synthetic KB → index → eval Base → SFT warm-up on gold chains → MCTS + SPRE pairs with the SFT
policy → DPO on process pairs (PRL) and on outcome pairs (ORL, same number of pairs) → eval every
policy on held-out test questions → table (markdown + PNG). Each stage writes its own resumable
output under `out/`, so re-running the command continues where it stopped.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from reasonrag_jax.config import Config, load_config, to_dict
from reasonrag_jax.io import append_jsonl, read_jsonl, save_figure, write_json_atomic

ROWS = ("Base", "SFT", "ORL", "PRL")


def apply_quick(cfg: Config) -> Config:
    """Apply `demo.quick` dotted overrides (kept in the config so `--quick` is documented there)."""
    overrides = [f"{k}={json.dumps(v)}" for k, v in cfg.demo.quick.items()]
    return _reload(cfg, overrides)


def _reload(cfg: Config, overrides: list[str]) -> Config:
    import tempfile

    import yaml

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(to_dict(cfg), f)
    try:
        return load_config(f.name, overrides)
    finally:
        Path(f.name).unlink()


def _subset(src: Path, dst: Path, n: int) -> Path:
    """First `n` questions of a split, written once (so every stage sees the same questions)."""
    if not dst.exists():
        records = [obj for _, obj in read_jsonl(src)][:n]
        tmp = dst.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        append_jsonl(tmp, records)
        tmp.replace(dst)
    return dst


def _equal_budget(a: Path, b: Path, out_a: Path, out_b: Path) -> int:
    """Cut the larger pairs file so ORL and PRL train on the same number of pairs → that number."""
    rows_a = [obj for _, obj in read_jsonl(a, allow_empty=True)]
    rows_b = [obj for _, obj in read_jsonl(b, allow_empty=True)]
    n = min(len(rows_a), len(rows_b))
    for rows, out in ((rows_a, out_a), (rows_b, out_b)):
        if not out.exists():
            tmp = out.with_suffix(".tmp")
            tmp.unlink(missing_ok=True)
            append_jsonl(tmp, rows[:n])
            tmp.replace(out)
    return n


@contextmanager
def _stage(name: str, timings: dict[str, float]):
    """Time a stage (a resumed stage that finds its output costs ~0) and say so."""
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 1)
    print(f"[demo] {name}: {timings[name]:.0f} s")


def run_demo(cfg: Config, out: Path, quick: bool = False) -> dict[str, Any]:
    from reasonrag_jax.agent.protocol import gold_sft_records
    from reasonrag_jax.data.qa import read_qa
    from reasonrag_jax.data.synthetic import write_synthetic
    from reasonrag_jax.eval.evaluate import run_eval
    from reasonrag_jax.mcts.search import run_generate
    from reasonrag_jax.retrieval.index import Retriever, build_index
    from reasonrag_jax.train.trainer import run_sft, run_train

    if quick:
        cfg = apply_quick(cfg)
    demo = cfg.demo
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[demo] writing everything under {out}")

    timings: dict[str, float] = {}
    data_dir = out / "data"
    with _stage("data + index", timings):
        if not (data_dir / "test.jsonl").exists():
            write_synthetic(data_dir, seed=cfg.seed, num_entities=demo.entities)
        test = _subset(data_dir / "test.jsonl", out / "test_subset.jsonl", demo.test_questions)
        mcts_qs = _subset(data_dir / "train.jsonl", out / "mcts_questions.jsonl",
                          demo.mcts_questions)
        index = out / "index"
        if not (index / "metadata.json").exists():
            build_index(data_dir / "corpus.jsonl", index, cfg.retrieval)

    with _stage("eval Base", timings):
        evals = {"Base": run_eval(cfg, test, index, None, out / "eval" / "base")}

    sft_data = out / "sft.jsonl"
    with _stage("SFT", timings):
        if not sft_data.exists():
            retriever = Retriever.load(index, cfg.retrieval)
            examples = read_qa(data_dir / "train.jsonl")[: demo.sft_questions]
            records = [r for ex in examples for r in gold_sft_records(ex, retriever, cfg.agent)]
            tmp = sft_data.with_suffix(".tmp")
            tmp.unlink(missing_ok=True)
            append_jsonl(tmp, records)
            tmp.replace(sft_data)
        sft_cfg = _reload(cfg, ["train.objective=sft", f"train.epochs={demo.sft_epochs}",
                                f"train.learning_rate={demo.sft_learning_rate}"])
        sft_ckpt = run_sft(sft_cfg, sft_data, out / "ckpt" / "sft", None)
    with _stage("eval SFT", timings):
        evals["SFT"] = run_eval(cfg, test, index, str(sft_ckpt), out / "eval" / "sft")

    pairs = out / "pairs.jsonl"
    with _stage("MCTS + SPRE pairs", timings):
        run_generate(cfg, mcts_qs, index, pairs, str(sft_ckpt))
        prl_pairs, orl_pairs = out / "pairs_prl.jsonl", out / "pairs_orl.jsonl"
        budget = _equal_budget(pairs, pairs.with_name("pairs.outcome.jsonl"), prl_pairs, orl_pairs)
    dpo_cfg = _reload(cfg, ["train.objective=dpo", f"train.epochs={demo.dpo_epochs}",
                            f"train.learning_rate={demo.dpo_learning_rate}"])
    if budget == 0:   # every rollout scored the same: nothing to prefer, say so in the table
        print("[demo] MCTS found no sibling steps with different values: no ORL/PRL rows")
    for row, pairs_file in (("ORL", orl_pairs), ("PRL", prl_pairs)) if budget else ():
        with _stage(f"DPO {row}", timings):
            ckpt = run_train(dpo_cfg, pairs_file, out / "ckpt" / row.lower(), str(sft_ckpt))
        with _stage(f"eval {row}", timings):
            evals[row] = run_eval(cfg, test, index, str(ckpt), out / "eval" / row.lower())

    table = results_table(evals) + f"ORL and PRL each trained on {budget} preference pairs.\n"
    (out / "results.md").write_text(table)
    write_json_atomic(out / "timings.json", timings)
    plot_results(evals, out / "results.png")
    print(table)
    return evals


def _hop_keys(evals: dict[str, dict[str, Any]]) -> list[str]:
    return sorted({h for s in evals.values() for h in s.get("by_hops", {})}, key=str)


def results_table(evals: dict[str, dict[str, Any]]) -> str:
    """Markdown table in the paper's shape: rows Base/SFT/ORL/PRL; overall and per hop count."""
    hops = _hop_keys(evals)
    head = ["Method", "EM", "F1", "Acc", "Retrievals"] + [f"F1 {h}-hop" for h in hops]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in ROWS:
        s = evals.get(row)
        if s is None:
            continue
        cells = [row] + [f"{100 * s[m]:.1f}" for m in ("em", "f1", "acc")]
        cells.append(f"{s['avg_retrievals']:.2f}")
        cells += [f"{100 * s['by_hops'][h]['f1']:.1f}" if h in s.get("by_hops", {}) else "-"
                  for h in hops]
        lines.append("| " + " | ".join(cells) + " |")
    n = next(iter(evals.values())).get("count", "?")
    return "\n".join(lines) + f"\n\n{n} held-out synthetic test questions, greedy decoding.\n"


def plot_results(evals: dict[str, dict[str, Any]], path: Path) -> None:

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in ROWS if r in evals]
    metrics = ("em", "f1", "acc")
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    width = 0.8 / len(metrics)
    for i, m in enumerate(metrics):
        ax.bar([x + i * width for x in range(len(rows))], [100 * evals[r][m] for r in rows],
               width, label=m.upper())
    ax.set_xticks([x + width for x in range(len(rows))], rows)
    ax.set_ylabel("score (%)")
    ax.set_title("ReasonRAG ablation on the synthetic KB (SmolLM2-135M)")
    ax.legend()
    save_figure(fig, path)

