"""Trainer: exact resume after an interruption, NaN stop, SFT path, restoring a trained policy,
the held-out split and its evaluation."""
import dataclasses
import json
import math

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from reasonrag_jax.config import load_config
from reasonrag_jax.models.decoder import Decoder
from reasonrag_jax.train import trainer
from reasonrag_jax.train.checkpoint import load_trained_policy, manager, restore

PAIRS = [
    {"instruction": "Answer briefly.", "input": f"Question {i}: where was person {i} born?",
     "chosen": f"<query>birthplace of person {i}</query>",
     "rejected": f"<answer>town {i % 3}</answer>",
     "question_id": f"q{i}", "chosen_reward": 0.8, "rejected_reward": 0.1}
    for i in range(6)
]
VAL = 0.25  # holds out ⌈0.25 · 6⌉ = 2 of the 6 pairs


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Runs of one test file compile the same steps: share them through JAX's on-disk cache."""
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_compilation_cache_dir", None)


@pytest.fixture(scope="module")
def tokenizer():
    from reasonrag_jax.models.weights import embedded_policy_path, gguf_as_hf_dir, load_tokenizer

    return load_tokenizer(gguf_as_hf_dir(embedded_policy_path()))


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory, tiny_llama_cfg, tokenizer):
    """A random tiny Llama with SmolLM2's vocabulary, saved as a Hugging Face directory."""
    from reasonrag_jax.models.weights import export_hf

    cfg = dataclasses.replace(tiny_llama_cfg, vocab_size=len(tokenizer), eos_token_id=2)
    return export_hf(Decoder(cfg, rngs=nnx.Rngs(0)), tokenizer,
                     tmp_path_factory.mktemp("policy") / "tiny")


def write_pairs(path, pairs=PAIRS):
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def tiny_config(**train):
    cfg = load_config(None, [f"train.{k}={v}" for k, v in {
        "batch_size": 2, "max_steps": 6, "save_every": 3, "learning_rate": 1e-3,
        "warmup_ratio": 0.2, "max_length": 64, "length_buckets": "[64]", **train}.items()])
    return cfg


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_policy):
    """An uninterrupted DPO run (6 steps, saves at 3 and 6) holding out 2 of the 6 pairs."""
    tmp = tmp_path_factory.mktemp("dpo")
    return trainer.run_train(tiny_config(val_fraction=VAL), write_pairs(tmp / "pairs.jsonl"),
                             tmp / "full", str(tiny_policy))


def metric_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoint_record(out, step):
    """The JSON record saved beside a checkpoint's arrays."""
    mngr = manager(out, 2, async_save=False)
    got = mngr.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]
    mngr.close()
    return got


def final_params(out):
    model, _ = load_trained_policy(out)
    return jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())


def ref_files(out):
    """{reference log-prob cache file: modification time}."""
    return {p.name: p.stat().st_mtime_ns for p in (out / "ref_logps").glob("*.npy")}


def losses(out):
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows[r["step"]] = r["loss"]
    return [rows[s] for s in sorted(rows)]


