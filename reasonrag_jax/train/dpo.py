"""DPO and SFT objectives: pure functions of log-probs (the trainer supplies them).

Log-probs are summed over completion tokens only (prompt masked) with a float32 log-softmax,
computed in time chunks so the [B, T, vocab] logits never exist at once; chunks with no
completion token in any row (most of an agent step's long prompt) skip the output head entirely.
Metric names follow TRL, so curves compare directly with TRL/LLaMA-Factory runs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def sequence_logps(model, tokens: jax.Array, loss_mask: jax.Array, chunk: int = 64) -> jax.Array:
    """Σ_t log p(tokens[t] | tokens[<t]) over positions with loss_mask[t] = 1. → [B]."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    hidden, _ = model.hidden(tokens, positions)
    inputs, targets, mask = hidden[:, :-1], tokens[:, 1:], loss_mask[:, 1:].astype(jnp.float32)
    n = inputs.shape[1]
    chunk = min(chunk, n)
    pad = (-n) % chunk
    inputs = jnp.pad(inputs, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    mask = jnp.pad(mask, ((0, 0), (0, pad)))

    @jax.checkpoint  # recompute each chunk's logits in the backward pass instead of storing them
    def head_logps(h, y, m):
        logits = model.logits(h)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), y[..., None], axis=-1)[..., 0]
        return jnp.sum(lp * m, axis=-1)

    def chunk_logps(h, y, m):
        return jax.lax.cond(jnp.any(m > 0), head_logps, lambda *_: jnp.zeros(b, jnp.float32),
                            h, y, m)

    split = lambda x: x.reshape(b, -1, chunk, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731
    per_chunk = jax.lax.map(lambda xs: chunk_logps(*xs),
                            (split(inputs), split(targets), split(mask)))
    return per_chunk.sum(0)


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
             ref_rejected: jax.Array, beta: float, label_smoothing: float = 0.0
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sigmoid DPO (Rafailov et al.) with conservative label smoothing; mean over pairs."""
    logits = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    losses = (-(1 - label_smoothing) * jax.nn.log_sigmoid(logits)
              - label_smoothing * jax.nn.log_sigmoid(-logits))
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    metrics = {
        "rewards/chosen": chosen_reward.mean(),
        "rewards/rejected": rejected_reward.mean(),
        "rewards/accuracies": (chosen_reward > rejected_reward).astype(jnp.float32).mean(),
        "rewards/margins": (chosen_reward - rejected_reward).mean(),
        "logps/chosen": policy_chosen.mean(),
        "logps/rejected": policy_rejected.mean(),
    }
    return losses.mean(), metrics


def sft_loss(logps: jax.Array, num_tokens: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-mean cross-entropy over completion tokens of the batch."""
    loss = -logps.sum() / jnp.maximum(num_tokens.sum(), 1.0)
    return loss, {"nll/token": loss}
