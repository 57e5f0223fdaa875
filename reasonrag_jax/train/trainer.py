"""One trainer for DPO and SFT: a sharded jitted step, exact resume, NaN stop, logs.

The data position is a pure function of the step (a seeded permutation per epoch), so a run
restored from the checkpoint of step s continues with exactly the batches an uninterrupted run
would have seen. Reference log-probs for DPO are computed once, before training, and cached on
disk keyed by a fingerprint of the initial weights and the exact token arrays: no reference model
is held while training. With `train.val_fraction`, a share of the units, chosen by the seed alone,
is held out and scored with the training loss at every save (`evaluate`). Every process builds the
same host batch; each fills only its own shards (`global_array`), so one process and a pod run the
same code.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from reasonrag_jax.config import Config, TrainConfig, to_dict
from reasonrag_jax.io import InputError, append_jsonl, read_jsonl, save_figure, write_bytes_atomic
from reasonrag_jax.logs import get_logger, tensorboard_writer
from reasonrag_jax.models.policy import load_policy
from reasonrag_jax.sharding import (batch_spec, batch_ways, global_array, make_mesh,
                                    state_shardings)
from reasonrag_jax.train import checkpoint as ckpt
from reasonrag_jax.train.data import (ROW_FIELDS, Encoded, Example, batch_arrays, encode_examples,
                                      pad_id, pair_examples, read_pairs, read_sft, sft_examples)
from reasonrag_jax.train.dpo import dpo_loss, sequence_logps, sft_loss

log = get_logger(__name__)
# Train settings a resumed run must share with the checkpoint it resumes (the rest — save
# cadence, how many to keep — may change between runs).
_RESUME_KEYS = ("objective", "beta", "label_smoothing", "learning_rate", "warmup_ratio", "schedule",
                "weight_decay", "max_grad_norm", "batch_size", "grad_accum", "epochs", "max_steps",
                "max_length", "pack_length", "seed", "val_fraction")


class TrainingDiverged(RuntimeError):
    """Loss or gradient norm became NaN/inf; the message names the step and last good checkpoint."""


def run_train(cfg: Config, pairs: Path, out: Path, init: str | None = None) -> Path:
    """DPO on preference pairs (ours or RAG_ProGuide.json) → training dir with checkpoints."""
    return train(cfg, Path(pairs), Path(out), init, "dpo")


def run_sft(cfg: Config, records: Path, out: Path, init: str | None = None) -> Path:
    """SFT on `{"instruction","input","output"}` records through the same trainer."""
    return train(cfg, Path(records), Path(out), init, "sft")


def batch_rows(step: int, n_units: int, batch_size: int, seed: int,
               unit_lengths: np.ndarray | None = None, group: int = 16) -> np.ndarray:
    """Row (= unit) indices of the batch at `step`: a seeded permutation per epoch, wrapping at
    the end so every batch has the same size. Depends on nothing but its arguments (exact
    resume).

    With `unit_lengths`, each run of `group` batches of the permutation is sorted by length
    before it is cut into batches, and the epoch's batches are then shuffled: rows of a batch
    have similar lengths, so the length bucket wastes less on padding (agent-step prompts range
    over 3x in length), while every batch is still a random draw of its neighbourhood.
    """
    per_epoch = math.ceil(n_units / batch_size)
    epoch, k = divmod(step, per_epoch)
    rng = np.random.default_rng([seed, epoch])
    order = np.take(rng.permutation(n_units), np.arange(per_epoch * batch_size), mode="wrap")
    if unit_lengths is not None:
        span = group * batch_size
        for start in range(0, len(order), span):
            part = order[start:start + span]
            order[start:start + span] = part[np.argsort(-unit_lengths[part], kind="stable")]
        k = rng.permutation(per_epoch)[k]
    return order[k * batch_size:(k + 1) * batch_size]


def fitted_batch_size(batch_size: int, multiple: int, n_units: int) -> int:
    """`batch_size`, or with fewer training units than that, the fewest rows that hold them all
    and still split into the step's micro-batches over the batch shards (a multiple of
    `multiple`; only to fill that multiple does a unit repeat). A full batch of a few units
    would wrap (`batch_rows`): every repeated unit is computed again and counts twice in the
    mean. The quick demo's DPO stage on 2 pairs at `batch_size` 4 took 44 s, at 2 rows 33 s
    (AVX2 EPYC, 2026-12-01)."""
    return min(batch_size, -(-n_units // multiple) * multiple)


def split_units(n_units: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training units, held-out units), each sorted: ⌈fraction · n_units⌉ units held out by a
    permutation seeded by `seed` alone, so the split is the same for any batch size, mesh or
    resume. A fraction that leaves either side empty is refused."""
    n_val = math.ceil(round(fraction * n_units, 9))
    if fraction > 0 and not 0 < n_val < n_units:
        raise InputError(f"train.val_fraction {fraction} holds out {n_val} of {n_units} units, "
                         f"leaving no {'training' if n_val else 'validation'} unit")
    order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,))).permutation(n_units)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def lr_schedule(tc: TrainConfig, total_steps: int) -> optax.Schedule:
    """Learning rate warmed up linearly over `warmup_ratio` of the steps, then cosine-decayed
    towards 0 or held constant (`train.schedule`, validated at config load).

    Update k gets the rate a 0-based schedule gives at k + 1, so no update is wasted: the first
    has lr/warmup (not 0, as in HF's warmup schedules, which lose the first step — all of a
    run with a handful of steps), and the last keeps a small non-zero rate."""
    warmup = max(int(tc.warmup_ratio * total_steps), 1)
    if tc.schedule == "cosine":
        base = optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, warmup,
                                                  max(total_steps + 1, warmup + 1), 0.0)
    else:
        base = optax.join_schedules([optax.linear_schedule(0.0, tc.learning_rate, warmup),
                                     optax.constant_schedule(tc.learning_rate)], [warmup])
    return lambda step: base(step + 1)


