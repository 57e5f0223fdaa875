"""Answer metrics with FlashRAG's conventions (SQuAD normalisation), so numbers compare to papers."""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_SPECIAL = ("yes", "no", "noanswer")


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation and articles, collapse whitespace (SQuAD)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(pred: str, golds: Sequence[str]) -> float:
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(g) for g in golds))


def _token_f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred), normalize_answer(gold)
    # FlashRAG: a yes/no/noanswer answer only matches itself.
    if (p in _SPECIAL or g in _SPECIAL) and p != g:
        return 0.0
    pt, gt = p.split(), g.split()
    common = sum((Counter(pt) & Counter(gt)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pt), common / len(gt)
    return 2 * precision * recall / (precision + recall)


def f1_score(pred: str, golds: Sequence[str]) -> float:
    return max((_token_f1(pred, g) for g in golds), default=0.0)


def accuracy(pred: str, golds: Sequence[str]) -> float:
    """A normalised gold answer is a substring of the normalised prediction."""
    p = normalize_answer(pred)
    return float(any(normalize_answer(g) in p for g in golds))


def retrieval_recall(passages: Iterable[str], golds: Sequence[str]) -> float:
    """1 if any gold answer appears in any retrieved passage (normalised), else 0."""
    texts = [normalize_answer(p) for p in passages]
    return float(any(normalize_answer(g) in t for g in golds for t in texts if normalize_answer(g)))
