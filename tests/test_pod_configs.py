"""Pod configs: their mesh and parameter shardings build with abstract shapes on forced CPU
devices, and params + AdamW state fit the chips by that computation."""
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
import jax, numpy as np, optax
from flax import nnx
from reasonrag_jax.config import load_config
from reasonrag_jax.models.decoder import Decoder, PRESETS
from reasonrag_jax.sharding import make_mesh, state_shardings

cfg = load_config(sys.argv[1])
model_cfg = dataclasses.replace(PRESETS[sys.argv[2]], dtype=cfg.model.dtype,
                                param_dtype=cfg.model.param_dtype, remat=cfg.model.remat)
mesh = make_mesh(cfg.mesh)
_, state = nnx.split(nnx.eval_shape(lambda: Decoder(model_cfg, rngs=nnx.Rngs(0))))
params = state.to_pure_dict()
shardings = state_shardings(state, mesh, cfg.mesh.rules)
opt = jax.eval_shape(optax.adamw(1e-6).init, params)

def per_device(tree, shard_tree):
    total = 0
    for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shard_tree)):
        shard = sh.shard_shape(leaf.shape)
        total += int(np.prod(shard)) * leaf.dtype.itemsize
    return total

param_bytes = per_device(params, shardings)
# AdamW's mu and nu mirror the params (same shapes, dtypes and shardings).
opt_bytes = 2 * param_bytes
full = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))
print(json.dumps({"mesh": dict(mesh.shape), "devices": mesh.size, "param_bytes_total": full,
                  "param_bytes_per_device": param_bytes, "opt_bytes_per_device": opt_bytes,
                  "sharded_leaves": sum(any(a is not None for a in s.spec)
                                        for s in jax.tree.leaves(shardings))}))
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
    per_device = plan["param_bytes_per_device"] + plan["opt_bytes_per_device"]
    print(f"{name}: mesh {plan['mesh']}, params {plan['param_bytes_per_device'] / 2**30:.2f} GiB + "
          f"AdamW {plan['opt_bytes_per_device'] / 2**30:.2f} GiB per device "
          f"(of {hbm / 2**30:.0f} GiB)")
    assert plan["devices"] == devices
    assert plan["sharded_leaves"] > 0
    # 7.6B params in bf16 = 15.2 GB in all; sharding must divide it by (nearly) the device count.
    assert plan["param_bytes_per_device"] < 1.5 * plan["param_bytes_total"] / devices
    assert per_device < 0.6 * hbm  # leaves ≥ 40% of the chip for activations and the KV cache