def make_optimizer(tc: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    """Clip → AdamW on `lr_schedule`."""
    return optax.chain(optax.clip_by_global_norm(tc.max_grad_norm),
                       optax.adamw(lr_schedule(tc, total_steps), b1=0.9, b2=0.999, eps=1e-8,
                                   weight_decay=tc.weight_decay))


@dataclass(frozen=True)
class Placement:
    """Where every array of a training step lives on the mesh."""
    mesh: Mesh
    params: Any              # pytree of NamedSharding (from the params' logical axis names)
    opt_state: Any           # the same for the optimiser state (moments follow their params)
    rows: NamedSharding      # [N, T] token rows
    micro: NamedSharding     # [A, N/A, T] micro-batched rows (and their [A, N/A, S] ref log-probs)
    replicated: NamedSharding


def placement(mesh: Mesh, rules: Any, state: nnx.State, optimizer: optax.GradientTransformation
              ) -> Placement:
    params = state_shardings(state, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.eval_shape(optimizer.init, state.to_pure_dict())
    opt_state = optax.tree_map_params(optimizer, lambda _, s: s, abstract, params,
                                      transform_non_params=lambda _: replicated)
    sharding = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    return Placement(mesh, params, opt_state, rows=sharding(batch_spec(rules, 2)),
                     micro=sharding(batch_spec(rules, 2, leading=1)), replicated=replicated)


def place_state(host_params: Any, optimizer: optax.GradientTransformation, place: Placement
                ) -> tuple[Any, Any]:
    """Host params → sharded params and a freshly initialised, sharded optimiser state."""
    params = jax.tree.map(global_array, host_params, place.params)
    opt_state = jax.jit(optimizer.init, out_shardings=place.opt_state)(params)
    return params, opt_state


def objective_loss(tc: TrainConfig, objective: str, lp: Any, slots: Any, ref_lp: Any
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of rows' completion-slot log-probs `lp` [N, S]: DPO against the
    reference log-probs `ref_lp` [N, S] (a pair's chosen in an even slot, its rejected in the
    next), or SFT's token mean over the completion tokens (`slots` [N, T] ≥ 0). The train step
    and the held-out evaluation both call it."""
    if objective == "dpo":
        present = (slots[..., None] == jnp.arange(lp.shape[1])[::2]).any(1)
        return dpo_loss(lp[:, 0::2], lp[:, 1::2], ref_lp[:, 0::2], ref_lp[:, 1::2], tc.beta,
                        tc.label_smoothing, valid=present)
    return sft_loss(lp.sum(-1), (slots >= 0).sum(-1))


def make_train_step(graphdef: Any, optimizer: optax.GradientTransformation, tc: TrainConfig,
                    objective: str, place: Placement):
    """Jitted (params, opt_state, rows {field: [A,n,T]}, ref [A,n,S]) → (params, opt_state,
    metrics): gradients averaged over the A micro-batches, one update."""

    def loss_fn(p, rows, ref_lp):
        lp = sequence_logps(nnx.merge(graphdef, p), rows, ref_lp.shape[-1])
        return objective_loss(tc, objective, lp, rows["slots"], ref_lp)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(p, opt_state, rows, ref_lp):
        def micro(acc, xs):
            return jax.tree.map(jnp.add, acc, grad_fn(p, *xs)), None

        first = jax.tree.map(lambda x: x[0], (rows, ref_lp))
        shapes = jax.eval_shape(grad_fn, p, *first)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        ((loss, metrics), grads), _ = jax.lax.scan(micro, zeros, (rows, ref_lp))
        loss, metrics, grads = jax.tree.map(lambda x: x / ref_lp.shape[0], (loss, metrics, grads))
        updates, opt_state = optimizer.update(grads, opt_state, p)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        return optax.apply_updates(p, updates), opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1),
                   in_shardings=(place.params, place.opt_state, place.micro, place.micro),
                   out_shardings=(place.params, place.opt_state, place.replicated))


def fingerprint(params: Any, place: Placement) -> str:
    """Cheap content hash of (sharded) weights: three weighted sums per tensor, computed on
    device. Any training step changes it; it never needs the weights on one host."""

    def sums(x):
        x = x.astype(jnp.float32).ravel()
        w = jnp.sin(jnp.arange(x.size, dtype=jnp.float32) * 0.618)
        return jnp.stack([x.sum(), jnp.abs(x).sum(), (x * w).sum()])

    fn = jax.jit(lambda p: jax.tree.map(sums, p), out_shardings=place.replicated)
    leaves = jax.tree.leaves(jax.device_get(fn(params)))
    return hashlib.sha256(np.stack(leaves).tobytes()).hexdigest()


def make_logps_fn(graphdef: Any, place: Placement, num_slots: int) -> Any:
    """Jitted (params, rows {field: [N, T]}) → completion-slot log-probs [N, num_slots], no
    gradient."""
    return jax.jit(lambda p, rows: sequence_logps(nnx.merge(graphdef, p), rows, num_slots),
                   in_shardings=(place.params, place.rows), out_shardings=place.replicated)


def row_logps(fn: Any, params: Any, data: Encoded, rows_per_call: int, buckets: tuple[int, ...],
              place: Placement, desc: str) -> np.ndarray:
    """`fn` (`make_logps_fn`) over every row of `data`, `rows_per_call` rows per call, right-padded
    to their length bucket; the last call is filled with copies of the last row, so every call has
    one of the bucket shapes and nothing compiles per batch."""
    out = np.zeros((len(data.tokens), data.num_slots), np.float32)
    for lo in tqdm(range(0, len(out), rows_per_call), desc=desc, unit="batch", leave=False,
                   disable=jax.process_index() > 0):
        rows = np.minimum(np.arange(lo, lo + rows_per_call), len(out) - 1)
        batch = batch_arrays(data, rows, buckets)
        got = fn(params, {f: global_array(x, place.rows) for f, x in batch.items()})
        out[lo:lo + rows_per_call] = np.asarray(got)[: len(out) - lo]
    return out


def reference_logps(graphdef: Any, params: Any, data: Encoded, rows_per_call: int,
                    buckets: tuple[int, ...], place: Placement, cache_dir: Path, dtype: str,
                    fn: Any = None) -> np.ndarray:
    """log π_ref(completion | prompt) of every completion slot [N, S], computed once and cached
    on disk under a key of (weights fingerprint, exact rows, compute dtype). `fn`: a
    `make_logps_fn` to share (with its compiled shapes) with the held-out evaluation."""
    h = hashlib.sha256(f"{fingerprint(params, place)}|{dtype}".encode())
    for f in ROW_FIELDS:
        h.update(getattr(data, f).tobytes())
    cache = cache_dir / f"{h.hexdigest()[:32]}.npy"
    if cache.is_file():
        return np.load(cache)
    out = row_logps(fn or make_logps_fn(graphdef, place, data.num_slots), params, data,
                    rows_per_call, buckets, place, "reference log-probs")
    if jax.process_index() == 0:
        import io

        buf = io.BytesIO()
        np.save(buf, out)
        write_bytes_atomic(cache, buf.getvalue())
    return out


def _check_resume(record: dict[str, Any], cfg: Config, out: Path, held_out: list[int]) -> None:
    saved = record.get("config", {}).get("train", {})
    now = to_dict(cfg)["train"]
    # A key newer than the checkpoint: the run that wrote it behaved as its default does.
    default = to_dict(Config())["train"]
    for k in _RESUME_KEYS:
        if saved and saved.get(k, default[k]) != now[k]:
            raise InputError(f"{out}/checkpoints/{record['step']}: written with "
                             f"train.{k}={saved.get(k, default[k])!r}, now {now[k]!r}; use the "
                             "same settings to resume or a new --out")
    if record.get("held_out", []) != held_out:
        raise InputError(f"{out}/checkpoints/{record['step']}: held out other units than this run "
                         "would (a different data file?); resume on the same data or use a new "
                         "--out")


@dataclass
class TrainData:
    """Encoded rows (one example each, or packed: `train.pack_length`) and, for DPO, their
    reference log-probs."""
    encoded: Encoded
    ref: np.ndarray | None = None  # [rows, num_slots] reference log-probs (DPO)

    @property
    def n_rows(self) -> int:
        return len(self.encoded.lengths)


def load_examples(tokenizer: Any, data_path: Path, objective: str, max_length: int
                  ) -> tuple[list[Example], int]:
    """Every example of the file, tokenized and cut by the truncation rule (how many were)."""
    if objective == "dpo":
        return pair_examples(tokenizer, read_pairs(data_path), max_length)
    return sft_examples(tokenizer, read_sft(data_path), max_length)


def encode_units(tokenizer: Any, examples: list[Example], units: np.ndarray, pack_length: int
                 ) -> Encoded:
    """The examples at `units` as training rows."""
    return encode_examples([examples[i] for i in units], pad_id(tokenizer), pack_length)


def _check_batching(cfg: Config, mesh: Mesh) -> None:
    tc = cfg.train
    if tc.batch_size % tc.grad_accum:
        raise InputError(f"train.batch_size {tc.batch_size} is not a multiple of train.grad_accum "
                         f"{tc.grad_accum}")
    micro_rows = tc.batch_size // tc.grad_accum
    if micro_rows % batch_ways(mesh, cfg.mesh.rules):
        raise InputError(f"a micro-batch of {micro_rows} rows does not split over the "
                         f"{batch_ways(mesh, cfg.mesh.rules)} batch shards of mesh "
                         f"{dict(mesh.shape)}")


def _init_or_restore(cfg: Config, out: Path, mngr: ocp.CheckpointManager, params: Any,
                     opt_state: Any, held_out: list[int]) -> tuple[int, Any, Any]:
    """(first step, params, optimiser state): the latest checkpoint's when `out` has one (its
    settings must match this run's), else the given fresh ones."""
    start = mngr.latest_step() or 0
    if not start:
        return 0, params, opt_state
    restored = ckpt.restore(mngr, start, params, opt_state)
    _check_resume(restored["record"], cfg, out, held_out)
    log.info("resumed from step %d", start)
    return start, restored["params"], restored["opt_state"]


class _Logger:
    """Per-step metrics to metrics.jsonl, TensorBoard and the progress bar (lead process only)."""

    def __init__(self, out: Path, lead: bool):
        self.path, self.lead = out / "metrics.jsonl", lead
        self.writer = tensorboard_writer(out / "tensorboard") if lead else None

    def step(self, step: int, metrics: dict[str, float], bar: tqdm) -> None:
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                        tok_s=f"{metrics['tokens_per_s']:.0f}")
        if not self.lead:
            return
        append_jsonl(self.path, [{"step": step, **metrics}])
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def train(cfg: Config, data_path: Path, out: Path, init: str | None, objective: str) -> Path:
    """Load the policy and data, init or restore, run the loop; the training dir gets the policy
    card, checkpoints, metrics.jsonl, TensorBoard scalars and training.png."""
    tc = cfg.train
    base = init or cfg.model.policy
    model, tokenizer = load_policy(base, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                                   remat=cfg.model.remat)
    # A training dir keeps its own dtypes; the run's config decides compute dtype and remat.
    model.cfg = dataclasses.replace(model.cfg, dtype=cfg.model.dtype, remat=cfg.model.remat,
                                    param_dtype=cfg.model.param_dtype)
    decoder_cfg = model.cfg
    graphdef, state = nnx.split(model)
    host_params = jax.tree.map(lambda x: np.asarray(x, jnp.dtype(cfg.model.param_dtype)),
                               state.to_pure_dict())
    del model
    examples, truncated = load_examples(tokenizer, data_path, objective, tc.max_length)
    train_units, val_units = split_units(len(examples), tc.val_fraction, tc.seed)
    data = TrainData(encode_units(tokenizer, examples, train_units, tc.pack_length))
    val = None
    if len(val_units):  # held-out rows longest first: an eval call's rows share a length bucket
        held = encode_units(tokenizer, examples, val_units, tc.pack_length)
        val = TrainData(held.take(np.argsort(-held.lengths, kind="stable")))
    mesh = make_mesh(cfg.mesh)
    _check_batching(cfg, mesh)
    # The configured batch size stays in the config (and so in checkpoints and resume checks).
    step_rows = fitted_batch_size(tc.batch_size,
                                  tc.grad_accum * batch_ways(mesh, cfg.mesh.rules),
                                  data.n_rows)
    total = tc.max_steps or tc.epochs * math.ceil(data.n_rows / step_rows)
    lead = jax.process_index() == 0
    out.mkdir(parents=True, exist_ok=True)
    if lead:
        ckpt.write_policy_card(out, decoder_cfg, tokenizer, str(base))
    log.info("%s: %d examples (%d truncated to %d tokens, %d held out) in %d rows, %d steps of "
             "%d rows, mesh %s", objective, len(examples), truncated, tc.max_length,
             len(val_units), data.n_rows, total, step_rows, dict(mesh.shape))

    optimizer = make_optimizer(tc, total)
    place = placement(mesh, cfg.mesh.rules, state, optimizer)
    params, opt_state = place_state(host_params, optimizer, place)
    del host_params, state
    logps_fn = make_logps_fn(graphdef, place, data.encoded.num_slots)
    val_logps_fn = None
    if val is not None:    # packed held-out rows may hold another number of examples
        val_logps_fn = (logps_fn if val.encoded.num_slots == data.encoded.num_slots
                        else make_logps_fn(graphdef, place, val.encoded.num_slots))
    if objective == "dpo":  # one pass each, cached with the initial weights
        for d, fn in ((data, logps_fn), (val, val_logps_fn)):
            if d is not None:
                d.ref = reference_logps(graphdef, params, d.encoded, tc.batch_size,
                                        tc.length_buckets, place, out / "ref_logps",
                                        cfg.model.dtype, fn=fn)
    mngr = ckpt.manager(out, tc.keep_checkpoints)
    start, params, opt_state = _init_or_restore(cfg, out, mngr, params, opt_state,
                                                val_units.tolist())
    step_fn = make_train_step(graphdef, optimizer, tc, objective, place)
    _loop(cfg, out, objective, data, val, val_logps_fn, place, step_fn, mngr, params, opt_state,
          start, total, step_rows, val_units.tolist())
    if lead:
        plot_metrics(out / "metrics.jsonl", out / "training.png", objective)
    return out


def evaluate(logps_fn: Any, params: Any, val: TrainData, tc: TrainConfig, objective: str,
             place: Placement) -> dict[str, float]:
    """The training objective (`objective_loss`, no gradient) over all held-out units at once,
    from log-probs computed as the reference pass computes them (`row_logps`: same function,
    batch shape and length buckets) → eval_loss; DPO adds eval_reward_accuracy (share of pairs
    whose chosen implicit reward exceeds the rejected one: margin > 0) and eval_margin (mean)."""
    lp = row_logps(logps_fn, params, val.encoded, tc.batch_size, tc.length_buckets, place,
                   "held-out eval")
    ref = val.ref if val.ref is not None else np.zeros_like(lp)
    loss, metrics = objective_loss(tc, objective, lp, val.encoded.slots, ref)
    out = {"eval_loss": float(loss)}
    if objective == "dpo":
        out.update(eval_reward_accuracy=float(metrics["rewards/accuracies"]),
                   eval_margin=float(metrics["rewards/margins"]))
    return out


def _loop(cfg: Config, out: Path, objective: str, data: TrainData, val: TrainData | None,
          logps_fn: Any, place: Placement, step_fn: Any, mngr: ocp.CheckpointManager,
          params: Any, opt_state: Any, start: int, total: int, step_rows: int,
          held_out: list[int]) -> None:
    """Steps `start`..`total` of `step_rows` rows: batch, step, NaN check, held-out eval (periodic
    saves and the last step), log, save; a SIGTERM / Ctrl-C saves the step in flight and stops
    (KeyboardInterrupt)."""
    tc = cfg.train
    lead = jax.process_index() == 0
    lr = lr_schedule(tc, total)
    logger = _Logger(out, lead)
    stop: dict[str, Any] = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    # Save-and-stop on SIGTERM (preemption) / Ctrl-C; handlers can only be set from the main thread.
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT) if main}
    bar = tqdm(range(start, total), initial=start, total=total, desc=objective, unit="step",
               disable=not lead)
    try:
        for s in bar:
            began = time.perf_counter()
            rows = batch_rows(s, data.n_rows, step_rows, tc.seed, data.encoded.lengths)
            ref_lp = data.ref[rows] if data.ref is not None else \
                np.zeros((len(rows), data.encoded.num_slots), np.float32)
            micro = lambda x: global_array(  # noqa: E731
                x.reshape(tc.grad_accum, -1, *x.shape[1:]), place.micro)
            batch = {f: micro(x) for f, x in batch_arrays(data.encoded, rows,
                                                          tc.length_buckets).items()}
            params, opt_state, metrics = step_fn(params, opt_state, batch, micro(ref_lp))
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                mngr.wait_until_finished()
                last = mngr.latest_step()
                raise TrainingDiverged(
                    f"step {s + 1}: loss {metrics['loss']}, grad norm {metrics['grad_norm']}; "
                    f"training stopped. Last good checkpoint: "
                    f"{out / 'checkpoints' / str(last) if last else 'none (nothing saved yet)'}")
            seconds = time.perf_counter() - began
            metrics.update(lr=float(lr(s)), step_time_s=seconds,
                           tokens_per_s=float(data.encoded.lengths[rows].sum()) / seconds)
            periodic = (s + 1) % tc.save_every == 0 or s + 1 == total
            if val is not None and periodic:
                metrics.update(evaluate(logps_fn, params, val, tc, objective, place))
            logger.step(s + 1, metrics, bar)
            if periodic or stop["signal"] is not None:
                ckpt.save(mngr, s + 1, params, opt_state,
                          {"step": s + 1, "data_position": s + 1, "config": to_dict(cfg),
                           "held_out": held_out})
            if stop["signal"] is not None:
                log.warning("signal %s: saved step %d; re-run to resume", stop["signal"], s + 1)
                break
    finally:
        bar.close()
        mngr.wait_until_finished()
        mngr.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
        logger.close()
    if stop["signal"] is not None:
        raise KeyboardInterrupt


