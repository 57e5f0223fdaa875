"""The demo's experiment plumbing without models: disjoint splits, the table with intervals
and paired differences, the plot, and presets."""
import json
import time

import pytest

from reasonrag_jax import memory
from reasonrag_jax.config import DemoConfig, load_config
from reasonrag_jax.data.qa import read_qa
from reasonrag_jax.demo import apply_preset, plot_results, results_table, same_run, \
    seed_summary, stage, summarize, write_demo_data


def test_demo_splits_are_disjoint(tmp_path):
    demo = DemoConfig(entities=120, sft_questions=12, mcts_questions=6, dev_questions=3,
                      test_questions=9)
    paths = write_demo_data(demo, 0, tmp_path)
    qs = {s: read_qa(paths[s]) for s in ("sft", "mcts", "dev", "test")}
    assert {s: len(q) for s, q in qs.items()} == {"sft": 12, "mcts": 6, "dev": 3, "test": 9}
    texts = [ex.question for q in qs.values() for ex in q]
    assert len(set(texts)) == len(texts)


def test_table_has_intervals_and_paired_differences(tmp_path):
    # 4 questions (hops 1, 1, 2, 2). EM: Base 0 0 0 0, SFT 1 0 0 0, ORL 1 0 1 0, PRL 1 1 1 0.
    em = {"Base": [0, 0, 0, 0], "SFT": [1, 0, 0, 0], "ORL": [1, 0, 1, 0], "PRL": [1, 1, 1, 0]}
    scores = {row: {"em": v, "f1": v, "acc": v, "retrievals": [1, 1, 2, 2], "hops": [1, 1, 2, 2],
                    "capped": [False, False, True, True]} for row, v in em.items()}
    scores["Base"].update(retrievals=[0, 0, 0, 2], capped=[False, False, False, True])
    results = summarize(scores, resamples=500)
    assert results["questions"] == 4
    prl = results["methods"]["PRL"]
    assert prl["em"]["mean"] == 0.75 and prl["by_hops"]["1"]["em"]["mean"] == 1.0
    assert prl["by_hops"]["2"]["retrievals"]["mean"] == 2.0
    assert results["methods"]["Base"]["stopping"] == {
        "all": {"at_once": 0.75, "at_cap": 0.25}, "1": {"at_once": 1.0, "at_cap": 0.0},
        "2": {"at_once": 0.5, "at_cap": 0.5}}
    # PRL − SFT per question: 0 1 1 0 → mean 0.5; a resample's mean lies in [0, 1]
    d = results["differences"]["PRL-SFT"]["em"]
    assert d["mean"] == 0.5 and 0.0 <= d["low"] <= 0.5 <= d["high"] <= 1.0
    assert set(results["differences"]) == {"PRL-ORL", "PRL-SFT", "ORL-SFT"}
    table = results_table(results)
    assert "| PRL | 75.0 [" in table and "| PRL − ORL | 25.0 [" in table
    assert table.count("\n| ") >= 8                    # 4 rows + 3 differences + headers
    assert "| Base | 75 / 25 | 100 / 0 | 50 / 50 |" in table
    assert "| PRL | 0 / 50 | 0 / 0 | 0 / 100 |" in table
    json.dumps(results)                                # results.json is plain JSON
    plot_results(results, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    results["search"] = {"trees": 150, "with_answer_node": 0.9, "found_correct": 0.5,
                         "mean_best_f1": 0.6, "root_answer_vs_query": 40,
                         "root_answer_preferred": 0.25}
    results["pair_gap_quartiles"] = {"PRL": [0.1, 0.2, 0.4], "ORL": [1.0, 1.0, 1.0]}
    assert ("MCTS on 150 training questions: 90 % of trees hold an answer node, 50 % found"
            in results_table(results))
    assert "(40 trees), answering at once had the higher value in 25 %" in results_table(results)
    del scores["ORL"], scores["PRL"]                   # no pairs: the rows still show
    assert "| ORL | - |" in results_table(summarize(scores, resamples=100))


def test_presets_keep_the_experiment_disjoint_and_powered():
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[1] / "configs" / "smollm2_cpu.yaml")
    ablation = apply_preset(cfg, "ablation").demo
    assert ablation.mcts_questions >= 150 and ablation.test_questions >= 300
    assert ablation.dev_questions > 0 and len(ablation.dpo_learning_rates) > 1
    assert ablation.replicate_seeds                    # ORL and PRL with two seeds each
    # a user's --set wins over the preset (`make ablation ARGS="--set ..."`)
    assert apply_preset(cfg, "ablation", ["demo.replicate_seeds=[]"]).demo.replicate_seeds == ()
    assert apply_preset(cfg, "quick").demo.test_questions < cfg.demo.test_questions
    with pytest.raises(ValueError, match="unknown demo preset"):
        apply_preset(cfg, "nope")


@pytest.mark.parametrize("preset, digest", [(None, "1b1e2ea87cddec63"),
                                            ("quick", "c6c6a09ff78e3147"),
                                            ("ablation", "03cc8f6e7610375c")])
