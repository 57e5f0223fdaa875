"""Trainer: exact resume after an interruption, NaN stop, SFT path, restoring a trained policy."""
import dataclasses
import json

import jax
import numpy as np
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


def final_params(out):
    model, _ = load_trained_policy(out)
    return jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())


def losses(out):
    rows = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows[r["step"]] = r["loss"]
    return [rows[s] for s in sorted(rows)]


def test_interrupted_run_resumes_exactly(tmp_path, tiny_policy, monkeypatch):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    cfg = tiny_config()
    full = trainer.run_train(cfg, pairs, tmp_path / "full", str(tiny_policy))

    real = trainer.batch_rows

    def crash_at_step_4(step, *args):
        if step == 3:
            raise RuntimeError("killed")
        return real(step, *args)

    monkeypatch.setattr(trainer, "batch_rows", crash_at_step_4)
    with pytest.raises(RuntimeError, match="killed"):
        trainer.run_train(cfg, pairs, tmp_path / "cut", str(tiny_policy))
    assert manager(tmp_path / "cut", 2).latest_step() == 3
    monkeypatch.setattr(trainer, "batch_rows", real)
    cut = trainer.run_train(cfg, pairs, tmp_path / "cut", str(tiny_policy))

    assert losses(full) == losses(cut)
    assert len(losses(full)) == 6
    with pytest.raises(trainer.InputError, match="train.seed=0"):
        trainer.run_train(tiny_config(seed=1), pairs, tmp_path / "cut", str(tiny_policy))
    a, b = final_params(full), final_params(cut)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    # the reference log-probs were computed once and reused by the resumed run
    assert len(list((tmp_path / "cut" / "ref_logps").glob("*.npy"))) == 1
    record = json.loads((full / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected", "grad_norm"} <= set(record)
    assert (full / "training.png").stat().st_size > 1000
    assert list((full / "tensorboard").iterdir())
    # training moved the policy: the DPO loss fell from log 2 at step 1 (policy == reference)
    assert losses(full)[0] == pytest.approx(np.log(2), abs=1e-5)
    assert losses(full)[-1] < losses(full)[0]


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


def test_sft_lowers_completion_loss(tmp_path, tiny_policy):
    records = tmp_path / "sft.jsonl"
    records.write_text("".join(json.dumps({"instruction": p["instruction"], "input": p["input"],
                                           "output": p["chosen"]}) + "\n" for p in PAIRS))
    cfg = tiny_config(max_steps=8, save_every=8, learning_rate="3e-3", grad_accum=2)
    out = trainer.run_sft(cfg, records, tmp_path / "sft", str(tiny_policy))
    ls = losses(out)
    assert len(ls) == 8 and ls[-1] < ls[0] - 0.5
    assert not (out / "ref_logps").exists()
    # beside the loss: the step's learning rate (the schedule's), its time and tokens/s
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    schedule = trainer.lr_schedule(cfg.train, 8)
    assert [r["lr"] for r in rows] == pytest.approx([float(schedule(s)) for s in range(8)])
    assert rows[1]["lr"] > rows[0]["lr"] and rows[-1]["lr"] < max(r["lr"] for r in rows)
    assert all(r["step_time_s"] > 0 and r["tokens_per_s"] > 0 for r in rows)