def plot_metrics(metrics: Path, path: Path, objective: str) -> None:
    """Loss (and DPO reward margin / accuracy) against step, with the held-out values where
    there are any, as a PNG beside the checkpoints."""
    if not metrics.exists():
        return

    from matplotlib.figure import Figure

    rows = {}
    for _, r in read_jsonl(metrics, allow_empty=True):
        rows[r["step"]] = r  # a resumed run rewrites steps after its checkpoint: keep the last
    steps = sorted(rows)
    keys = ["loss"] + (["rewards/margins", "rewards/accuracies"] if objective == "dpo" else [])
    fig = Figure(figsize=(4 * len(keys), 3), dpi=110)
    axes = fig.subplots(1, len(keys))
    held_out = {"loss": "eval_loss", "rewards/margins": "eval_margin",
                "rewards/accuracies": "eval_reward_accuracy"}
    for ax, k in zip(np.atleast_1d(axes), keys):
        ax.plot(steps, [rows[s].get(k, np.nan) for s in steps], label="train")
        evals = [s for s in steps if held_out[k] in rows[s]]
        if evals:
            ax.plot(evals, [rows[s][held_out[k]] for s in evals], "o-", label="held out")
            ax.legend()
        ax.set_title(k)
        ax.set_xlabel("step")
    save_figure(fig, path)
