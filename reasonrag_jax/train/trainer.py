"""One trainer for DPO and SFT: sharded jitted step, exact resume, NaN stop, logs.

The data position is a pure function of the step (a seeded permutation per epoch), so a run
restored from the checkpoint of step s continues with exactly the batches an uninterrupted run
would have seen. Reference log-probs for DPO are computed once, before training, and cached on
disk keyed by (base policy, data checksum, max_length): no reference model is held while
training.
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from reasonrag_jax.config import Config
from reasonrag_jax.io import append_jsonl, file_checksum, read_jsonl, write_bytes_atomic
from reasonrag_jax.models.decoder import Decoder
from reasonrag_jax.models.weights import load_policy
from reasonrag_jax.sharding import batch_sharding, make_mesh, state_shardings
from reasonrag_jax.train import checkpoint as ckpt
from reasonrag_jax.train.data import Encoded, bucket_length, encode_pairs, encode_sft, read_pairs, read_sft
from reasonrag_jax.train.dpo import dpo_loss, sequence_logps, sft_loss


class TrainingDiverged(RuntimeError):
    """Loss or gradient norm became NaN/inf; the message names the step and last good checkpoint."""


def run_train(cfg: Config, pairs: Path, out: Path, init: str | None = None) -> Path:
    """DPO on preference pairs (ours or RAG_ProGuide.json) → training dir with checkpoints."""
    return train(cfg, Path(pairs), Path(out), init, "dpo")


def run_sft(cfg: Config, records: Path, out: Path, init: str | None = None) -> Path:
    """SFT on `{"instruction","input","output"}` records through the same trainer."""
    return train(cfg, Path(records), Path(out), init, "sft")


def batch_rows(step: int, n_units: int, batch_size: int, seed: int, rows_per_unit: int) -> np.ndarray:
    """Row indices of the batch at `step`: a seeded permutation per epoch, wrapping at the end
    so every batch has the same size. Depends on nothing but its arguments (exact resume)."""
    per_epoch = math.ceil(n_units / batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n_units)
    units = np.take(perm, np.arange(k * batch_size, (k + 1) * batch_size), mode="wrap")
    return (units[:, None] * rows_per_unit + np.arange(rows_per_unit)).reshape(-1)


def _slice(data: Encoded, rows: np.ndarray, buckets: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    t = bucket_length(int(data.lengths[rows].max()), tuple(sorted(buckets)))
    t = max(t, int(data.lengths[rows].max()))
    tokens = np.zeros((len(rows), t), np.int32)
    mask = np.zeros((len(rows), t), np.float32)
    width = min(t, data.tokens.shape[1])
    tokens[:, :width] = data.tokens[rows, :width]
    mask[:, :width] = data.loss_mask[rows, :width]
    return tokens, mask


def _optimizer(cfg: Config, total_steps: int) -> optax.GradientTransformation:
    tc = cfg.train
    warmup = int(tc.warmup_ratio * total_steps)
    if tc.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, max(warmup, 1),
                                                max(total_steps, warmup + 1), 0.0)
    else:
        lr = optax.join_schedules([optax.linear_schedule(0.0, tc.learning_rate, max(warmup, 1)),
                                   optax.constant_schedule(tc.learning_rate)], [max(warmup, 1)])
    return optax.chain(optax.clip_by_global_norm(tc.max_grad_norm),
                       optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=tc.weight_decay))


def _reference_logps(graphdef, params, data: Encoded, cfg: Config, cache: Path, key: dict) -> np.ndarray:
    """log π_ref(completion | prompt) for every row, computed once and cached on disk."""
    meta = cache.with_suffix(".json")
    if cache.exists() and meta.exists() and json.loads(meta.read_text()) == key:
        return np.load(cache)
    fn = jax.jit(lambda p, t, m: sequence_logps(nnx.merge(graphdef, p), t, m))
    out = np.zeros(len(data.tokens), np.float32)
    step = max(2, cfg.train.batch_size * 2)
    for lo in tqdm(range(0, len(out), step), desc="reference log-probs", unit="batch"):
        rows = np.arange(lo, min(lo + step, len(out)))
        rows = np.pad(rows, (0, step - len(rows)), mode="edge")
        tokens, mask = _slice(data, rows, cfg.train.length_buckets)
        out[lo:lo + step] = np.asarray(fn(params, tokens, mask))[: len(out) - lo]
    np.save(cache.with_suffix(".tmp.npy"), out)
    Path(cache.with_suffix(".tmp.npy")).replace(cache)
    write_bytes_atomic(meta, json.dumps(key).encode())
    return out


def train(cfg: Config, data_path: Path, out: Path, init: str | None, objective: str) -> Path:
    tc = cfg.train
    base = init or cfg.model.policy
    model, tokenizer = load_policy(base, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype)
    if cfg.model.remat != model.cfg.remat:
        graphdef, state = nnx.split(model)
        remat_cfg = dataclasses.replace(model.cfg, remat=cfg.model.remat)
        model = nnx.merge(nnx.split(nnx.eval_shape(lambda: Decoder(remat_cfg, rngs=nnx.Rngs(0))))[0], state)
    if objective == "dpo":
        units = read_pairs(data_path)
        data, rows_per_unit = encode_pairs(tokenizer, units, tc.max_length), 2
    else:
        units = read_sft(data_path)
        data, rows_per_unit = encode_sft(tokenizer, units, tc.max_length), 1
    n_units = len(units)
    total = tc.max_steps or tc.epochs * math.ceil(n_units / tc.batch_size)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.write_policy_card(out, model.cfg, tokenizer, str(base))
    print(f"[train] {objective}: {n_units} examples ({data.truncated} truncated to "
          f"{tc.max_length} tokens), {total} steps of {tc.batch_size}")

    mesh = make_mesh(cfg.mesh)
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh, cfg.mesh.rules)
    params = jax.device_put(state.to_pure_dict(), shardings)
    ref = None
    if objective == "dpo":
        key = {"base": str(base), "data": file_checksum(data_path), "max_length": tc.max_length}
        ref = _reference_logps(graphdef, params, data, cfg, out / "ref_logps.npy", key)

    optimizer = _optimizer(cfg, total)
    opt_state = optimizer.init(params)
    mngr = ckpt.manager(out, tc.keep_checkpoints)
    start = mngr.latest_step() or 0
    if start:
        restored = ckpt.restore(mngr, start, params, opt_state)
        params, opt_state = restored["params"], restored["opt_state"]
        print(f"[train] resumed from step {start}")

    def loss_fn(p, tokens, mask, ref_lp):
        lp = sequence_logps(nnx.merge(graphdef, p), tokens, mask)
        if objective == "dpo":
            return dpo_loss(lp[0::2], lp[1::2], ref_lp[0::2], ref_lp[1::2], tc.beta, tc.label_smoothing)
        return sft_loss(lp, mask[:, 1:].sum(-1))

    def step_fn(p, opt_state, tokens, mask, ref_lp):
        """One optimiser step; the batch is split into `grad_accum` micro-batches."""
        split = lambda x: x.reshape(tc.grad_accum, -1, *x.shape[1:])  # noqa: E731

        def micro(acc, xs):
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, *xs)
            return jax.tree.map(jnp.add, acc, (loss, metrics, grads)), None

        zeros = jax.eval_shape(lambda: jax.value_and_grad(loss_fn, has_aux=True)(
            p, *(x[0] for x in map(split, (tokens, mask, ref_lp)))))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zeros[0][0], zeros[0][1], zeros[1]))
        (loss, metrics, grads), _ = jax.lax.scan(micro, zeros, tuple(map(split, (tokens, mask, ref_lp))))
        scale = 1.0 / tc.grad_accum
        loss, metrics, grads = jax.tree.map(lambda x: x * scale, (loss, metrics, grads))
        updates, opt_state = optimizer.update(grads, opt_state, p)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}
        return optax.apply_updates(p, updates), opt_state, metrics

    data_sharding = batch_sharding(mesh, cfg.mesh.rules)
    step_jit = jax.jit(step_fn, donate_argnums=(0, 1))
    writer = _tensorboard(out)
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for s in tqdm(range(start, total), initial=start, total=total, desc=objective, unit="step"):
            rows = batch_rows(s, n_units, tc.batch_size, tc.seed, rows_per_unit)
            tokens, mask = _slice(data, rows, tc.length_buckets)
            ref_lp = ref[rows] if ref is not None else np.zeros(len(rows), np.float32)
            tokens, mask, ref_lp = (jax.device_put(x, data_sharding if x.ndim == 2 else None)
                                    for x in (tokens, mask, ref_lp))
            params, opt_state, metrics = step_jit(params, opt_state, tokens, mask, ref_lp)
            metrics = {k: float(v) for k, v in metrics.items()}
            if not all(math.isfinite(v) for v in (metrics["loss"], metrics["grad_norm"])):
                mngr.wait_until_finished()
                last = mngr.latest_step()
                raise TrainingDiverged(
                    f"step {s + 1}: loss {metrics['loss']}, grad norm {metrics['grad_norm']}; "
                    f"training stopped. Last good checkpoint: "
                    f"{out / 'checkpoints' / str(last) if last else 'none'}")
            append_jsonl(out / "metrics.jsonl", [{"step": s + 1, **metrics}])
            if writer is not None:
                for k, v in metrics.items():
                    writer.add_scalar(k, v, s + 1)
            done = s + 1 == total or stop["signal"] is not None
            if (s + 1) % tc.save_every == 0 or done:
                ckpt.save(mngr, s + 1, params, opt_state, {"step": s + 1, "data_position": s + 1,
                                                           "objective": objective})
            if stop["signal"] is not None:
                print(f"[train] signal {stop['signal']}: saved step {s + 1}; re-run to resume")
                break
    finally:
        mngr.wait_until_finished()
        mngr.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if writer is not None:
            writer.close()
    if stop["signal"] is not None:
        raise KeyboardInterrupt
    plot_metrics(out / "metrics.jsonl", out / "training.png", objective)
    return out


def _tensorboard(out: Path) -> Any:
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # optional: metrics.jsonl has the same numbers
        return None
    return SummaryWriter(str(out / "tensorboard"))


def plot_metrics(metrics: Path, path: Path, objective: str) -> None:
    """Loss (and DPO reward margin) against step, as a PNG next to the checkpoints."""
    if not metrics.exists():
        return
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {}
    for _, r in read_jsonl(metrics, allow_empty=True):
        rows[r["step"]] = r  # a resumed run rewrites steps after its checkpoint: keep the last
    steps = sorted(rows)
    keys = ["loss"] + (["rewards/margins", "rewards/accuracies"] if objective == "dpo" else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), dpi=110)
    for ax, k in zip(np.atleast_1d(axes), keys):
        ax.plot(steps, [rows[s].get(k, np.nan) for s in steps])
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
