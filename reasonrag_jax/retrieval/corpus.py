"""FlashRAG corpus reading: `{"id", "contents": "Title\\ntext"}` per line, streamed."""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from reasonrag_jax.io import InputError, read_jsonl, where

CORPUS_SCHEMA = {"id": str, "contents": str}
T = TypeVar("T")


def iter_corpus(path: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """(id, contents) per passage without holding the corpus; bad lines name file:line:field."""
    for lineno, obj in read_jsonl(path, CORPUS_SCHEMA, unique="id"):
        if not obj["contents"].strip():
            raise InputError(f"{where(path, lineno, 'contents')} is empty")
        yield obj["id"], obj["contents"]


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
