"""What every bench reports beside its numbers: the CPU's vector ISA, since the targets differ
by it (torch has AVX-512 kernels XLA:CPU lacks), and the one JSON line last."""
from __future__ import annotations

import json
import platform
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