def test_sft_questions_are_those_the_sft_seed_was_chosen_for(tmp_path, preset, digest):
    # `demo.sft_seed` was chosen (bench/first_choice.py) for one list of SFT questions, and the
    # SFT split is dealt after test, dev and MCTS: resizing those splits silently changes the SFT
    # questions and voids the choice. Re-probe the seed before updating a digest here.
    import hashlib
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[1] / "configs" / "smollm2_cpu.yaml")
    demo = (apply_preset(cfg, preset) if preset else cfg).demo
    sft = read_qa(write_demo_data(demo, cfg.seed, tmp_path)["sft"])
    text = json.dumps([[ex.question, list(ex.golden_answers)] for ex in sft])
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == digest


def test_a_run_is_tied_to_its_resolved_settings_not_to_other_presets():
    from pathlib import Path

    from reasonrag_jax.demo import run_settings

    cfg = load_config(Path(__file__).parents[1] / "configs" / "smollm2_cpu.yaml")
    ablation = apply_preset(cfg, "ablation")
    edited = load_config(Path(__file__).parents[1] / "configs" / "smollm2_cpu.yaml",
                         ['demo.presets={"quick": {"demo.test_questions": 3}, "ablation": '
                          + json.dumps(cfg.demo.presets["ablation"]) + "}"])
    assert run_settings(apply_preset(edited, "ablation")) == run_settings(ablation)
    assert run_settings(ablation) != run_settings(apply_preset(cfg, "quick"))
    assert "presets" not in run_settings(ablation)["demo"]


def test_sft_stage_trains_in_the_demo_data_order_and_old_runs_keep_theirs():
    from pathlib import Path

    from reasonrag_jax.demo import run_settings, sft_config, stored_settings

    cfg = load_config(Path(__file__).parents[1] / "configs" / "smollm2_cpu.yaml",
                      ["demo.sft_seed=7", "train.seed=3"])
    sft = sft_config(cfg).train
    assert (sft.objective, sft.seed, sft.learning_rate, sft.epochs, sft.pack_length,
            sft.batch_size) == ("sft", 7, cfg.demo.sft_learning_rate, cfg.demo.sft_epochs, 0,
                                cfg.train.batch_size)
    packed = sft_config(load_config(Path(__file__).parents[1] / "configs" / "smollm2_cpu.yaml",
                                    ["demo.sft_pack_length=1024", "demo.sft_batch_size=2"])).train
    assert (packed.pack_length, packed.batch_size) == (1024, 2)
    # A run written before `demo.sft_seed` existed ordered its SFT data by `train.seed`.
    old = run_settings(cfg)
    del old["demo"]["sft_seed"]
    old["demo"]["presets"] = {}
    text = json.dumps(old)
    assert stored_settings(text) != run_settings(cfg)
    assert stored_settings(text) == run_settings(load_config(
        Path(__file__).parents[1] / "configs" / "smollm2_cpu.yaml", ["demo.sft_seed=3",
                                                                     "train.seed=3"]))
    # A run written before `mcts.untried_choice` and packing existed searched without the one
    # and trained one SFT record per row at `train.batch_size`.
    del old["mcts"]["untried_choice"]
    del old["demo"]["sft_batch_size"], old["demo"]["sft_pack_length"], old["train"]["pack_length"]
    del old["sampler"]["draft_tokens"], old["sampler"]["draft_tokens_sampled"]  # same tokens
    text = json.dumps(old)
    assert stored_settings(text) == run_settings(load_config(
        Path(__file__).parents[1] / "configs" / "smollm2_cpu.yaml", ["demo.sft_seed=3",
                                                                     "train.seed=3"]))
    for change in ("mcts.untried_choice=true", "demo.sft_pack_length=1024"):
        assert stored_settings(text) != run_settings(load_config(
            Path(__file__).parents[1] / "configs" / "smollm2_cpu.yaml",
            ["demo.sft_seed=3", "train.seed=3", change]))


def test_orl_and_prl_get_the_same_number_of_pairs_sampled_from_the_whole_file(tmp_path):
    from reasonrag_jax.demo import _equal_budget
    from reasonrag_jax.io import append_jsonl, read_jsonl

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    append_jsonl(a, [{"i": i} for i in range(40)])
    append_jsonl(b, [{"i": i} for i in range(30)])
    assert _equal_budget(a, b, tmp_path / "a3", tmp_path / "b3", 0, seed=0) == 30
    assert [o["i"] for _, o in read_jsonl(tmp_path / "b3")] == list(range(30))
    assert _equal_budget(a, b, tmp_path / "a8", tmp_path / "b8", 8, seed=0) == 8
    kept = [[o["i"] for _, o in read_jsonl(tmp_path / f)] for f in ("a8", "b8")]
    assert all(len(k) == 8 and k == sorted(k) for k in kept)
    assert kept[0][-1] >= 8                       # not simply the first 8 pairs of the file


