"""DPO and SFT objectives: pure functions of log-probs (the trainer supplies them).

A training row is one prompt followed by its continuations (`train.data`): an SFT record's
completion, or a pair's chosen then rejected completion. Each continuation attends to the prompt
and to itself only, at the positions it would have after the prompt alone, so one pass over the
prompt scores both sides of a pair exactly as two separate rows would (TRL and LLaMA-Factory run
the prompt twice). Log-probs are summed per continuation with a float32 log-softmax, computed in
time chunks so the [B, T, vocab] logits never exist at once; chunks with no continuation token in
any row (most of an agent step's long prompt) skip the output head entirely. Metric names follow
TRL, so curves compare directly with TRL/LLaMA-Factory runs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def packed_layout(segments: jax.Array, completions: int) -> tuple[jax.Array, jax.Array]:
    """(positions, source) of rows laid out as `segments` [B, T] (0 prompt, k the k-th
    continuation, -1 padding): a continuation's positions restart where the prompt ends, and
    token t is predicted from the hidden state at `source[t]` — the token before it, or for a
    continuation's first token the prompt's last."""
    idx = jnp.arange(segments.shape[1])
    starts = jnp.argmax(segments[:, :, None] == jnp.arange(1, completions + 1), axis=1)  # [B, S]
    prompt = starts[:, :1]
    start = jnp.take_along_axis(starts, jnp.clip(segments - 1, 0, completions - 1), axis=1)
    inside = segments > 0
    positions = jnp.where(inside, idx - (start - prompt), idx)
    source = jnp.maximum(jnp.where(inside & (idx == start), prompt - 1, idx - 1), 0)
    return positions, source


def sequence_logps(model, tokens: jax.Array, segments: jax.Array, completions: int = 1,
                   chunk: int = 64) -> jax.Array:
    """Σ log p(token | prompt and the continuation before it) over each continuation's tokens
    → [B, completions]."""
    segments = segments.astype(jnp.int32)
    positions, source = packed_layout(segments, completions)
    hidden, _ = model.hidden(tokens, positions, segments=segments)
    inputs = jnp.take_along_axis(hidden, source[..., None], axis=1)
    weights = (segments[..., None] == jnp.arange(1, completions + 1)).astype(jnp.float32)
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
                            lambda *_: jnp.zeros((b, completions), jnp.float32), h, y, w)

    split = lambda x: x.reshape(b, -1, chunk, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731
    per_chunk = jax.lax.map(lambda xs: chunk_logps(*xs),
                            (split(inputs), split(targets), split(weights)))
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
