"""`reasonrag-jax demo`: the paper's ablation (Base / SFT / ORL / PRL) on the embedded default.

synthetic KB with disjoint SFT / MCTS / dev / test questions → index → eval Base → SFT warm-up on
gold chains → MCTS + SPRE pairs with the SFT policy → DPO on process pairs (PRL) and on outcome
pairs (ORL), the same number of pairs and the same settings, at each candidate learning rate
(several: the one with the best mean dev EM of ORL and PRL is kept; nothing is tuned on test)
→ eval every policy on the test questions → table with 95 % bootstrap intervals and paired
differences (`results.md`, `results.json`, `results.png`). `demo.replicate_seeds` trains and
evaluates ORL and PRL again with other DPO seeds, so PRL − ORL comes with its seed-to-seed spread.
Each stage writes its own resumable output under `out/`, so re-running the command continues
where it stopped.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from reasonrag_jax.config import Config, DemoConfig, SamplerConfig, load_config, to_dict
from reasonrag_jax.eval.stats import Interval, bootstrap_ci, paired_ci
from reasonrag_jax.io import InputError, append_jsonl, read_jsonl, save_figure, write_json_atomic
from reasonrag_jax.memory import return_freed_memory

ROWS = ("Base", "SFT", "ORL", "PRL")
DIFFERENCES = (("PRL", "ORL"), ("PRL", "SFT"), ("ORL", "SFT"))
METRICS = ("em", "f1", "acc")


def apply_preset(cfg: Config, name: str, overrides: Sequence[str] = ()) -> Config:
    """Apply `demo.presets[name]` dotted overrides (kept in the config so presets are
    documented there), then the user's `--set` `overrides` again: what the user asked for wins
    over the preset."""
    if name not in cfg.demo.presets:
        raise ValueError(f"unknown demo preset {name!r} (known: {', '.join(cfg.demo.presets)})")
    preset = [f"{k}={json.dumps(v)}" for k, v in cfg.demo.presets[name].items()]
    return _reload(cfg, preset + list(overrides))


def _reload(cfg: Config, overrides: list[str]) -> Config:
    import tempfile

    import yaml

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(to_dict(cfg), f)
    try:
        return load_config(f.name, overrides)
    finally:
        Path(f.name).unlink()


def run_settings(cfg: Config) -> dict[str, Any]:
    """The resolved settings a demo directory is tied to. The preset table is left out: the
    chosen preset is already applied, and editing another preset must not lock out a run."""
    settings = to_dict(cfg)
    settings["demo"].pop("presets")
    return settings


def same_run(stored: dict[str, Any], settings: dict[str, Any]) -> bool:
    """Whether a run directory written with `stored` settings can be resumed with `settings`.
    Replicate seeds may differ: each adds its own files and changes none of the others, so a
    finished run can gain a seed without redoing SFT and MCTS."""
    def without_replicates(s: dict[str, Any]) -> dict[str, Any]:
        return {**s, "demo": {k: v for k, v in s["demo"].items() if k != "replicate_seeds"}}
    return without_replicates(stored) == without_replicates(settings)


def stored_settings(text: str) -> dict[str, Any]:
    """A run directory's `demo_config.json` as `run_settings` would write it today: earlier
    versions also wrote the preset table, ordered the SFT data by `train.seed`, and searched
    without `mcts.untried_choice` or packing (one SFT record per row, at `train.batch_size`).
    Runs from before drafted decoding resume with today's drafts: they change how many tokens
    a decode step emits, not which."""
    stored = json.loads(text)
    stored.get("demo", {}).pop("presets", None)
    stored.get("demo", {}).setdefault("sft_seed", stored.get("train", {}).get("seed", 0))
    for key in ("sft_batch_size", "sft_pack_length"):
        stored.get("demo", {}).setdefault(key, 0)
    stored.get("train", {}).setdefault("pack_length", 0)
    stored.get("mcts", {}).setdefault("untried_choice", False)
    defaults = SamplerConfig()
    for key in ("draft_tokens", "draft_tokens_sampled"):
        stored.get("sampler", {}).setdefault(key, getattr(defaults, key))
    return stored


def sft_config(cfg: Config) -> Config:
    """The SFT stage's training config: the demo's epochs, learning rate, data order, batch
    and packing."""
    demo = cfg.demo
    return _reload(cfg, ["train.objective=sft", f"train.epochs={demo.sft_epochs}",
                         f"train.learning_rate={demo.sft_learning_rate}",
                         f"train.seed={demo.sft_seed}",
                         f"train.batch_size={demo.sft_batch_size or cfg.train.batch_size}",
                         f"train.pack_length={demo.sft_pack_length}"])


def dpo_config(cfg: Config, learning_rate: float, seed: int) -> Config:
    """A DPO stage's training config: the demo's epochs and batch, one learning rate, and the
    data-order seed."""
    demo = cfg.demo
    return _reload(cfg, ["train.objective=dpo", f"train.epochs={demo.dpo_epochs}",
                         f"train.learning_rate={learning_rate}", f"train.seed={seed}",
                         f"train.batch_size={demo.dpo_batch_size or cfg.train.batch_size}"])


def replicate_name(row: str, seed: int) -> str:
    """A replicate's checkpoint and eval directory name, e.g. `prl.seed1`."""
    return f"{row.lower()}.seed{seed}"


