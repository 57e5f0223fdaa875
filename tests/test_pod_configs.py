"""Pod configs: their mesh and the trainer's parameter and optimiser shardings build with
abstract shapes on forced CPU devices, and one DPO step fits each chip: parameters, gradients,
the real trainer optimiser's state (per its shardings) and the activations of the configured
batch and length with rematerialised layers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# config file → (preset, devices, bytes of memory per device)
PODS = {
    "qwen2_5_7b_tpu_v5e64.yaml": ("qwen2.5-7b", 64, 16 * 2**30),   # TPU v5e: 16 GiB HBM per chip
    "qwen2_5_7b_8xh100.yaml": ("qwen2.5-7b", 8, 80 * 2**30),       # H100 80GB
}

PLAN = r"""
import dataclasses, json, sys
import jax, numpy as np
from flax import nnx
from reasonrag_jax.config import load_config
from reasonrag_jax.models.decoder import Decoder, PRESETS
from reasonrag_jax.sharding import make_mesh
from reasonrag_jax.train import trainer

cfg = load_config(sys.argv[1])
m = dataclasses.replace(PRESETS[sys.argv[2]], dtype=cfg.model.dtype,
                        param_dtype=cfg.model.param_dtype, remat=cfg.model.remat)
mesh = make_mesh(cfg.mesh)
_, state = nnx.split(nnx.eval_shape(lambda: Decoder(m, rngs=nnx.Rngs(0))))
params = state.to_pure_dict()
optimizer = trainer.make_optimizer(cfg.train, 1000)
place = trainer.placement(mesh, cfg.mesh.rules, state, optimizer)
opt_state = jax.eval_shape(optimizer.init, params)

def per_device(tree, shard_tree):
    total = 0
    for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shard_tree)):
        total += int(np.prod(sh.shard_shape(leaf.shape))) * leaf.dtype.itemsize
    return total

def activation_bytes():
    # Per device, one micro-batch of pair rows (prompt + chosen + rejected, packed: at most
    # 2 x train.max_length tokens, as each side is at most max_length), rows split over
    # data x fsdp, heads and MLP columns over tensor. With remat the backward keeps
    # every layer's input (the scan's saved residual stream), then recomputes one layer at a
    # time: its projections, float32 attention scores, bf16 probabilities and the scores'
    # float32 gradient, each with its gradient; the loss head runs on 64-token chunks
    # (train/dpo.py), float32 logits, log-softmax and their gradient.
    rows = cfg.train.batch_size // cfg.train.grad_accum // (mesh.shape["data"] * mesh.shape["fsdp"])
    t, tp, b = 2 * cfg.train.max_length, mesh.shape["tensor"], np.dtype(m.dtype).itemsize
    saved = m.num_layers * rows * t * m.hidden_size * b
    width = (m.hidden_size + (2 * m.num_heads + 2 * m.num_kv_heads) * m.head_dim // tp
             + 3 * m.intermediate_size // tp)
    layer = 2 * rows * t * width * b + rows * (m.num_heads // tp) * t * t * (4 + b + 4)
    mask = rows * t * t
    head = 3 * rows * 64 * (m.vocab_size // tp) * 4
    return saved + layer + mask + head, rows

param_bytes = per_device(params, place.params)
activations, rows = activation_bytes()
full = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))
print(json.dumps({
    "mesh": dict(mesh.shape), "devices": mesh.size, "param_bytes_total": full,
    "param_bytes_per_device": param_bytes,
    # The step sums micro-batch gradients in a scan: the accumulator and one micro-batch's
    # gradient live together, each shaped and sharded like the params.
    "grad_bytes_per_device": 2 * param_bytes,
    "opt_bytes_per_device": per_device(opt_state, place.opt_state),
    "activation_bytes_per_device": activations, "rows_per_device": rows,
    "sharded_leaves": sum(any(a is not None for a in s.spec) for s in jax.tree.leaves(place.params))}))
"""


@pytest.mark.parametrize("name", sorted(PODS))
def test_pod_config_fits_its_chips(name):
    preset, devices, hbm = PODS[name]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    out = subprocess.run([sys.executable, "-c", PLAN, str(ROOT / "configs" / name), preset],
                         env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    parts = {k.removesuffix("_bytes_per_device"): v for k, v in plan.items()
             if k.endswith("_bytes_per_device")}
    total = sum(parts.values())
    print(f"{name}: mesh {plan['mesh']}, {plan['rows_per_device']} rows per device: " + ", ".join(
        f"{k} {v / 2**30:.2f}" for k, v in parts.items()) +
        f" = {total / 2**30:.2f} GiB per device (of {hbm / 2**30:.0f} GiB)")
    assert plan["devices"] == devices
    assert plan["sharded_leaves"] > 0
    # 7.6B params in bf16 = 15.2 GB in all; sharding must divide it by (nearly) the device count.
    assert plan["param_bytes_per_device"] < 1.5 * plan["param_bytes_total"] / devices
    # AdamW: two moments per parameter (in the parameter's dtype), sharded like it.
    assert parts["opt"] >= 2 * parts["param"]
    assert total < 0.9 * hbm  # 10% left for XLA's temporaries and fragmentation
