"""Device mesh, logical-axis sharding rules and multi-host start-up (MaxText style).

Parameters carry logical axis names (`sharding_names` metadata: "vocab", "embed", "mlp",
"heads", "kv_heads", "head_dim", "layers"); the config's rules map each to mesh axes
("data", "fsdp", "tensor"). Changing the parallelism of a run is a config change only.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from reasonrag_jax.config import MeshConfig
from reasonrag_jax.io import InputError

MESH_AXES = ("data", "fsdp", "tensor")


def maybe_initialize_distributed() -> None:
    """Join the multi-process job when there is one; a no-op on a single host.

    TPU pods and SLURM / Open MPI GPU clusters are detected by JAX itself; a local multi-process
    run (tests, a CPU cluster) sets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.
    """
    if jax.distributed.is_initialized():
        return
    coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if coordinator:
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
    elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("SLURM_NTASKS", "1") != "1":
        jax.distributed.initialize()


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Resolve one -1 axis to fill the devices; refuse shapes that do not match them."""
    shape = {a: int(cfg.shape.get(a, 1)) for a in MESH_AXES}
    unknown = set(cfg.shape) - set(MESH_AXES)
    if unknown:
        raise InputError(f"mesh.shape: unknown axis '{sorted(unknown)[0]}' (axes: data, fsdp, tensor)")
    free = [a for a, n in shape.items() if n == -1]
    if len(free) > 1:
        raise InputError("mesh.shape: at most one axis may be -1")
    fixed = math.prod(n for n in shape.values() if n != -1)
    if any(n == 0 or n < -1 for n in shape.values()):
        raise InputError(f"mesh.shape: sizes must be positive or -1, got {cfg.shape}")
    if free:
        if num_devices % fixed:
            raise InputError(f"mesh.shape {cfg.shape}: {num_devices} devices do not divide by {fixed}")
        shape[free[0]] = num_devices // fixed
    if math.prod(shape.values()) != num_devices:
        raise InputError(f"mesh.shape {cfg.shape} needs {math.prod(shape.values())} devices, "
                         f"{num_devices} are available")
    return shape


def make_mesh(cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    grid = np.asarray(devices).reshape([shape[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def logical_to_spec(names: Sequence[str | None], rules: Sequence[tuple[str, Any]]) -> PartitionSpec:
    """Logical axis names → PartitionSpec; a mesh axis is used at most once per array."""
    table = {k: (tuple(v) if isinstance(v, list) else v) for k, v in rules}
    used: set[str] = set()
    out = []
    for name in names:
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> dict:
    """Pure dict of NamedShardings mirroring `state.to_pure_dict()`, from each variable's
    logical axis names (flax stores `sharding_names` as `out_sharding`); replicated if none."""

    def one(var):
        meta = var.get_metadata()
        names = meta.get("out_sharding") or meta.get("sharding_names")
        return NamedSharding(mesh, logical_to_spec(names, rules) if names else PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable)).to_pure_dict()


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]], ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))