def write_demo_data(demo: DemoConfig, seed: int, data_dir: Path) -> dict[str, Path]:
    """corpus + the four disjoint question splits (written once; test is written last)."""
    from reasonrag_jax.data.synthetic import write_splits

    sizes = {"test": demo.test_questions, "dev": demo.dev_questions,
             "mcts": demo.mcts_questions, "sft": demo.sft_questions}
    paths = {name: data_dir / f"{name}.jsonl" for name in ("corpus", *sizes)}
    if not paths["test"].exists():
        write_splits(data_dir, sizes, seed, demo.entities)
    return paths


def _equal_budget(a: Path, b: Path, out_a: Path, out_b: Path, cap: int, seed: int) -> int:
    """Cut both pairs files to the same number of pairs (the smaller count, at most `cap` when
    `cap` > 0) so ORL and PRL train on equal budgets → that number. A cut file keeps a seeded
    sample of its pairs in file order, so it draws from every question, not the first ones."""
    rows_a = [obj for _, obj in read_jsonl(a, allow_empty=True)]
    rows_b = [obj for _, obj in read_jsonl(b, allow_empty=True)]
    n = min(len(rows_a), len(rows_b), cap or len(rows_a))
    for rows, out in ((rows_a, out_a), (rows_b, out_b)):
        if not out.exists():
            keep = np.sort(np.random.default_rng(seed).choice(len(rows), n, replace=False))
            tmp = out.with_suffix(".tmp")
            tmp.unlink(missing_ok=True)
            append_jsonl(tmp, [rows[i] for i in keep])
            tmp.replace(out)
    return n


def pair_overlap(prl: list[dict[str, Any]], orl: list[dict[str, Any]]) -> dict[str, int]:
    """How many of the ORL pairs are also PRL pairs (same prompt, same chosen and rejected) and
    how many are PRL pairs reversed: the part of the ablation where the labels agree or clash."""
    process = {(o["prompt"], o["chosen"], o["rejected"]) for o in prl}
    outcome = [(o["prompt"], o["chosen"], o["rejected"]) for o in orl]
    return {"same": sum(k in process for k in outcome),
            "reversed": sum((k[0], k[2], k[1]) in process for k in outcome)}


@contextmanager
def stage(name: str, timings: dict[str, float], path: Path):
    """Time a stage and add it to `timings`, saved to `path` at once: a run done in pieces (killed
    and resumed) reports each stage's seconds summed over its pieces, not the last piece's ~0."""
    start = time.perf_counter()
    try:
        yield
    finally:        # a stage stopped by a signal or an error still counts its seconds
        spent = time.perf_counter() - start
        timings[name] = round(timings.get(name, 0.0) + spent, 1)
        write_json_atomic(path, timings)
        gc.collect()            # a stage's runner may sit in reference cycles
        return_freed_memory()
    print(f"[demo] {name}: {spent:.0f} s" + (f" ({timings[name]:.0f} s over every piece of "
                                             "this run)" if timings[name] > spent + 1 else ""))