def test_pair_overlap_counts_orl_pairs_that_prl_shares_or_reverses():
    from reasonrag_jax.demo import pair_overlap

    def pair(prompt, chosen, rejected):
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    prl = [pair("p", "a", "b"), pair("p", "c", "d"), pair("q", "a", "b")]
    orl = [pair("p", "a", "b"), pair("p", "d", "c"), pair("r", "a", "b")]
    assert pair_overlap(prl, orl) == {"same": 1, "reversed": 1}


def test_stage_times_add_up_over_the_pieces_of_a_run(tmp_path):
    """A run killed in a stage and resumed reports that stage's seconds from both pieces."""
    path = tmp_path / "timings.json"
    timings: dict[str, float] = {}
    with pytest.raises(KeyboardInterrupt), stage("SFT", timings, path):
        time.sleep(0.3)
        raise KeyboardInterrupt          # the first piece is stopped inside the stage
    resumed = json.loads(path.read_text())
    with stage("SFT", resumed, path):
        time.sleep(0.2)
    assert json.loads(path.read_text())["SFT"] == pytest.approx(0.5, abs=0.05)


def _rss_mb() -> int:
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024


@pytest.mark.skipif(memory._libc() is None, reason="returning freed memory needs glibc")
def test_a_stage_hands_the_memory_it_freed_back_to_the_os(tmp_path):
    """Freed heap chunks between live ones stay resident until trimmed: one demo process
    otherwise piles each stage's leftovers under the next stage's peak."""
    kept = []
    with stage("eval", {}, tmp_path / "timings.json"):
        blocks = [bytes(64 << 10) for _ in range(4096)]   # 256 MB of heap chunks, not mmap'd
        kept = blocks[::64]                               # one live chunk in every 4 MB
        del blocks
        held = _rss_mb()
    assert len(kept) == 64
    assert held - _rss_mb() > 150


def test_prl_minus_orl_per_seed_and_over_seeds():
    """Over seeds a question scores its mean over the seeds; the difference is paired."""
    def run(orl, prl):
        return {row: {"em": v, "retrievals": [2 * x for x in v]}
                for row, v in (("ORL", orl), ("PRL", prl))}
    by_seed = {"0": run([1, 0, 0, 0], [1, 1, 0, 0]), "1": run([0, 0, 1, 0], [1, 1, 1, 0])}
    s = seed_summary(by_seed, resamples=500)
    assert s["seeds"]["0"]["PRL-ORL"]["em"]["mean"] == 0.25
    assert s["seeds"]["1"]["PRL-ORL"]["em"]["mean"] == 0.5
    # per question, ORL means 0.5 0 0.5 0 and PRL means 1 1 0.5 0: PRL − ORL 0.5 1 0 0
    mean = s["mean"]
    assert (mean["ORL"]["mean"], mean["PRL"]["mean"]) == (0.25, 0.625)
    d = mean["PRL-ORL"]["em"]
    assert d["mean"] == 0.375 and 0.0 <= d["low"] < 0.375 < d["high"] <= 0.75
    assert mean["PRL-ORL"]["retrievals"]["mean"] == 0.75
    em = {"Base": [0] * 4, "SFT": [0] * 4, "ORL": [1, 0, 0, 0], "PRL": [1, 1, 0, 0]}
    results = summarize({row: {"em": v, "f1": v, "acc": v, "retrievals": [1] * 4,
                               "hops": [1] * 4, "capped": [False] * 4}
                         for row, v in em.items()}, resamples=100)
    assert "One seed." in results_table(results) and "DPO seed" not in results_table(results)
    results["by_seed"] = s
    table = results_table(results)
    assert "DPO seed 0 (other seeds below)." in table
    assert "| 1 | 25.0 [" in table and "| mean of 2 seeds | 25.0 [" in table
    assert "| mean of 2 seeds | 25.0 [0.0, 50.0] | 62.5 [" in table
    assert table.rstrip().endswith("the interval is over questions.")
    json.dumps(results)


def test_a_finished_run_can_gain_replicate_seeds_but_no_other_change(tmp_path):
    from pathlib import Path

    from reasonrag_jax.demo import run_demo, run_settings, stored_settings

    path = Path(__file__).parents[1] / "configs" / "smollm2_cpu.yaml"
    cfg = load_config(path)
    old = run_settings(cfg)                            # a marker written before the key existed
    del old["demo"]["replicate_seeds"]
    stored = stored_settings(json.dumps(old))
    assert same_run(stored, run_settings(load_config(path, ["demo.replicate_seeds=[1, 2]"])))
    assert not same_run(stored, run_settings(load_config(path, ["demo.test_questions=31"])))
    # Refused before anything is written; `out` is a file, so were the check gone, the run
    # would stop at once (making the directory) rather than start the demo.
    (tmp_path / "run").write_text("kept")
    for seeds in ("[0]", "[1, 1]"):                    # train.seed is 0: the run's own seed
        with pytest.raises(ValueError, match="demo.replicate_seeds"):
            run_demo(load_config(path, [f"demo.replicate_seeds={seeds}"]), tmp_path / "run")
    assert (tmp_path / "run").read_text() == "kept"
