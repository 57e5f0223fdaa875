"""DPO and SFT objectives: pure functions of log-probs (the trainer supplies them).

A training row is a prefix tree of examples (`train.data`): each example's prompt, then its
completions — an SFT record's, or a pair's chosen then rejected — each attending to its prompt
and itself only, at the positions it would have after the prompt alone. So one pass over a
prompt scores both sides of a pair exactly as two separate rows would (TRL and LLaMA-Factory run
the prompt twice), and packed step records share their common history. Log-probs are summed per
completion slot with a float32 log-softmax, computed in time chunks so the [B, T, vocab] logits
never exist at once; chunks with no completion token in any row (most of an agent step's long
prompt) skip the output head entirely. Metric names follow TRL, so curves compare directly with
TRL/LLaMA-Factory runs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def sequence_logps(model, rows: dict[str, jax.Array], num_slots: int, chunk: int = 64
                   ) -> jax.Array:
    """Σ log p(token | its prompt and the completion before it) over each completion slot's
    tokens → [B, num_slots]. `rows`: the `train.data.ROW_FIELDS` arrays [B, T]."""
    tokens, slots = rows["tokens"], rows["slots"]
    hidden, _ = model.hidden(tokens, rows["positions"], ends=rows["ends"])
    inputs = jnp.take_along_axis(hidden, rows["sources"][..., None], axis=1)
    weights = (slots[..., None] == jnp.arange(num_slots)).astype(jnp.float32)
    b, n = tokens.shape
    chunk = min(chunk, n)
    pad = (-n) % chunk
    inputs = jnp.pad(inputs, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(tokens, ((0, 0), (0, pad)))
    weights = jnp.pad(weights, ((0, 0), (0, pad), (0, 0)))

    @jax.checkpoint  # recompute each chunk's logits in the backward pass instead of storing them
    def head_logps(h, y, w):
        logits = model.logits(h)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), y[..., None], axis=-1)[..., 0]
        return jnp.einsum("bt,bts->bs", lp, w)

    def chunk_logps(h, y, w):
        return jax.lax.cond(jnp.any(w > 0), head_logps,
                            lambda *_: jnp.zeros((b, num_slots), jnp.float32), h, y, w)

    split = lambda x: x.reshape(b, -1, chunk, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731
    per_chunk = jax.lax.map(lambda xs: chunk_logps(*xs),
                            (split(inputs), split(targets), split(weights)))
    return per_chunk.sum(0)


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
             ref_rejected: jax.Array, beta: float, label_smoothing: float = 0.0,
             valid: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sigmoid DPO (Rafailov et al.) with conservative label smoothing; mean over the pairs
    (those marked `valid`: a packed row's unused slots are not pairs)."""
    logits = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    losses = (-(1 - label_smoothing) * jax.nn.log_sigmoid(logits)
              - label_smoothing * jax.nn.log_sigmoid(-logits))
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    w = jnp.ones_like(logits) if valid is None else valid.astype(jnp.float32)
    mean = lambda x: (x * w).sum() / jnp.maximum(w.sum(), 1.0)  # noqa: E731
    metrics = {
        "rewards/chosen": mean(chosen_reward),
        "rewards/rejected": mean(rejected_reward),
        "rewards/accuracies": mean((chosen_reward > rejected_reward).astype(jnp.float32)),
        "rewards/margins": mean(chosen_reward - rejected_reward),
        "logps/chosen": mean(policy_chosen),
        "logps/rejected": mean(policy_rejected),
    }
    return mean(losses), metrics


def sft_loss(logps: jax.Array, num_tokens: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-mean cross-entropy over completion tokens of the batch."""
    loss = -logps.sum() / jnp.maximum(num_tokens.sum(), 1.0)
    return loss, {"nll/token": loss}
