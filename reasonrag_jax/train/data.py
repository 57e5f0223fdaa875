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
...}`; `prompt_tokens` turns either into ids. Each completion is its text plus EOS.

Rows are prefix trees. An example (a pair, or an SFT record) is its prompt, then its
completions — a pair's chosen, then its rejected — each attending to the prompt and to itself
only, at the positions it would have after the prompt alone. By default a row holds one example,
so one pass over the prompt scores both sides of a pair (`dpo.sequence_logps`). With
`train.pack_length`, examples sorted by prompt fill rows of up to that many tokens, and prompts
that share a prefix share its tokens: an agent's step records repeat the system prompt, the
question and the history so far, and the 382 SFT records of the ablation preset (101k tokens
one per row) take 64.5k in rows of 512 (50k if each question's steps shared one tree). Every
token carries its position in its own example, the index of the token it is predicted from
(its parent in the tree), the end of its subtree (token i attends to j ≤ i exactly when
i < `ends[j]`) and the completion slot it belongs to, so the model computes each example as if
it were alone.

Truncation rule (stated once, applied per example, counted, never dropped): when prompt +
longest completion exceeds `max_length`, the prompt keeps its LAST max(max_length − longest
completion, max_length // 2) tokens (the question and the generation prompt sit at its end), and
each completion then keeps its FIRST max_length − kept-prompt tokens. Chosen and rejected of a
pair therefore always share the same prompt tokens, and each side is what TRL would train on
with the same `max_length`; the packed row (prompt + both) may be longer than `max_length`.
"""
from __future__ import annotations

import dataclasses
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


Example = tuple[list[int], list[list[int]]]   # (prompt ids, completion ids each ending in EOS)
ROW_FIELDS = ("tokens", "positions", "sources", "ends", "slots")


@dataclass
class Encoded:
    """Right-padded rows, each a flattened prefix tree of its examples (module docstring)."""
    tokens: np.ndarray       # int32 [N, T]
    positions: np.ndarray    # int32 [N, T]: position in the token's own example
    sources: np.ndarray      # int32 [N, T]: the token it is predicted from (itself at a root / pad)
    ends: np.ndarray         # int32 [N, T]: one past its subtree
    slots: np.ndarray        # int32 [N, T]: k on the row's k-th completion (incl. EOS), else -1
    lengths: np.ndarray      # int32 [N] tokens in the row (padding excluded)
    truncated: int           # examples (pairs or records) shortened by the truncation rule
    num_slots: int           # completion slots per row: completions per example (2 for pairs:
                             # chosen, rejected; 1 for SFT) × the most examples in one row

    def take(self, rows: np.ndarray) -> Encoded:
        """The rows at `rows`, in that order."""
        return dataclasses.replace(self, lengths=self.lengths[rows],
                                   **{f: getattr(self, f)[rows] for f in ROW_FIELDS})


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
        if rec.get("prompt") == "":        # a plain TRL prompt is used as written: nothing to
            raise InputError(f"{where(path, line, 'prompt')} is empty")  # predict a first token
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


def tokenize(tokenizer: Any, groups: Sequence[tuple[dict[str, Any], Sequence[str]]],
             max_length: int) -> tuple[list[Example], int]:
    """(record, completions sharing its prompt) → (examples cut by the truncation rule, how many
    were cut)."""
    if max_length < 2:
        raise InputError(f"train.max_length must be at least 2, got {max_length}")
    eos = tokenizer.eos_token_id
    examples, truncated = [], 0
    for rec, completions in groups:
        p = prompt_tokens(tokenizer, rec)
        cs = [tokenizer(c, add_special_tokens=False)["input_ids"] + [eos] for c in completions]
        p, cs, cut = truncate(p, cs, max_length)
        truncated += cut
        examples.append((p, cs))
    return examples, truncated


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    mismatch = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(mismatch[0]) if len(mismatch) else n


def pack(examples: Sequence[Example], pack_length: int) -> list[list[int]]:
    """Example indices per row. 0: one example per row, in order. Otherwise the examples sorted
    by prompt fill rows greedily while the row's prefix tree stays within `pack_length` tokens
    (an example longer than that gets a row of its own). Depends on the examples alone, so a
    resumed run packs the same rows."""
    if pack_length <= 0:
        return [[i] for i in range(len(examples))]
    order = sorted(range(len(examples)), key=lambda i: examples[i][0])
    rows: list[list[int]] = []
    size = 0
    for i in order:
        prompt, completions = examples[i]
        extra = len(prompt) + sum(map(len, completions))
        if rows:    # sorted: the longest prefix this prompt shares is with the row's last one
            extra -= _common(examples[rows[-1][-1]][0], prompt)
        if not rows or size + extra > pack_length:
            rows.append([])
            extra, size = len(prompt) + sum(map(len, completions)), 0
        rows[-1].append(i)
        size += extra
    return rows


def _row(examples: Sequence[Example]) -> dict[str, list[int]]:
    """One row's fields: the prefix tree of the examples' prompts, depth first, each example's
    completions right after the last token of its prompt."""
    row: dict[str, list[int]] = {f: [] for f in ROW_FIELDS}
    path: list[int] = []             # row indices of the previous prompt's tokens
    previous: list[int] = []
    slot = 0

    def add(token: int, position: int, source: int, k: int) -> int:
        at = len(row["tokens"])
        for f, v in zip(ROW_FIELDS, (token, position, source, 0, k)):
            row[f].append(v)
        return at

    for prompt, completions in examples:
        keep = _common(previous, prompt)
        path = path[:keep]
        for t in prompt[keep:]:
            path.append(add(t, len(path), path[-1] if path else len(row["tokens"]), -1))
        for c in completions:
            for j, t in enumerate(c):
                add(t, len(prompt) + j, path[-1] if j == 0 else len(row["tokens"]) - 1, slot)
            slot += 1
        previous = prompt
    # Depth first, a token's subtree ends at the first later token whose parent is outside it.
    open_path: list[int] = []
    for j, parent in enumerate(row["sources"]):
        while open_path and open_path[-1] != parent:
            row["ends"][open_path.pop()] = j
        open_path.append(j)
    for i in open_path:
        row["ends"][i] = len(row["tokens"])
    return row


def encode_examples(examples: Sequence[Example], pad_id: int, pack_length: int = 0,
                    truncated: int = 0) -> Encoded:
    """Examples → padded rows (`pack`, one example per row by default)."""
    groups = pack(examples, pack_length)
    rows = [_row([examples[i] for i in g]) for g in groups]
    completions = len(examples[0][1]) if examples else 1
    lengths = np.array([len(r["tokens"]) for r in rows], np.int32)
    width = int(lengths.max()) if len(rows) else 1
    fields = {f: np.zeros((len(rows), width), np.int32) for f in ROW_FIELDS}
    fields["tokens"][:] = pad_id
    for i, r in enumerate(rows):
        for f in ROW_FIELDS:
            fields[f][i, :len(r[f])] = r[f]
    _pad_tail(fields, lengths)
    return Encoded(**fields, lengths=lengths, truncated=truncated,
                   num_slots=completions * max(map(len, groups), default=1))


def _pad_tail(fields: dict[str, np.ndarray], lengths: np.ndarray) -> None:
    """Padding after each row's tokens: no completion slot, and it attends only to itself."""
    idx = np.arange(fields["tokens"].shape[1])
    pad = idx[None, :] >= lengths[:, None]
    fields["positions"][pad] = 0
    fields["sources"][:] = np.where(pad, idx, fields["sources"])
    fields["ends"][:] = np.where(pad, idx + 1, fields["ends"])
    fields["slots"][pad] = -1


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pair_examples(tokenizer: Any, pairs: list[dict[str, Any]], max_length: int
                  ) -> tuple[list[Example], int]:
    """Pairs from `read_pairs` → (examples: prompt, then chosen and rejected; how many cut)."""
    return tokenize(tokenizer, [(p, (p["chosen"], p["rejected"])) for p in pairs], max_length)


def sft_examples(tokenizer: Any, records: list[dict[str, Any]], max_length: int
                 ) -> tuple[list[Example], int]:
    """Records from `read_sft` → (examples: prompt, then the completion; how many cut)."""
    return tokenize(tokenizer, [(r, (r.get("output", r.get("completion")),)) for r in records],
                    max_length)


def encode_pairs(tokenizer: Any, pairs: list[dict[str, Any]], max_length: int) -> Encoded:
    examples, cut = pair_examples(tokenizer, pairs, max_length)
    return encode_examples(examples, pad_id(tokenizer), truncated=cut)


def encode_sft(tokenizer: Any, records: list[dict[str, Any]], max_length: int) -> Encoded:
    examples, cut = sft_examples(tokenizer, records, max_length)
    return encode_examples(examples, pad_id(tokenizer), truncated=cut)


def batch_arrays(data: Encoded, rows: np.ndarray, buckets: Sequence[int]) -> dict[str, np.ndarray]:
    """The row fields of `rows`, right-padded to the length bucket of their longest row."""
    t = bucket(int(data.lengths[rows].max()), buckets)
    width = min(t, data.tokens.shape[1])
    out = {f: np.zeros((len(rows), t), np.int32) for f in ROW_FIELDS}
    for f in ROW_FIELDS:
        out[f][:, :width] = getattr(data, f)[rows, :width]
    _pad_tail(out, data.lengths[rows])
    return out
