"""Training data: preference pairs and SFT records → chat-templated, prompt-masked token arrays.

Formats read as they are:
- RAG-ProGuide / LLaMA-Factory: `instruction` (system, optional), `input` (user), then `chosen`
  + `rejected` (pairs) or `output` (SFT); the prompt is the chat template of (system, user).
  An SFT record may add `output_prefix`: the start of the response that the runner writes (a
  guided scaffold), so it is prompt — no loss — and `output` is what the model continues with.
- TRL preference: `prompt` + `chosen` + `rejected`, either plain strings (the prompt is used as
  written) or conversational (`prompt` a message list, templated; completions a one-message
  assistant list).
- TRL SFT: `messages` (the last, assistant, message is the completion) or `prompt` + `completion`.
A record becomes `{"instruction", "input", ...}` (RAG-ProGuide) or `{"prompt": str | messages,
...}`; `prompt_tokens` turns either into ids. Each completion is its text plus EOS. One row per
example: the prompt, then its completions — a pair's chosen, then its rejected — marked by
`segments` (0 prompt, k the k-th completion, -1 padding), so one pass over the prompt scores
both sides (`dpo.sequence_logps`).

Truncation rule (stated once, applied per example, counted, never dropped): when prompt +
longest completion exceeds `max_length`, the prompt keeps its LAST max(max_length − longest
completion, max_length // 2) tokens (the question and the generation prompt sit at its end), and
each completion then keeps its FIRST max_length − kept-prompt tokens. Chosen and rejected of a
pair therefore always share the same prompt tokens, and each side is what TRL would train on
with the same `max_length`; the packed row (prompt + both) may be longer than `max_length`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reasonrag_jax.config import bucket
from reasonrag_jax.io import InputError, read_jsonl, where

PAIR_FIELDS = {"instruction": False, "input": True, "chosen": True, "rejected": True}
SFT_FIELDS = {"instruction": False, "input": True, "output": True, "output_prefix": False}
Messages = list[dict[str, str]]


COMPLETIONS = {"dpo": 2, "sft": 1}   # completions packed after each prompt, per objective


@dataclass
class Encoded:
    """Right-padded token rows, one per example: its prompt, then its completions."""
    tokens: np.ndarray       # int32 [N, T]   (T = longest row)
    segments: np.ndarray     # int32 [N, T]: 0 prompt, k on the k-th completion (incl. EOS), -1 pad
    lengths: np.ndarray      # int32 [N]
    truncated: int           # examples (pairs or records) shortened by the truncation rule
    completions: int         # completions per row: 2 for pairs (chosen, rejected), 1 for SFT


def _records(path: Path) -> list[tuple[int, Any]]:
    """jsonl (ours) or one JSON list (the published RAG_ProGuide.json); (line or item no, obj)."""
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if not head.startswith(b"["):
        return list(read_jsonl(path))
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: invalid JSON ({e})") from None
    if not rows:
        raise InputError(f"{path}: file is empty")
    return [(i + 1, r) for i, r in enumerate(rows)]


def _str(path: Path, line: int, name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InputError(f"{where(path, line, name)} should be str, got {type(value).__name__}")
    return value


def _messages(path: Path, line: int, name: str, value: Any) -> Messages:
    """A chat: a non-empty list of `{"role": str, "content": str}`."""
    if not isinstance(value, list) or not value:
        raise InputError(f"{where(path, line, name)} should be a string or a non-empty list of "
                         f"messages, got {type(value).__name__}")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise InputError(f"{where(path, line, f'{name}[{i}]')} should be "
                             '{"role": str, "content": str}')
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _prompt(path: Path, line: int, name: str, value: Any) -> str | Messages:
    return value if isinstance(value, str) else _messages(path, line, name, value)


def _completion(path: Path, line: int, name: str, value: Any) -> str:
    """A completion: a string, or TRL's conversational `[{"role": "assistant", ...}]`."""
    if isinstance(value, str):
        return value
    messages = _messages(path, line, name, value)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise InputError(f"{where(path, line, name)} should be one assistant message")
    return messages[0]["content"]


def _rag_proguide(path: Path, line: int, obj: dict[str, Any], fields: dict[str, bool]
                  ) -> dict[str, str]:
    rec = {}
    for name, required in fields.items():
        if name not in obj and required:
            raise InputError(f"{where(path, line, name)} is missing")
        rec[name] = _str(path, line, name, obj.get(name, ""))
    return rec


def _trl(path: Path, line: int, obj: dict[str, Any], completions: tuple[str, ...]
         ) -> dict[str, Any]:
    rec: dict[str, Any] = {"prompt": _prompt(path, line, "prompt", obj["prompt"])}
    for name in completions:
        if name not in obj:
            raise InputError(f"{where(path, line, name)} is missing")
        rec[name] = _completion(path, line, name, obj[name])
    return rec