def test_interrupted_run_resumes_exactly(tmp_path, dpo_run, tiny_policy, tokenizer, monkeypatch):
    """Killed after the save at step 3 and re-run, a run holding out pairs ends as the
    uninterrupted one: same losses, held-out metrics and weights, the same held-out pairs (the
    seed's, never trained on) in every checkpoint of both runs."""
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    cfg = tiny_config(val_fraction=VAL)
    full = dpo_run

    real = trainer.batch_rows

    def crash_at_step_4(step, *args):
        if step == 3:
            raise RuntimeError("killed")
        return real(step, *args)

    monkeypatch.setattr(trainer, "batch_rows", crash_at_step_4)
    with pytest.raises(RuntimeError, match="killed"):
        trainer.run_train(cfg, pairs, tmp_path / "cut", str(tiny_policy))
    assert manager(tmp_path / "cut", 2).latest_step() == 3
    refs_before = ref_files(tmp_path / "cut")
    monkeypatch.setattr(trainer, "batch_rows", real)
    looped = []
    real_loop = trainer._loop

    def spy(cfg, out, objective, data, val, *rest):
        looped.append((data, val))
        return real_loop(cfg, out, objective, data, val, *rest)

    monkeypatch.setattr(trainer, "_loop", spy)
    cut = trainer.run_train(cfg, pairs, tmp_path / "cut", str(tiny_policy))

    assert losses(full) == losses(cut)
    assert len(losses(full)) == 6
    evals = lambda out: [{k: v for k, v in r.items() if k.startswith("eval_")}  # noqa: E731
                         for r in metric_rows(out) if "eval_loss" in r]
    assert len(evals(full)) == 2 and evals(full) == evals(cut)
    # the held-out pairs: the seed's draw, the same in both runs and across the resume
    held_out = trainer.split_units(len(PAIRS), VAL, 0)[1].tolist()
    assert len(held_out) == 2
    for out in (full, cut):
        assert [checkpoint_record(out, s)["held_out"] for s in (3, 6)] == [held_out, held_out]
    # ... and the resumed loop trained on the 4 others only and scored exactly the 2
    # the reference log-probs were computed once (training rows, held-out rows) and reused
    assert len(refs_before) == 2 and ref_files(tmp_path / "cut") == refs_before
    (data, val), = looped
    examples, _ = trainer.load_examples(tokenizer, pairs, "dpo", 64)
    every = trainer.encode_units(tokenizer, examples, np.arange(len(PAIRS)), 0)

    def row_set(enc):
        return {tuple(enc.tokens[i, :n]) for i, n in enumerate(enc.lengths)}

    held_rows = row_set(every.take(np.array(held_out)))
    assert len(held_rows) == 2 and row_set(val.encoded) == held_rows
    assert data.n_rows == 4 and row_set(data.encoded) == row_set(every) - held_rows
    for change, match in ((dict(seed=1), "train.seed=0"),
                          (dict(val_fraction=0.5), "train.val_fraction=0.25")):
        with pytest.raises(trainer.InputError, match=match):
            trainer.run_train(tiny_config(**{"val_fraction": VAL, **change}), pairs,
                              tmp_path / "cut", str(tiny_policy))
    a, b = final_params(full), final_params(cut)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    record = json.loads((full / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected", "grad_norm"} <= set(record)
    assert (full / "training.png").stat().st_size > 1000
    assert list((full / "tensorboard").iterdir())
    # training moved the policy: the DPO loss fell from log 2 at step 1 (policy == reference)
    assert losses(full)[0] == pytest.approx(np.log(2), abs=1e-5)
    assert losses(full)[-1] < losses(full)[0]


def test_held_out_pairs_are_scored_at_every_save(dpo_run):
    """eval_loss / eval_reward_accuracy / eval_margin join the training metrics (jsonl and
    TensorBoard) at the saves (step 3) and the last step (6), and nowhere else."""
    rows = metric_rows(dpo_run)
    evals = {r["step"]: r for r in rows if "eval_loss" in r}
    assert sorted(evals) == [3, 6] and len(rows) == 6
    for r in evals.values():
        assert {"eval_reward_accuracy", "eval_margin"} <= set(r)
        assert 0 < r["eval_loss"] < 2 and 0 <= r["eval_reward_accuracy"] <= 1
        assert math.isfinite(r["eval_margin"])
    events = b"".join(f.read_bytes() for f in (dpo_run / "tensorboard").iterdir())
    assert all(k.encode() in events for k in ("eval_loss", "eval_reward_accuracy", "eval_margin"))


def test_a_training_dir_loads_in_the_asked_compute_dtype(dpo_run):
    """`model.dtype` reaches a trained checkpoint loaded for eval or generate (it was dropped, so
    a bfloat16 eval of a float32-trained policy ran in float32). The weights stay as trained
    and the sampler holds them in the compute dtype, all but the final norm, which `forward`
    reads as it is."""
    import jax.numpy as jnp

    from reasonrag_jax.config import SamplerConfig
    from reasonrag_jax.models.policy import load_policy
    from reasonrag_jax.sampling import Sampler

    assert load_policy(str(dpo_run))[0].cfg.dtype == "float32"      # what it was trained in
    model, tokenizer = load_policy(str(dpo_run), dtype="bfloat16")
    assert model.cfg.dtype == "bfloat16" and model.embed[...].dtype == jnp.float32
    params = Sampler(model, tokenizer, SamplerConfig(cache_size=128, prefix_cache_mb=0)).params
    assert params["final_norm"].dtype == jnp.float32
    held = {w.dtype for layer in params["layers"] for w in layer.values()} | {params["embed"].dtype}
    assert held == {jnp.dtype(jnp.bfloat16)}


def test_eval_reward_accuracy_counts_chosen_above_rejected(dpo_run, tiny_policy):
    """The last step's held-out metrics against the held-out pairs scored apart from the
    trainer: log-probs of the trained and the initial policy, and in numpy the margin
    β((π_c − ref_c) − (π_r − ref_r)), its share > 0 and the mean −log σ(margin). Each side is
    scored as a row of its own (prompt + that completion), not packed as the trainer packs a
    pair. Counting rejected above chosen, or swapping the two sides, makes this fail."""
    from reasonrag_jax.models.policy import load_policy
    from reasonrag_jax.train.data import batch_arrays, encode_sft
    from reasonrag_jax.train.dpo import sequence_logps

    held_out = trainer.split_units(len(PAIRS), VAL, 0)[1]
    trained, tokenizer = load_trained_policy(dpo_run)
    initial, _ = load_policy(str(tiny_policy))
    enc = encode_sft(tokenizer, [{**PAIRS[i], "output": PAIRS[i][side]} for i in held_out
                                 for side in ("chosen", "rejected")], 64)

    rows = batch_arrays(enc, np.arange(len(enc.lengths)), (enc.tokens.shape[1],))

    def logps(model):
        return np.asarray(sequence_logps(model, rows, 1))[:, 0]

    pol, ref = logps(trained), logps(initial)
    margin = tiny_config().train.beta * ((pol[0::2] - ref[0::2]) - (pol[1::2] - ref[1::2]))
    # no margin near 0, and not half of them positive: a flipped sign would show
    assert np.abs(margin).min() > 1e-3 and (margin > 0).mean() != 0.5, margin
    last = metric_rows(dpo_run)[-1]
    assert last["eval_reward_accuracy"] == (margin > 0).mean()
    assert last["eval_margin"] == pytest.approx(margin.mean(), rel=1e-3, abs=1e-5)
    assert last["eval_loss"] == pytest.approx(np.logaddexp(0.0, -margin).mean(), rel=1e-3)


def test_val_fraction_that_leaves_a_side_empty_is_refused():
    for n, fraction in ((6, 0.9), (6, 1e-12)):
        with pytest.raises(ValueError, match="train.val_fraction .* leaving no") as e:
            trainer.split_units(n, fraction, 0)
        assert "\n" not in str(e.value)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"train.val_fraction.*outside \[0, 1\)"):
            tiny_config(val_fraction=bad)
    assert [len(x) for x in trainer.split_units(10, 0.1, 0)] == [9, 1]
    assert [len(x) for x in trainer.split_units(13289, 0.1, 0)] == [11960, 1329]


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_policy):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    cfg = tiny_config(learning_rate="1e30", warmup_ratio=0.0, save_every=1, max_steps=6)
    match = r"step (\d+): loss .*Last good checkpoint: .*checkpoints/"
    with pytest.raises(trainer.TrainingDiverged, match=match) as e:
        trainer.run_train(cfg, pairs, tmp_path / "nan", str(tiny_policy))
    bad = int(str(e.value).split()[1].rstrip(":"))
    mngr = manager(tmp_path / "nan", 2, async_save=False)
    assert mngr.latest_step() == bad - 1
    model, _ = load_trained_policy(tmp_path / "nan")
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    record = restore(mngr, bad - 1, nnx.state(model, nnx.Param).to_pure_dict(), None)["record"]
    assert record["step"] == bad - 1 and record["config"]["train"]["learning_rate"] == 1e30


