"""DPO / SFT objectives: golden values, a torch implementation, and log-probs vs transformers."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reasonrag_jax.train.data import batch_arrays, encode_examples
from reasonrag_jax.train.dpo import dpo_loss, sequence_logps


def test_golden_value():
    loss, m = dpo_loss(*(jnp.array([x]) for x in (-1.0, -2.0, -1.5, -1.5)), 0.3)
    # -log σ(0.3 · ((−1+1.5) − (−2+1.5))) = -log σ(0.3) = 0.554355
    assert float(loss) == pytest.approx(0.554355, abs=1e-6)
    assert float(m["rewards/chosen"]) == pytest.approx(0.15)
    assert float(m["rewards/rejected"]) == pytest.approx(-0.15)
    assert float(m["rewards/margins"]) == pytest.approx(0.3)
    assert float(m["rewards/accuracies"]) == 1.0


def test_matches_torch_formula():
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-20, 5, 16).astype(np.float32) for _ in range(4))
    for beta, ls in ((0.3, 0.0), (0.1, 0.2)):
        loss, m = dpo_loss(*map(jnp.asarray, (pc, pr, rc, rr)), beta, ls)
        t = [torch.tensor(x) for x in (pc, pr, rc, rr)]
        logits = beta * ((t[0] - t[2]) - (t[1] - t[3]))
        ref = (-(1 - ls) * F.logsigmoid(logits) - ls * F.logsigmoid(-logits)).mean()
        assert float(loss) == pytest.approx(float(ref), rel=1e-5)
        margin = float((beta * (t[0] - t[2] - t[1] + t[3])).mean())
        assert float(m["rewards/margins"]) == pytest.approx(margin, rel=1e-5)


def test_sequence_logps_match_transformers(tiny_qwen2_cfg, make_hf_dir):
    import torch

    from reasonrag_jax.models.weights import load_hf_dir

    path, ref = make_hf_dir(tiny_qwen2_cfg, seed=1)
    model = load_hf_dir(path)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, tiny_qwen2_cfg.vocab_size, (3, 37)).astype(np.int32)
    mask = np.zeros((3, 37), np.float32)
    mask[0, 10:37] = 1
    mask[1, 5:20] = 1       # a right-padded row: positions ≥ 20 must not matter
    mask[2, 1:2] = 1
    # row r: prompt tokens[r, :a], completion tokens[r, a:b] (row 1 right-padded after 20)
    spans = [(10, 37), (5, 20), (1, 2)]
    enc = encode_examples([(t[:a].tolist(), [t[a:b].tolist()]) for t, (a, b) in zip(tokens, spans)],
                          pad_id=0)
    rows = batch_arrays(enc, np.arange(3), (37,))
    got = np.asarray(sequence_logps(model, rows, 1, chunk=8))[:, 0]
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor(tokens, dtype=torch.long)).logits.float(), -1)
    tok = torch.tensor(tokens[:, 1:], dtype=torch.long)
    per = lp[:, :-1].gather(-1, tok[..., None])[..., 0].numpy()
    want = (per * mask[:, 1:]).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert nnx.split(model)  # the model stays a plain NNX module


def test_a_packed_pair_scores_each_side_as_its_own_row(tiny_qwen2_cfg, make_hf_dir):
    """prompt + chosen + rejected in one row (the rejected side attends to the prompt, not to the
    chosen side, at the positions it would have after the prompt alone) gives the log-probs of
    the rows prompt + chosen and prompt + rejected."""
    from reasonrag_jax.models.weights import load_hf_dir

    path, _ = make_hf_dir(tiny_qwen2_cfg, seed=2)
    model = load_hf_dir(path)
    rng = np.random.default_rng(1)
    prompt, chosen, rejected = (rng.integers(0, tiny_qwen2_cfg.vocab_size, n).tolist()
                                for n in (11, 7, 4))
    pair = encode_examples([(prompt, [chosen, rejected])], pad_id=0)
    got = np.asarray(sequence_logps(model, batch_arrays(pair, np.arange(1), (25,)), 2,
                                    chunk=8))[0]
    alone = encode_examples([(prompt, [chosen]), (prompt, [rejected])], pad_id=0)
    want = np.asarray(sequence_logps(model, batch_arrays(alone, np.arange(2), (18,)), 1,
                                     chunk=8))[:, 0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert abs(got[0] - got[1]) > 1e-3          # the two sides really differ


def test_training_favours_the_chosen_side(tiny_llama_cfg, tmp_path):
    """A few real DPO steps (encode_pairs → batch_rows / batch_arrays → the trainer's step) on
    pairs whose chosen and rejected completions differ in one word raise log π(chosen text) −
    log π(rejected text), scored apart from the pair pipeline, and make `rewards/margins` > 0.
    Swapping chosen and rejected anywhere on that path makes the scored gap fall."""
    import dataclasses

    import jax

    from reasonrag_jax.config import load_config
    from reasonrag_jax.models.decoder import Decoder
    from reasonrag_jax.models.tokenizer import load_tokenizer
    from reasonrag_jax.models.weights import embedded_policy_path
    from reasonrag_jax.sharding import global_array, make_mesh
    from reasonrag_jax.train import data, trainer

    tokenizer = load_tokenizer(embedded_policy_path())
    cfg = load_config(None, ["train.learning_rate=3e-3", "train.batch_size=4",
                             "train.length_buckets=[32]", "train.warmup_ratio=0"])
    pairs = [{"instruction": "", "input": f"Is stone {i} heavy?", "chosen": "yes",
              "rejected": "no"} for i in range(8)]
    steps = 6
    model = Decoder(dataclasses.replace(tiny_llama_cfg, vocab_size=len(tokenizer)),
                    rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    optimizer = trainer.make_optimizer(cfg.train, steps)
    place = trainer.placement(make_mesh(cfg.mesh), cfg.mesh.rules, state, optimizer)
    params, opt_state = trainer.place_state(jax.tree.map(np.asarray, state.to_pure_dict()),
                                            optimizer, place)
    encoded = data.encode_pairs(tokenizer, pairs, 32)
    ref = trainer.reference_logps(graphdef, params, encoded, 8, (32,), place, tmp_path, "float32")

    # Scored on its own: each text as the completion of the first prompt, one row per text.
    prompt = data.prompt_ids(tokenizer, "", pairs[0]["input"])
    rows = [prompt + tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for t in ("yes", "no")]
    width = max(map(len, rows))
    alone = data.encode_examples([(prompt, [r[len(prompt):]]) for r in rows], pad_id=0)
    scored = data.batch_arrays(alone, np.arange(2), (width,))

    def gap(p):
        lp = sequence_logps(nnx.merge(graphdef, p), scored, 1)[:, 0]
        return float(lp[0] - lp[1])

    before = gap(params)
    step = trainer.make_train_step(graphdef, optimizer, cfg.train, "dpo", place)
    margins = []
    for s in range(steps):
        batch = trainer.batch_rows(s, len(pairs), cfg.train.batch_size, 0)
        rows_in = {f: global_array(x[None], place.micro)
                   for f, x in data.batch_arrays(encoded, batch, (32,)).items()}
        params, opt_state, metrics = step(params, opt_state, rows_in,
                                          global_array(ref[batch][None], place.micro))
        margins.append(float(metrics["rewards/margins"]))
    after = gap(params)
    assert after > before + 1.0, (before, after)
    assert margins[-1] > 0 and float(metrics["rewards/accuracies"]) == 1.0, margins


def test_packing_changes_no_loss(tiny_qwen2_cfg, make_hf_dir):
    """Pairs and SFT records whose prompts share prefixes, packed into prefix-tree rows of
    unequal size (one row has an unused pair slot), give the DPO and SFT losses and metrics of
    one example per row."""
    from reasonrag_jax.config import TrainConfig
    from reasonrag_jax.models.weights import load_hf_dir
    from reasonrag_jax.train.trainer import objective_loss

    path, _ = make_hf_dir(tiny_qwen2_cfg, seed=3)
    model = load_hf_dir(path)
    rng = np.random.default_rng(2)
    draw = lambda n: rng.integers(1, tiny_qwen2_cfg.vocab_size, n).tolist()  # noqa: E731
    system, history = draw(9), draw(6)
    prompts = [system + history + draw(3), system + history + draw(4), system + draw(5)]
    pairs = [(p, [draw(3), draw(5)]) for p in prompts] + [(prompts[0], [draw(2), draw(4)])]
    tc = TrainConfig()
    for examples in (pairs, [(p, [c[0]]) for p, c in pairs]):
        objective = "dpo" if len(examples[0][1]) == 2 else "sft"
        got = {}
        for pack_length in (0, 32):
            enc = encode_examples(examples, pad_id=0, pack_length=pack_length)
            rows = batch_arrays(enc, np.arange(len(enc.lengths)), (64,))
            lp = sequence_logps(model, rows, enc.num_slots, chunk=16)
            got[pack_length] = objective_loss(tc, objective, lp, rows["slots"], lp - 0.5 * lp ** 2
                                              if objective == "dpo" else 0 * lp)
            got[pack_length, "slots"] = (enc.slots[..., None] == np.arange(enc.num_slots)).sum(1)
        used = got[32, "slots"] > 0
        # fewer rows than examples, every completion in a slot, and some row with a free slot
        assert len(got[0, "slots"]) == 4 and len(used) < 4 and not used.all()
        assert used.sum() == 4 * len(examples[0][1])
        loss, metrics = got[0]
        np.testing.assert_allclose(float(got[32][0]), float(loss), rtol=1e-5)
        for k in metrics:
            np.testing.assert_allclose(float(got[32][1][k]), float(metrics[k]), rtol=1e-5,
                                       err_msg=k)
