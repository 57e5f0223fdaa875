"""FlashRAG QA datasets: `{"id", "question", "golden_answers": [...], "metadata": {...}}` per line."""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from reasonrag_jax.io import InputError, read_jsonl, where, write_jsonl_atomic

SCHEMA = {"id": str, "question": str, "golden_answers": list}


@dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    golden_answers: tuple[str, ...]
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "question": self.question,
                "golden_answers": list(self.golden_answers), "metadata": self.metadata}


def read_qa(path: str | os.PathLike) -> list[QAExample]:
    """All examples of a FlashRAG QA file; every problem is one line naming file:line:field."""
    out = []
    for lineno, obj in read_jsonl(path, SCHEMA, unique="id"):
        answers = obj["golden_answers"]
        if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise InputError(f"{where(path, lineno, 'golden_answers')} should be a non-empty "
                             "list of non-empty strings")
        if not obj["question"].strip():
            raise InputError(f"{where(path, lineno, 'question')} is empty")
        metadata = obj.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise InputError(f"{where(path, lineno, 'metadata')} should be an object")
        out.append(QAExample(obj["id"], obj["question"], tuple(answers), metadata))
    return out


def write_qa(path: str | os.PathLike, examples: Iterable[QAExample]) -> None:
    """Write a whole QA file atomically (a reader never sees half of it)."""
    write_jsonl_atomic(path, [ex.to_json() for ex in examples])
