"""FlashRAG / SQuAD metrics on hand-computed cases."""
import pytest

from reasonrag_jax.eval.metrics import (accuracy, exact_match, f1_score, normalize_answer,
                                        retrieval_recall)


def test_normalisation():
    assert normalize_answer("  The  Eiffel-Tower, Paris! ") == "eiffeltower paris"
    assert normalize_answer("An apple a day") == "apple day"


@pytest.mark.parametrize("pred, golds, em, f1, acc", [
    ("Paris", ["paris"], 1.0, 1.0, 1.0),
    ("the city of Paris", ["Paris"], 0.0, 0.5, 1.0),              # p=1/3 r=1 → 0.5
    ("Paris France", ["Paris", "Lyon France"], 0.0, 2 / 3, 1.0),   # vs "Paris": p=½ r=1
    ("yes", ["no"], 0.0, 0.0, 0.0),
    ("yes it is", ["yes"], 0.0, 0.0, 1.0),                         # yes/no side differs → F1 0
    ("", ["Paris"], 0.0, 0.0, 0.0),
    ("New York City", ["new york"], 0.0, 0.8, 1.0),                # p=2/3 r=1 → 0.8
])
def test_em_f1_acc(pred, golds, em, f1, acc):
    assert exact_match(pred, golds) == em
    assert f1_score(pred, golds) == pytest.approx(f1)
    assert accuracy(pred, golds) == acc


def test_retrieval_recall():
    passages = ["Zyper\nZyper is a city in Poumkuquex.", "Other\ntext"]
    assert retrieval_recall(passages, ["poumkuquex"]) == 1.0
    assert retrieval_recall(passages, ["Laithdencho"]) == 0.0
    assert retrieval_recall([], ["x"]) == 0.0
