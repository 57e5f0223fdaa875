"""Status lines through `logging`: stderr, one short format, only the lead process of a pod.

Results (paths, tables, resolved configs) go to stdout with `print`; everything that says what is
happening goes through `get_logger(__name__)`, so a pod's workers do not repeat each line and
`2>/dev/null` keeps a script's stdout clean.
"""
from __future__ import annotations

import logging
import sys

ROOT = "reasonrag_jax"


def get_logger(name: str) -> logging.Logger:
    """The package logger's child for a module (`get_logger(__name__)`)."""
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")


def setup(lead: bool, level: int = logging.INFO) -> None:
    """One stderr handler on the package logger; processes other than the lead log warnings only."""
    logger = logging.getLogger(ROOT)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(module)s] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level if lead else logging.WARNING)
    logger.propagate = False
