"""Training data: preference pairs and SFT records → chat-templated, prompt-masked token arrays.

A pair is (prompt, chosen, rejected) where prompt = chat template of (system = instruction,
user = input) with the generation prompt, and each completion is its text plus EOS. Chosen and
rejected rows of a batch go through the model in one forward pass. Over-long examples are cut
by one stated rule — drop prompt tokens from the left, then completion tokens from the right —
and counted, never dropped.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reasonrag_jax.io import InputError, read_jsonl, where

PAIR_SCHEMA = {"chosen": str, "rejected": str}
SFT_SCHEMA = {"output": str}


@dataclass
class Encoded:
    """Right-padded token rows; rows 2i / 2i+1 are pair i's chosen / rejected (DPO)."""
    tokens: np.ndarray       # int32 [N, T]
    loss_mask: np.ndarray    # float32 [N, T]: 1 on completion tokens (incl. EOS)
    lengths: np.ndarray      # int32 [N]
    truncated: int           # examples shortened by the truncation rule


def _records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """jsonl (ours) or one JSON list (the published RAG_ProGuide.json)."""
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if head.startswith(b"["):
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: invalid JSON ({e})") from None
        if not rows:
            raise InputError(f"{path}: file is empty")
        return [(i + 1, r) for i, r in enumerate(rows)]
    return list(read_jsonl(path))


def _text(path: Path, line: int, obj: Any, field: str, required: bool = True) -> str:
    if not isinstance(obj, dict):
        raise InputError(f"{where(path, line)}: expected a JSON object")
    value = obj.get(field, None if required else "")
    if value is None and required:
        raise InputError(f"{where(path, line, field)} is missing")
    if not isinstance(value, str):
        raise InputError(f"{where(path, line, field)} should be str, got {type(value).__name__}")
    return value


def read_pairs(path: str | os.PathLike) -> list[dict[str, str]]:
    """Preference pairs with `instruction`, `input`, `chosen`, `rejected` (RAG-ProGuide fields)."""
    path = Path(path)
    out = []
    for line, obj in _records(path):
        pair = {f: _text(path, line, obj, f, f in PAIR_SCHEMA)
                for f in ("instruction", "input", "chosen", "rejected")}
        for f in ("chosen", "rejected"):
            if not pair[f].strip():
                raise InputError(f"{where(path, line, f)} is empty")
        if pair["chosen"] == pair["rejected"]:
            raise InputError(f"{where(path, line, 'rejected')} is identical to 'chosen'")
        out.append(pair)
    return out


def read_sft(path: str | os.PathLike) -> list[dict[str, str]]:
    """SFT records `{"instruction", "input", "output"}` (LLaMA-Factory style)."""
    path = Path(path)
    out = []
    for line, obj in _records(path):
        rec = {f: _text(path, line, obj, f, f in SFT_SCHEMA) for f in ("instruction", "input", "output")}
        if not rec["output"].strip():
            raise InputError(f"{where(path, line, 'output')} is empty")
        out.append(rec)
    return out


def prompt_ids(tokenizer: Any, instruction: str, user: str) -> list[int]:
    messages = ([{"role": "system", "content": instruction}] if instruction else []) + [
        {"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode(tokenizer: Any, examples: list[tuple[str, str, str]], max_length: int) -> Encoded:
    """(instruction, input, completion) triples → padded rows (length = longest, ≤ max_length)."""
    eos = tokenizer.eos_token_id
    rows, masks, truncated = [], [], 0
    for instruction, user, completion in examples:
        p = prompt_ids(tokenizer, instruction, user)
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos]
        if len(p) + len(c) > max_length:
            truncated += 1
            c = c[: max_length - 1]
            p = p[len(p) - (max_length - len(c)):]
        rows.append(p + c)
        masks.append([0.0] * len(p) + [1.0] * len(c))
    t = max(len(r) for r in rows)
    tokens = np.full((len(rows), t), tokenizer.pad_token_id or 0, np.int32)
    loss_mask = np.zeros((len(rows), t), np.float32)
    for i, (r, m) in enumerate(zip(rows, masks)):
        tokens[i, :len(r)] = r
        loss_mask[i, :len(m)] = m
    return Encoded(tokens, loss_mask, np.array([len(r) for r in rows], np.int32), truncated)


def encode_pairs(tokenizer: Any, pairs: list[dict[str, str]], max_length: int) -> Encoded:
    triples = [(p["instruction"], p["input"], p[side]) for p in pairs for side in ("chosen", "rejected")]
    return encode(tokenizer, triples, max_length)


def encode_sft(tokenizer: Any, records: list[dict[str, str]], max_length: int) -> Encoded:
    return encode(tokenizer, [(r["instruction"], r["input"], r["output"]) for r in records], max_length)


def bucket_length(n: int, buckets: tuple[int, ...]) -> int:
    return next((b for b in buckets if b >= n), buckets[-1] if buckets else n)
