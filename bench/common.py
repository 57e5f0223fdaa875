"""What every bench reports beside its numbers: the CPU's vector ISA, since the targets differ
by it (torch has AVX-512 kernels XLA:CPU lacks), and the one JSON line last."""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

# Widest first: the first extension whose flag the CPU lists names it.
_ISA_FLAGS = (("avx512", "avx512f"), ("avx2", "avx2"), ("avx", "avx"),
              ("sve", "sve"), ("neon", "asimd"))


def cpu_isa(cpuinfo: str | None = None) -> str:
    """The widest vector extension in /proc/cpuinfo's flags ("avx512", "avx2", "neon", …), or the
    machine name where the CPU lists none of them."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return next((name for name, flag in _ISA_FLAGS if flag in flags), platform.machine())


def print_result(result: dict) -> None:
    """The bench's last line: its result with `isa` added."""
    print(json.dumps({**result, "isa": cpu_isa()}), flush=True)


def use_device(device: str, threads: int) -> None:
    """Run this process (and its children) on `threads` CPUs and JAX on `device`. Call it before
    JAX or torch starts a thread pool or a backend: XLA:CPU sizes its pool by the CPUs it may
    run on, and JAX picks its platform once."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    os.environ["JAX_PLATFORMS"] = device
    if "jax" in sys.modules:                 # imported already: the variable was read
        sys.modules["jax"].config.update("jax_platforms", device)