def run_demo(cfg: Config, out: Path, quick: bool = False, preset: str | None = None,
             overrides: Sequence[str] = ()) -> dict[str, Any]:
    from reasonrag_jax.agent.protocol import gold_sft_records
    from reasonrag_jax.data.qa import read_qa
    from reasonrag_jax.eval.evaluate import run_eval
    from reasonrag_jax.mcts import pairs as P
    from reasonrag_jax.mcts.search import run_generate
    from reasonrag_jax.retrieval.index import Retriever, build_index
    from reasonrag_jax.train.trainer import run_sft, run_train

    if quick or preset:
        cfg = apply_preset(cfg, preset or "quick", overrides)
    demo = cfg.demo
    if cfg.train.seed in demo.replicate_seeds or len(set(demo.replicate_seeds)) < len(
            demo.replicate_seeds):
        raise ValueError(f"demo.replicate_seeds {list(demo.replicate_seeds)}: each must differ "
                         f"from the others and from train.seed ({cfg.train.seed})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    marker, settings = out / "demo_config.json", run_settings(cfg)
    stored = stored_settings(marker.read_text()) if marker.exists() else settings
    if not same_run(stored, settings):
        raise InputError(f"{out}: holds a demo run with other settings (see {marker}); "
                         "use another --out")
    write_json_atomic(marker, settings)
    print(f"[demo] writing everything under {out}")

    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    with stage("data + index", timings, timings_path):
        data = write_demo_data(demo, cfg.seed, out / "data")
        index = out / "index"
        if not (index / "metadata.json").exists():
            build_index(data["corpus"], index, cfg.retrieval)

    with stage("eval Base", timings, timings_path):
        run_eval(cfg, data["test"], index, None, out / "eval" / "base")

    sft_data = out / "sft.jsonl"
    with stage("SFT", timings, timings_path):
        if not sft_data.exists():
            retriever = Retriever.load(index, cfg.retrieval)
            records = [r for ex in read_qa(data["sft"])
                       for r in gold_sft_records(ex, retriever, cfg.agent)]
            tmp = sft_data.with_suffix(".tmp")
            tmp.unlink(missing_ok=True)
            append_jsonl(tmp, records)
            tmp.replace(sft_data)
        sft_ckpt = run_sft(sft_config(cfg), sft_data, out / "ckpt" / "sft", None)
    with stage("eval SFT", timings, timings_path):
        run_eval(cfg, data["test"], index, str(sft_ckpt), out / "eval" / "sft")
    ckpts = {"Base": None, "SFT": str(sft_ckpt)}

    pairs = out / "pairs.jsonl"
    with stage("MCTS + SPRE pairs", timings, timings_path):
        generated = run_generate(cfg, data["mcts"], index, pairs, str(sft_ckpt))
        search = generated["search"]
        found = {"PRL": generated["process"]["pairs"], "ORL": generated["outcome"]["pairs"]}
        files = {"PRL": out / "pairs_prl.jsonl", "ORL": out / "pairs_orl.jsonl"}
        budget = _equal_budget(pairs, pairs.with_name("pairs.outcome.jsonl"), files["PRL"],
                               files["ORL"], demo.max_pairs, cfg.seed)
    trained = {row: [o for _, o in read_jsonl(f, allow_empty=True)] for row, f in files.items()}
    mined = {row: P.summarize(rows) for row, rows in trained.items()}
    overlap = pair_overlap(trained["PRL"], trained["ORL"])
    mix = {row: m["by_action_type"] for row, m in mined.items()}
    gaps = {row: m["reward_gap_quartiles"] for row, m in mined.items()}
    lrs = demo.dpo_learning_rates if budget else ()
    if not budget:   # nothing to prefer on one side: say so rather than train on nothing
        print(f"[demo] no pairs for {'/'.join(r for r, n in found.items() if not n)}"
              " (no siblings whose labels differ): ORL/PRL not trained")
    dev_em: dict[float, float] = {}
    for lr in lrs:
        dpo_cfg = dpo_config(cfg, lr, cfg.train.seed)
        tag = f"lr{lr:g}" if len(lrs) > 1 else ""
        for row in ("ORL", "PRL"):
            with stage(f"DPO {row} {tag}".strip(), timings, timings_path):
                ckpts[f"{row}{tag}"] = str(run_train(dpo_cfg, files[row],
                                                     out / "ckpt" / f"{row.lower()}{tag}",
                                                     str(sft_ckpt)))
            if len(lrs) > 1 and demo.dev_questions:
                with stage(f"dev {row} {tag}", timings, timings_path):
                    s = run_eval(cfg, data["dev"], index, ckpts[f"{row}{tag}"],
                                 out / "eval" / f"dev_{row.lower()}{tag}")
                dev_em[lr] = dev_em.get(lr, 0.0) + s["em"] / 2
    lr = max(dev_em, key=lambda k: (dev_em[k], -lrs.index(k))) if dev_em else \
        (lrs[0] if lrs else None)
    for row in ("ORL", "PRL") if lrs else ():
        tag = f"lr{lr:g}" if len(lrs) > 1 else ""
        ckpts[row] = ckpts[f"{row}{tag}"]
        with stage(f"eval {row}", timings, timings_path):
            run_eval(cfg, data["test"], index, ckpts[row], out / "eval" / row.lower())

    for seed in demo.replicate_seeds if lrs else ():
        seeded = {row: f.with_name(f"{f.stem}.seed{seed}.jsonl") for row, f in files.items()}
        _equal_budget(pairs, pairs.with_name("pairs.outcome.jsonl"), seeded["PRL"],
                      seeded["ORL"], demo.max_pairs, seed)
        for row in ("ORL", "PRL"):
            name = replicate_name(row, seed)
            with stage(f"DPO {row} seed {seed}", timings, timings_path):
                ckpt = run_train(dpo_config(cfg, lr, seed), seeded[row], out / "ckpt" / name,
                                 str(sft_ckpt))
            with stage(f"eval {row} seed {seed}", timings, timings_path):
                run_eval(cfg, data["test"], index, str(ckpt), out / "eval" / name)

    examples = read_qa(data["test"])
    scores = {row: per_question(examples, out / "eval" / row.lower(), cfg.agent.max_retrievals)
              for row in ROWS if row in ckpts}
    results = summarize(scores, demo.resamples)
    if lrs and demo.replicate_seeds:
        by_seed = {str(cfg.train.seed): {row: scores[row] for row in ("ORL", "PRL")}}
        by_seed.update({str(seed): {row: per_question(examples, out / "eval" /
                                                      replicate_name(row, seed),
                                                      cfg.agent.max_retrievals)
                                    for row in ("ORL", "PRL")}
                        for seed in demo.replicate_seeds})
        results["by_seed"] = seed_summary(by_seed, demo.resamples)
    results.update(pairs=budget, pairs_found=found, pair_overlap=overlap, pair_mix=mix,
                   pair_gap_quartiles=gaps, search=search, learning_rate=lr, dev_mean_em=dev_em,
                   timings=timings, seeds=1 + len(demo.replicate_seeds) if lrs else 1)
    table = results_table(results)
    (out / "results.md").write_text(table)
    write_json_atomic(out / "results.json", results)
    plot_results(results, out / "results.png")
    print(table)
    return results


def per_question(examples: list[Any], eval_dir: Path, cap: int) -> dict[str, Any]:
    """Per-question scores of one eval run, in `examples` order: metric → list, and hop
    counts, retrievals and whether the search ran to the retrieval `cap` alongside."""
    rows = {o["id"]: o for _, o in read_jsonl(eval_dir / "traces.jsonl")}
    ordered = [rows[ex.id] for ex in examples]
    out: dict[str, Any] = {m: [r["metrics"][m] for r in ordered] for m in METRICS}
    out["retrievals"] = [r["retrievals"] for r in ordered]
    out["capped"] = [r["retrievals"] >= cap for r in ordered]
    out["hops"] = [r.get("hops") for r in ordered]
    return out


def _ci(values: list[float], resamples: int) -> dict[str, float]:
    return dataclasses.asdict(bootstrap_ci(values, resamples=resamples))


def summarize(scores: dict[str, dict[str, Any]], resamples: int) -> dict[str, Any]:
    """Means with 95 % bootstrap intervals per method (overall and per hop count) and paired
    95 % intervals of the differences, as plain JSON."""
    methods: dict[str, Any] = {}
    for row, s in scores.items():
        entry = {m: _ci(s[m], resamples) for m in (*METRICS, "retrievals")}
        hops = sorted({h for h in s["hops"] if h is not None}, key=str)
        entry["by_hops"] = {str(h): {m: _ci([v for v, k in zip(s[m], s["hops"]) if k == h],
                                            resamples) for m in ("em", "retrievals")}
                            for h in hops}
        entry["stopping"] = {h: _stopping(s, h) for h in ("all", *map(str, hops))}
        methods[row] = entry
    diffs = {f"{a}-{b}": {m: dataclasses.asdict(paired_ci(scores[a][m], scores[b][m],
                                                          resamples=resamples))
                          for m in (*METRICS, "retrievals")}
             for a, b in DIFFERENCES if a in scores and b in scores}
    n = len(next(iter(scores.values()))["em"]) if scores else 0
    return {"questions": n, "methods": methods, "differences": diffs}


def seed_summary(by_seed: dict[str, dict[str, dict[str, Any]]], resamples: int
                 ) -> dict[str, Any]:
    """Per DPO seed (`by_seed`: seed → ORL / PRL per-question scores) and over the seeds: each
    method's EM and the paired PRL − ORL difference of EM and retrievals, with 95 % intervals.
    Over seeds a question's score is its mean over the seeds, so the interval is still one over
    questions, with each question's seed-to-seed noise averaged first."""
    def entry(s: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {**{row: _ci(s[row]["em"], resamples) for row in ("ORL", "PRL")},
                "PRL-ORL": {m: dataclasses.asdict(paired_ci(s["PRL"][m], s["ORL"][m],
                                                            resamples=resamples))
                            for m in ("em", "retrievals")}}
    mean = {row: {m: np.mean([s[row][m] for s in by_seed.values()], axis=0).tolist()
                  for m in ("em", "retrievals")} for row in ("ORL", "PRL")}
    return {"seeds": {seed: entry(s) for seed, s in by_seed.items()}, "mean": entry(mean)}


def _stopping(s: dict[str, Any], hops: str) -> dict[str, float]:
    """The stop/continue decision in aggregate: the share of questions answered without a
    retrieval and the share whose search ran to the cap (a forced answer)."""
    rows = [i for i, h in enumerate(s["hops"]) if hops == "all" or str(h) == hops]
    n = max(len(rows), 1)
    return {"at_once": sum(s["retrievals"][i] == 0 for i in rows) / n,
            "at_cap": sum(bool(s["capped"][i]) for i in rows) / n}


def _cell(c: dict[str, float], scale: float = 100.0, digits: int = 1) -> str:
    i = Interval(**c)
    return f"{scale * i.mean:.{digits}f} [{scale * i.low:.{digits}f}, {scale * i.high:.{digits}f}]"


def results_table(results: dict[str, Any]) -> str:
    """Markdown: per method EM / F1 / Acc / retrievals with 95 % intervals, per hop count EM and
    retrievals; then the paired differences; then what the numbers rest on."""
    methods = results["methods"]
    hops = sorted({h for m in methods.values() for h in m["by_hops"]}, key=str)
    head = ["Method", "EM", "F1", "Acc", "Retrievals"]
    head += [f"{name} {h}-hop" for h in hops for name in ("EM", "Retr.")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in ROWS:
        m = methods.get(row)
        if m is None:
            lines.append("| " + " | ".join([row] + ["-"] * (len(head) - 1)) + " |")
            continue
        cells = [row] + [_cell(m[k]) for k in METRICS] + [_cell(m["retrievals"], 1.0, 2)]
        for h in hops:
            by = m["by_hops"].get(h)
            cells += [_cell(by["em"]), _cell(by["retrievals"], 1.0, 2)] if by else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| Paired difference | EM | F1 | Acc | Retrievals |", "|---|---|---|---|---|"]
    for name, d in results["differences"].items():
        lines.append(f"| {name.replace('-', ' − ')} | " + " | ".join(
            [_cell(d[k]) for k in METRICS] + [_cell(d["retrievals"], 1.0, 2)]) + " |")
    scopes = ["all", *hops]
    lines += ["", "| Answered at once / at the retrieval cap (%) | "
              + " | ".join(h if h == "all" else f"{h}-hop" for h in scopes) + " |",
              "|" + "---|" * (len(scopes) + 1)]
    for row in (r for r in ROWS if r in methods):
        stop = methods[row]["stopping"]
        lines.append(f"| {row} | " + " | ".join(
            f"{100 * stop[h]['at_once']:.0f} / {100 * stop[h]['at_cap']:.0f}" for h in scopes)
            + " |")
    mix, overlap = results.get("pair_mix", {}), results.get("pair_overlap", {})
    lr = results.get("learning_rate")
    lines += ["", f"{results['questions']} held-out synthetic test questions, greedy decoding; "
              "mean [95 % bootstrap interval over questions]; differences are paired bootstrap "
              "intervals on the same questions. "
              + (f"DPO seed {next(iter(results['by_seed']['seeds']))} (other seeds below)."
                 if results.get("by_seed") else "One seed."),
              f"ORL and PRL each trained on {results.get('pairs', 0)} preference pairs "
              f"(PRL {mix.get('PRL', {})}, ORL {mix.get('ORL', {})}; mined before the "
              f"equal cut: {results.get('pairs_found', {})}; of the ORL pairs "
              f"{overlap.get('same', 0)} are also PRL pairs, {overlap.get('reversed', 0)} "
              "PRL pairs reversed)"
              + (f", DPO learning rate {lr:g}" if lr is not None else "")
              + (f" chosen on the dev split (mean dev EM of ORL and PRL: "
                 f"{ {f'{k:g}': round(100 * v, 1) for k, v in results['dev_mean_em'].items()} })"
                 if results.get("dev_mean_em") else "") + "."]
    search, gaps = results.get("search"), results.get("pair_gap_quartiles", {})
    if search:
        lines.append(
            f"MCTS on {search['trees']} training questions: {100 * search['with_answer_node']:.0f} % "
            f"of trees hold an answer node, {100 * search['found_correct']:.0f} % found a correct "
            f"answer on some trajectory (mean best F1 {100 * search['mean_best_f1']:.1f}); where "
            f"the root tried both ({search['root_answer_vs_query']} trees), answering at once "
            f"had the higher value in {100 * search['root_answer_preferred']:.0f} %. Reward-gap "
            f"quartiles of the pairs: PRL {gaps.get('PRL')}, ORL {gaps.get('ORL')}.")
    return "\n".join(lines + _seed_lines(results.get("by_seed"))) + "\n"


def _seed_lines(by_seed: dict[str, Any] | None) -> list[str]:
    """The replicate table: ORL / PRL EM and PRL − ORL per DPO seed and over the seeds."""
    if not by_seed:
        return []
    lines = ["", "| DPO seed | ORL EM | PRL EM | PRL − ORL EM | PRL − ORL retrievals |",
             "|---|---|---|---|---|"]
    rows = [*by_seed["seeds"].items(), (f"mean of {len(by_seed['seeds'])} seeds", by_seed["mean"])]
    for seed, e in rows:
        d = e["PRL-ORL"]
        lines.append(f"| {seed} | {_cell(e['ORL'])} | {_cell(e['PRL'])} | {_cell(d['em'])} | "
                     f"{_cell(d['retrievals'], 1.0, 2)} |")
    lines += ["", "Each seed draws its own equal cut of the pairs and DPO data order (the same "
              "trees, learning rate and test questions); over seeds, a question's score is its "
              "mean over the seeds, and the interval is over questions."]
    return lines


def plot_results(results: dict[str, Any], path: Path) -> None:
    """Bars of EM / F1 / Acc per method with their 95 % intervals; the axis starts at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    rows = [r for r in ROWS if r in methods]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    width = 0.8 / len(METRICS)
    for i, m in enumerate(METRICS):
        mean = [100 * methods[r][m]["mean"] for r in rows]
        err = [[100 * (methods[r][m]["mean"] - methods[r][m]["low"]) for r in rows],
               [100 * (methods[r][m]["high"] - methods[r][m]["mean"]) for r in rows]]
        ax.bar([x + i * width for x in range(len(rows))], mean, width, yerr=err, capsize=3,
               label=m.upper())
    ax.set_xticks([x + width for x in range(len(rows))], rows)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("score (%), 95 % CI")
    ax.set_title(f"ReasonRAG ablation, {results['questions']} synthetic test questions")
    ax.legend()
    save_figure(fig, path)
