"""FlashRAG QA datasets: `{"id", "question", "golden_answers": [...], "metadata": {...}}` per line.

Keeping FlashRAG's format means the benchmark files users already have (NQ, HotpotQA, 2Wiki,
MuSiQue, …) load as they are; our synthetic data is written in the same format.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from reasonrag_jax.io import InputError, read_jsonl, where, write_jsonl_atomic

SCHEMA = {"id": str, "question": str, "golden_answers": list}


@dataclass(frozen=True)
class QAExample:
    """One question; `metadata` is free-form (ours: hops, type, gold_chain) and not compared."""
    id: str
    question: str
    golden_answers: tuple[str, ...]
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "question": self.question,
                "golden_answers": list(self.golden_answers), "metadata": self.metadata}


def _example(path: str | os.PathLike, lineno: int, obj: dict[str, Any]) -> QAExample:
    """Check one parsed line beyond its field types; errors name file:line: field."""
    if not obj["id"].strip():
        raise InputError(f"{where(path, lineno, 'id')} is empty")
    if not obj["question"].strip():
        raise InputError(f"{where(path, lineno, 'question')} is empty")
    answers = obj["golden_answers"]
    if not answers:
        raise InputError(f"{where(path, lineno, 'golden_answers')} should be a non-empty list")
    for i, a in enumerate(answers):
        if not isinstance(a, str) or not a.strip():
            got = repr(a) if isinstance(a, str) else type(a).__name__
            raise InputError(f"{where(path, lineno, f'golden_answers[{i}]')} should be a "
                             f"non-empty string, got {got}")
    metadata = obj.get("metadata")
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict):
        raise InputError(f"{where(path, lineno, 'metadata')} should be an object, "
                         f"got {type(metadata).__name__}")
    return QAExample(obj["id"], obj["question"], tuple(answers), metadata)


def read_qa(path: str | os.PathLike) -> list[QAExample]:
    """All examples of a FlashRAG QA file, in file order; ids must be unique.

    Every problem (bad JSON or UTF-8, a missing or mistyped field, an empty answer, a repeated
    id, an empty file) raises one `InputError` line naming file:line: field.
    """
    return [_example(path, lineno, obj) for lineno, obj in read_jsonl(path, SCHEMA, unique="id")]


def write_qa(path: str | os.PathLike, examples: Iterable[QAExample]) -> None:
    """Write a whole QA file atomically (a reader never sees half of it)."""
    write_jsonl_atomic(path, [ex.to_json() for ex in examples])
