"""Answer and retrieval metrics with FlashRAG's conventions, so our numbers compare to papers.

Everything is scored on SQuAD-normalised text (lower case, no punctuation, no articles a/an/the,
single spaces), and every answer metric is the maximum over the gold answers.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)
# FlashRAG: a yes / no / noanswer answer earns F1 only when it matches exactly, so "yes" gets no
# partial credit against "no" through shared tokens elsewhere in the prediction.
_SPECIAL = frozenset({"yes", "no", "noanswer"})


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower, drop punctuation, drop articles, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(pred: str, golds: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals some normalised gold answer."""
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(g) for g in golds))


def _token_f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred), normalize_answer(gold)
    if (p in _SPECIAL or g in _SPECIAL) and p != g:
        return 0.0
    pt, gt = p.split(), g.split()
    common = sum((Counter(pt) & Counter(gt)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pt), common / len(gt)
    return 2 * precision * recall / (precision + recall)


def f1_score(pred: str, golds: Sequence[str]) -> float:
    """Token F1 (bag of normalised words), maximum over the gold answers."""
    return max((_token_f1(pred, g) for g in golds), default=0.0)


def accuracy(pred: str, golds: Sequence[str]) -> float:
    """1.0 when some normalised gold answer is a substring of the normalised prediction.

    This is FlashRAG's `acc` (Sub_ExactMatch): lenient towards verbose answers.
    """
    p = normalize_answer(pred)
    return float(any(normalize_answer(g) in p for g in golds))


def retrieval_recall(passages: Iterable[str], golds: Sequence[str]) -> float:
    """1.0 when some normalised gold answer is a substring of some normalised retrieved passage.

    FlashRAG's `retrieval_recall`, the same lenient test as `accuracy`: the gold "Tomar" counts
    as found in a passage that only mentions "Tomaris", so our recall compares to its numbers.
    """
    wanted = [normalize_answer(g) for g in golds]
    return float(any(g in normalize_answer(p) for p in passages for g in wanted))


def summarize(records: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """`count` and the mean of every metric in `records` (one mapping name → value per question).

    A metric is averaged over the records that carry it, so a record without retrieval (say)
    does not pull retrieval recall down.
    """
    out: dict[str, float] = {"count": len(records)}
    for name in sorted({k for r in records for k in r}):
        values = [float(r[name]) for r in records if name in r]
        out[name] = sum(values) / len(values)
    return out
