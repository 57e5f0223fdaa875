"""TFDS builders for local files (`manual_dir`): FlashRAG QA sets and the published RAG-ProGuide.

Each builder lives in its own package, as TFDS expects, and is imported only on use, so
`reasonrag_jax` does not need tensorflow_datasets. They work without TensorFlow when built with
`file_format="array_record"` and read with `as_data_source()`; `prepare` does exactly that.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from reasonrag_jax.io import InputError

BUILDERS = ("flashrag_qa", "rag_proguide")


def prepare(name: str, manual_dir: str | os.PathLike, data_dir: str | os.PathLike,
            config: str | None = None) -> dict[str, Any]:
    """Build dataset `name` from the files in `manual_dir` (once) → {split: random-access source}.

    `config` names the build (e.g. "hotpotqa"), so several QA sets can share one `data_dir`.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown TFDS builder {name!r}; choose from {', '.join(BUILDERS)}")
    if not Path(manual_dir).is_dir():
        raise InputError(f"{manual_dir}: manual_dir is not a directory")
    import tensorflow_datasets as tfds

    builder_cls = importlib.import_module(f"{__name__}.{name}").Builder
    kwargs = {"config": tfds.core.BuilderConfig(name=config)} if config else {}
    builder = builder_cls(data_dir=os.fspath(data_dir), file_format="array_record", **kwargs)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
    return builder.as_data_source()
