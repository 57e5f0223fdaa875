"""DPO / SFT objectives: golden values, a torch implementation, and log-probs vs transformers."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

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
    got = np.asarray(sequence_logps(model, jnp.asarray(tokens), jnp.asarray(mask), chunk=8))
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor(tokens, dtype=torch.long)).logits.float(), -1)
    tok = torch.tensor(tokens[:, 1:], dtype=torch.long)
    per = lp[:, :-1].gather(-1, tok[..., None])[..., 0].numpy()
    want = (per * mask[:, 1:]).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert nnx.split(model)  # the model stays a plain NNX module