def test_fewer_pairs_than_a_batch_train_each_pair_once_a_step(tmp_path, tiny_policy,
                                                               monkeypatch):
    batches = []

    def spy(*args, **kwargs):
        batches.append(real(*args, **kwargs))
        return batches[-1]

    real = trainer.batch_rows
    monkeypatch.setattr(trainer, "batch_rows", spy)
    cfg = tiny_config(batch_size=8, max_steps=0, epochs=2)
    trainer.run_train(cfg, write_pairs(tmp_path / "pairs.jsonl"), tmp_path / "few",
                      str(tiny_policy))
    assert [sorted(b.tolist()) for b in batches] == [list(range(len(PAIRS)))] * 2


def test_sft_lowers_completion_loss(tmp_path, tiny_policy):
    records = tmp_path / "sft.jsonl"
    records.write_text("".join(json.dumps({"instruction": p["instruction"], "input": p["input"],
                                           "output": p["chosen"]}) + "\n" for p in PAIRS))
    cfg = tiny_config(max_steps=8, save_every=8, learning_rate="3e-3", grad_accum=2,
                      val_fraction=VAL)
    out = trainer.run_sft(cfg, records, tmp_path / "sft", str(tiny_policy))
    ls = losses(out)
    assert len(ls) == 8 and ls[-1] < ls[0] - 0.5
    assert not (out / "ref_logps").exists()
    # the 2 held-out records are scored with the SFT loss (no reward metrics) at the end
    last = metric_rows(out)[-1]
    assert math.isfinite(last["eval_loss"]) and last["eval_loss"] > 0
    assert "eval_reward_accuracy" not in last
    # beside the loss: the step's learning rate (the schedule's), its time and tokens/s
    rows = metric_rows(out)
    schedule = trainer.lr_schedule(cfg.train, 8)
    assert [r["lr"] for r in rows] == pytest.approx([float(schedule(s)) for s in range(8)])
    assert 0 < rows[-1]["lr"] < max(r["lr"] for r in rows) and rows[0]["lr"] > 0
    assert all(r["step_time_s"] > 0 and r["tokens_per_s"] > 0 for r in rows)


