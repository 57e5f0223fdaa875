"""Skips for missing installs that CI must not hide: under CI (`CI=true`, as GitHub Actions and
most runners set it) a missing dependency fails the test, since CI installs every extra."""
import os

import pytest


def missing(what: str) -> None:
    """Skip a test whose `what` is not installed here; fail it under CI."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{what} is not installed, and CI installs it", pytrace=False)
    pytest.skip(f"{what} not installed")
