"""FlashRAG corpus reading, streamed: `{"id", "contents": "Title\\ntext"}` per line, or the
`{"id", "title", "text"}` lines FlashRAG's own corpus scripts write (int ids allowed).

Ids are strings from here on, as FlashRAG reads them; `title` + "\\n" + `text` becomes contents.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from reasonrag_jax.io import InputError, read_jsonl, where

T = TypeVar("T")


def _text_field(path: str | os.PathLike, lineno: int, obj: dict[str, Any], name: str) -> str:
    value = obj[name]
    if not isinstance(value, str):
        raise InputError(f"{where(path, lineno, name)} should be str, got {type(value).__name__}")
    return value


def _contents(path: str | os.PathLike, lineno: int, obj: dict[str, Any]) -> str:
    """`contents`, or `title` + newline + `text`; a line with neither is named."""
    if "contents" in obj:
        return _text_field(path, lineno, obj, "contents")
    if "text" not in obj:
        raise InputError(f"{where(path, lineno, 'contents')} is missing (nor is there a 'text')")
    text = _text_field(path, lineno, obj, "text")
    title = _text_field(path, lineno, obj, "title") if "title" in obj else ""
    return f"{title}\n{text}" if title else text


def iter_corpus(path: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """(id, contents) per passage without holding the corpus; bad lines name file:line:field."""
    seen: set[str] = set()
    for lineno, obj in read_jsonl(path, {"id": (str, int)}):
        contents = _contents(path, lineno, obj)
        if not contents.strip():
            raise InputError(f"{where(path, lineno, 'contents')} is empty")
        doc_id = str(obj["id"])          # 7 and "7" are the same passage, as in FlashRAG
        if doc_id in seen:
            raise InputError(f"{where(path, lineno, 'id')}: duplicate value {doc_id!r}")
        seen.add(doc_id)
        yield doc_id, contents


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