def test_packed_sft_scores_like_one_record_per_row_and_trains(tmp_path, tiny_policy, monkeypatch):
    """Step records of one question share their history (`train.pack_length`): packed, the
    training rows are fewer, the held-out records' loss at unchanged weights is the same as one
    record per row, and training lowers the loss."""
    records = tmp_path / "sft.jsonl"
    records.write_text("".join(json.dumps({
        "instruction": "Answer with a search engine.",
        "input": f"Question: who wrote book {q}?" + "\nQuery: author of it" * step,
        "output": PAIRS[(q + step) % len(PAIRS)]["chosen"]}) + "\n"
        for q in range(4) for step in range(3)))
    rows = {}
    real_loop = trainer._loop

    def spy(cfg, out, objective, data, val, *rest):
        rows[cfg.train.pack_length, cfg.train.learning_rate] = (data.n_rows, val.n_rows)
        return real_loop(cfg, out, objective, data, val, *rest)

    monkeypatch.setattr(trainer, "_loop", spy)
    eval_loss = {}
    for pack, lr in ((0, 0.0), (200, 0.0), (200, 3e-3)):
        cfg = tiny_config(max_steps=8, save_every=8, learning_rate=lr, val_fraction=VAL,
                          pack_length=pack, length_buckets="[64,128,200]")
        out = trainer.run_sft(cfg, records, tmp_path / f"sft{pack}_{lr}", str(tiny_policy))
        eval_loss[pack, lr] = metric_rows(out)[-1]["eval_loss"]
    assert rows[0, 0.0] == (9, 3) and rows[200, 0.0][0] < 9 and rows[200, 0.0][1] < 3
    assert eval_loss[200, 0.0] == pytest.approx(eval_loss[0, 0.0], rel=1e-5)
    ls = losses(tmp_path / "sft200_0.003")
    assert ls[-1] < ls[0] - 0.5 and eval_loss[200, 3e-3] < eval_loss[200, 0.0] - 0.5


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_every_update_of_a_short_run_has_a_nonzero_learning_rate(schedule):
    """A 4-step DPO run used to spend its first update at lr 0 (warmup from 0)."""
    cfg = load_config(None, ["train.learning_rate=1e-5", "train.warmup_ratio=0.5",
                             f"train.schedule={schedule}"])
    rates = [float(trainer.lr_schedule(cfg.train, 4)(s)) for s in range(4)]
    assert rates[0] == pytest.approx(0.5e-5) and rates[1] == pytest.approx(1e-5)
    assert min(rates) > 0 and max(rates) == pytest.approx(1e-5)
    if schedule == "cosine":
        assert rates[1] > rates[2] > rates[3]
