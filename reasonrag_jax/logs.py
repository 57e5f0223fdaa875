"""Status lines through `logging`: stderr, one short format, only the lead process of a pod.

Results (paths, tables, resolved configs) go to stdout with `print`; everything that says what is
happening goes through `get_logger(__name__)`, so a pod's workers do not repeat each line and
`2>/dev/null` keeps a script's stdout clean. The package logger gets its stderr handler on first
use, so status lines show whether the package runs from the CLI, a bench script or a test
worker; the CLI then calls `setup` once it knows whether this process leads.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

ROOT = "reasonrag_jax"


def _package_logger() -> logging.Logger:
    logger = logging.getLogger(ROOT)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(module)s] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def get_logger(name: str) -> logging.Logger:
    """The package logger's child for a module (`get_logger(__name__)`)."""
    _package_logger()
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")


def setup(lead: bool, level: int = logging.INFO) -> None:
    """Processes other than the lead log warnings only (call after distributed init)."""
    _package_logger().setLevel(level if lead else logging.WARNING)


def tensorboard_writer(log_dir: Path) -> Any:
    """A TensorBoard writer, or None where tensorboardX is missing (the JSON outputs beside it
    hold the same numbers)."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(log_dir))


def write_scalars(log_dir: Path, scalars: dict[str, Any], step: int = 0) -> None:
    """Every number in `scalars` (nested keys joined by "/") as a TensorBoard scalar: the
    summaries of `eval` and `generate` beside training's curves."""
    writer = tensorboard_writer(log_dir)
    if writer is None:
        return

    def leaves(prefix: str, value: Any):
        if isinstance(value, dict):
            for k, v in value.items():
                yield from leaves(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield prefix, value

    for tag, value in leaves("", scalars):
        writer.add_scalar(tag, value, step)
    writer.close()
