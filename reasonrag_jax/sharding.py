"""Device mesh, logical-axis sharding rules and multi-host start-up (MaxText style).

Parameters carry logical axis names (`sharding_names` metadata: "vocab", "embed", "mlp",
"heads", "kv_heads", "head_dim", "layers"); the config's rules map each to mesh axes
("data", "fsdp", "tensor"). Changing the parallelism of a run is a config change only.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from reasonrag_jax.config import MeshConfig
from reasonrag_jax.io import InputError, done_keys

MESH_AXES = ("data", "fsdp", "tensor")


def maybe_initialize_distributed() -> None:
    """Join the multi-process job when there is one; a no-op for a single process.

    - `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` set (launch/tpu.sh, local
      multi-process tests, any hand-rolled cluster): join explicitly; CPU processes exchange
      collectives over gloo.
    - Slurm or Open MPI with more than one task (GPU clusters): JAX reads their environment.
    - A Cloud TPU VM (libtpu installed, platform not forced to CPU): JAX reads the TPU metadata;
      on a single-host slice that is a one-process job, which is harmless.
    Must run before anything touches a JAX device.
    """
    if jax.distributed.is_initialized():
        return
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        # Only the CPU client reads this; GPU/TPU use NCCL / ICI whatever it says.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        try:
            count, index = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
        except (KeyError, ValueError):
            raise InputError("JAX_COORDINATOR_ADDRESS is set: JAX_NUM_PROCESSES and JAX_PROCESS_ID "
                             "must be set to integers too") from None
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=count, process_id=index)
    elif int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        jax.distributed.initialize()
    elif "cpu" not in env.get("JAX_PLATFORMS", "") and importlib.util.find_spec("libtpu"):
        jax.distributed.initialize()


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Resolve one -1 axis to fill the devices; refuse shapes that do not match them."""
    shape = {a: int(cfg.shape.get(a, 1)) for a in MESH_AXES}
    unknown = set(cfg.shape) - set(MESH_AXES)
    if unknown:
        raise InputError(f"mesh.shape: unknown axis '{sorted(unknown)[0]}' "
                         "(axes: data, fsdp, tensor)")
    free = [a for a, n in shape.items() if n == -1]
    if len(free) > 1:
        raise InputError("mesh.shape: at most one axis may be -1")
    fixed = math.prod(n for n in shape.values() if n != -1)
    if any(n == 0 or n < -1 for n in shape.values()):
        raise InputError(f"mesh.shape: sizes must be positive or -1, got {cfg.shape}")
    if free:
        if num_devices % fixed:
            raise InputError(f"mesh.shape {cfg.shape}: {num_devices} devices do not divide "
                             f"by {fixed}")
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


def fitted_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                rules: Sequence[tuple[str, Any]]) -> PartitionSpec:
    """Logical names → PartitionSpec for an array of `shape`; a dimension that its mesh axes do
    not divide is replicated instead."""
    spec = []
    for size, axes in zip(shape, logical_to_spec(names, rules)):
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes or ())
        ways = math.prod(mesh.shape[a] for a in axes_t)
        spec.append(axes if size % ways == 0 else None)
    return PartitionSpec(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> dict:
    """Pure dict of NamedShardings mirroring `state.to_pure_dict()`, from each variable's
    logical axis names (flax stores `sharding_names` as `out_sharding`); replicated if none.

    A dimension that the mesh axes do not divide is replicated instead (e.g. 4 KV heads on a
    tensor axis of 8), so any preset runs on any mesh; the other dimensions stay sharded.
    """

    def one(var):
        meta = var.get_metadata()
        names = meta.get("out_sharding") or meta.get("sharding_names")
        if not names:
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, fitted_spec(names, var.shape, mesh, rules))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable)).to_pure_dict()


def batch_spec(rules: Sequence[tuple[str, Any]], ndim: int, leading: int = 0) -> PartitionSpec:
    """Rows on the "batch" rule's mesh axes, after `leading` unsharded dims (micro-batch index)."""
    rows = logical_to_spec(("batch",) + (None,) * (ndim - 1), rules)
    return PartitionSpec(*(None,) * leading, *rows)


def batch_ways(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> int:
    """How many shards the batch dimension is split into."""
    axes = logical_to_spec(("batch",), rules)[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in axes)


def global_array(x: Any, sharding: NamedSharding) -> jax.Array:
    """A global jax.Array from a host value that every process holds in full (batches built
    deterministically on each host, freshly loaded weights): each process fills its own shards.
    Works alike for one process and for many, where `device_put` alone cannot."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


# ---------------------------------------------------------------- outputs of a multi-process job
# Every process of a pod runs the same eval / generate loop (the sampler's calls are collective);
# process 0 writes the outputs, which live on storage every process reads (as Orbax checkpoints
# do), so all of them resume from the same state.

def lead_process() -> bool:
    """Whether this process writes the shared outputs (process 0; the only one when alone)."""
    return jax.process_index() == 0


def sync_processes(name: str) -> None:
    """Barrier across the processes (a no-op for one): the lead's writes are done after it."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def resume_keys(path: str | os.PathLike, key: str) -> set[Any]:
    """`done_keys` of a shared output: the lead repairs a torn tail first, then every process
    reads the same keys — or the run stops, as processes resuming from different states would
    make different sampler calls and wait on each other forever."""
    keys = done_keys(path, key) if lead_process() else set()
    sync_processes(f"resume {path}")
    if jax.process_count() > 1:
        keys = keys if lead_process() else done_keys(path, key)
        digest = hashlib.sha256(json.dumps(sorted(map(str, keys))).encode()).digest()
        try:
            multihost_utils.assert_equal(np.frombuffer(digest, np.uint32), "")
        except AssertionError:
            raise InputError(f"{Path(path)}: the processes see different finished records; "
                             "--out must be on storage that every process shares") from None
    return keys
