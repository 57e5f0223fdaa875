"""`rag_proguide`: the published RAG_ProGuide.json (ReasonRAG's preference pairs), one split.

The file is one JSON list of objects with the RAG-ProGuide fields: `instruction` (system
prompt), `input` (user prompt), `prompt`, `chosen`, `rejected`, `chosen_action_type` /
`rejected_action_type` (`Query Generation`, `Evidence Extraction`, `Answer Generation`),
`chosen_content`, `rejected_content`, `layer` (tree depth). `input`, `chosen` and `rejected`
are required; a missing optional text is "" and a missing layer -1. Errors name the item
(1-based) and field, like every reader in the project.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from reasonrag_jax.io import InputError, where

FILENAME = "RAG_ProGuide.json"
REQUIRED = ("input", "chosen", "rejected")
OPTIONAL = ("instruction", "prompt", "chosen_action_type", "rejected_action_type",
            "chosen_content", "rejected_content")


def _pair(path: Path, item: int, obj: Any) -> dict[str, Any]:
    """One checked record; every text field present, `layer` an int."""
    if not isinstance(obj, dict):
        raise InputError(f"{where(path, item)}: expected a JSON object, got {type(obj).__name__}")
    out: dict[str, Any] = {}
    for name in REQUIRED + OPTIONAL:
        if name not in obj and name in REQUIRED:
            raise InputError(f"{where(path, item, name)} is missing")
        value = obj.get(name, "")
        if not isinstance(value, str):
            raise InputError(f"{where(path, item, name)} should be str, got {type(value).__name__}")
        out[name] = value
    for name in REQUIRED[1:]:
        if not out[name].strip():
            raise InputError(f"{where(path, item, name)} is empty")
    layer = obj.get("layer", -1)
    if isinstance(layer, str) and layer.strip().lstrip("-").isdigit():
        layer = int(layer)
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise InputError(f"{where(path, item, 'layer')} should be an integer, got {layer!r}")
    out["layer"] = layer
    return out


class Builder(tfds.core.GeneratorBasedBuilder):
    """RAG-ProGuide preference pairs from a local copy of the published file."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put the published `{FILENAME}` in `manual_dir`."

    def _info(self) -> tfds.core.DatasetInfo:
        text = {name: tfds.features.Text() for name in REQUIRED + OPTIONAL}
        return self.dataset_info_from_configs(
            description="Process-level preference pairs for agentic RAG (ReasonRAG).",
            features=tfds.features.FeaturesDict(
                {**text, "layer": tfds.features.Scalar(dtype=np.int32, doc="tree depth")}),
            homepage="https://arxiv.org/abs/2505.14069",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager
                          ) -> dict[str, Iterator[tuple[int, dict[str, Any]]]]:
        return {"train": self._generate_examples(
            Path(os.fspath(dl_manager.manual_dir)) / FILENAME)}

    def _generate_examples(self, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
        if not path.is_file():
            raise InputError(f"{path}: file not found")
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: invalid JSON ({e})") from None
        if not isinstance(rows, list) or not rows:
            raise InputError(f"{path}: expected a non-empty JSON list of pairs")
        for item, obj in enumerate(rows, start=1):
            yield item, _pair(path, item, obj)