def _read(path: str | os.PathLike, fields: dict[str, bool], distinct: tuple[str, ...],
          trl: tuple[str, ...]) -> list[dict[str, Any]]:
    """Every record, in RAG-ProGuide's fields (`instruction`/`input`) or TRL's (`prompt` +
    the `trl` completion fields, or SFT `messages`), checked and line-numbered."""
    path = Path(path)
    out = []
    for line, obj in _records(path):
        if not isinstance(obj, dict):
            raise InputError(f"{where(path, line)}: expected a JSON object, "
                             f"got {type(obj).__name__}")
        if "prompt" in obj and not {"instruction", "input"} & set(obj):
            rec = _trl(path, line, obj, trl)
        elif "messages" in obj and trl == ("completion",):
            messages = _messages(path, line, "messages", obj["messages"])
            if len(messages) < 2 or messages[-1]["role"] != "assistant":
                raise InputError(f"{where(path, line, 'messages')} should end with an "
                                 "assistant message after the prompt")
            rec = {"prompt": messages[:-1], "completion": messages[-1]["content"]}
        else:
            rec = _rag_proguide(path, line, obj, fields)
        names = distinct if "input" in rec else trl
        for name in names:
            if not rec[name].strip():
                raise InputError(f"{where(path, line, name)} is empty")
        if len(names) == 2 and rec[names[0]] == rec[names[1]]:
            raise InputError(f"{where(path, line, names[1])} is identical to '{names[0]}'")
        out.append(rec)
    return out


def read_pairs(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Preference pairs: RAG-ProGuide `instruction` (optional), `input`, `chosen`, `rejected`;
    or TRL `prompt`, `chosen`, `rejected` (plain or conversational)."""
    return _read(path, PAIR_FIELDS, ("chosen", "rejected"), ("chosen", "rejected"))


def read_sft(path: str | os.PathLike) -> list[dict[str, Any]]:
    """SFT records: `{"instruction", "input", "output"}` (LLaMA-Factory style), TRL `messages`,
    or TRL `prompt` + `completion`."""
    return _read(path, SFT_FIELDS, ("output",), ("completion",))


def prompt_ids(tokenizer: Any, instruction: str, user: str, prefix: str = "") -> list[int]:
    """Token ids of chat_template([system=instruction, user=input], add_generation_prompt),
    then `prefix` (the start of the response that the runner writes), as one text — the way the
    sampler tokenizes a prompt and its scaffold."""
    messages = ([{"role": "system", "content": instruction}] if instruction else []) + [
        {"role": "user", "content": user}]
    return chat_ids(tokenizer, messages, prefix)


def chat_ids(tokenizer: Any, messages: Messages, prefix: str = "") -> list[int]:
    """Token ids of chat_template(messages, add_generation_prompt) + `prefix`."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text + prefix, add_special_tokens=False)["input_ids"]


def prompt_tokens(tokenizer: Any, rec: dict[str, Any]) -> list[int]:
    """The prompt of a record from `read_pairs` / `read_sft`: templated for RAG-ProGuide fields
    and message lists, as written for a plain TRL prompt string."""
    if "input" in rec:
        return prompt_ids(tokenizer, rec.get("instruction", ""), rec["input"],
                          rec.get("output_prefix", ""))
    if isinstance(rec["prompt"], str):
        return tokenizer(rec["prompt"], add_special_tokens=False)["input_ids"]
    return chat_ids(tokenizer, rec["prompt"])


def truncate(prompt: list[int], completions: list[list[int]], max_length: int
             ) -> tuple[list[int], list[list[int]], bool]:
    """The module docstring's rule → (prompt, completions, whether anything was cut)."""
    longest = max(len(c) for c in completions)
    if len(prompt) + longest <= max_length:
        return prompt, completions, False
    keep = min(len(prompt), max(max_length - longest, max_length // 2))
    prompt = prompt[len(prompt) - keep:]
    return prompt, [c[: max_length - keep] for c in completions], True


def encode(tokenizer: Any, groups: Sequence[tuple[dict[str, Any], Sequence[str]]], max_length: int
           ) -> Encoded:
    """(record, completions sharing its prompt) → one padded row: prompt + every completion."""
    if max_length < 2:
        raise InputError(f"train.max_length must be at least 2, got {max_length}")
    eos = tokenizer.eos_token_id
    rows, marks, truncated = [], [], 0
    for rec, completions in groups:
        p = prompt_tokens(tokenizer, rec)
        cs = [tokenizer(c, add_special_tokens=False)["input_ids"] + [eos] for c in completions]
        p, cs, cut = truncate(p, cs, max_length)
        truncated += cut
        rows.append(p + [t for c in cs for t in c])
        marks.append([0] * len(p) + [k + 1 for k, c in enumerate(cs) for _ in c])
    lengths = np.array([len(r) for r in rows], np.int32)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    tokens = np.full((len(rows), int(lengths.max())), pad, np.int32)
    segments = np.full(tokens.shape, -1, np.int32)
    for i, (r, m) in enumerate(zip(rows, marks)):
        tokens[i, :len(r)] = r
        segments[i, :len(m)] = m
    return Encoded(tokens, segments, lengths, truncated, len(groups[0][1]) if groups else 1)


def encode_pairs(tokenizer: Any, pairs: list[dict[str, Any]], max_length: int) -> Encoded:
    return encode(tokenizer, [(p, (p["chosen"], p["rejected"])) for p in pairs], max_length)


def encode_sft(tokenizer: Any, records: list[dict[str, Any]], max_length: int) -> Encoded:
    return encode(tokenizer, [(r, (r.get("output", r.get("completion")),)) for r in records],
                  max_length)


def batch_arrays(data: Encoded, rows: np.ndarray, buckets: Sequence[int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and segments of `rows`, right-padded to the length bucket of their longest row."""
    t = bucket(int(data.lengths[rows].max()), buckets)
    width = min(t, data.tokens.shape[1])
    tokens = np.zeros((len(rows), t), np.int32)
    segments = np.full((len(rows), t), -1, np.int32)
    tokens[:, :width] = data.tokens[rows, :width]
    segments[:, :width] = data.segments[rows, :width]
    return tokens, segments
