"""FlashRAG / SQuAD metrics on hand-computed cases."""
import pytest

from reasonrag_jax.eval.metrics import (accuracy, exact_match, f1_score, normalize_answer,
                                        retrieval_recall, summarize)


@pytest.mark.parametrize("text, normalised", [
    ("  The  Eiffel-Tower, Paris! ", "eiffeltower paris"),   # punctuation joins, not splits
    ("An apple a day", "apple day"),
    ("Theatre of the Absurd", "theatre of absurd"),            # "the" only as a whole word
    ("A.", ""),                                                # "A." → "a" → article → ""
    ("\tNew\nYork ", "new york"),
])
def test_normalize_answer(text, normalised):
    assert normalize_answer(text) == normalised


@pytest.mark.parametrize("pred, golds, em, f1, acc", [
    ("Paris", ["paris"], 1.0, 1.0, 1.0),
    ("the Paris.", ["Paris"], 1.0, 1.0, 1.0),
    ("the city of Paris", ["Paris"], 0.0, 0.5, 1.0),              # "city of paris": p=1/3 r=1
    ("Paris France", ["Paris", "Lyon France"], 0.0, 2 / 3, 1.0),   # vs "Paris": p=1/2 r=1
    ("New York City", ["new york"], 0.0, 0.8, 1.0),                # p=2/3 r=1
    ("york new", ["New York"], 0.0, 1.0, 0.0),                     # F1 is a bag of words
    ("Lyon", ["Paris", "Lyon"], 1.0, 1.0, 1.0),                    # max over golds
    ("yes", ["no"], 0.0, 0.0, 0.0),
    ("yes", ["Yes."], 1.0, 1.0, 1.0),
    ("no", ["no way"], 0.0, 0.0, 0.0),                             # prediction is "no": F1 0
    ("yes it is", ["yes"], 0.0, 0.0, 1.0),                         # gold is "yes": F1 0
    ("noanswer", ["no answer"], 0.0, 0.0, 0.0),
    ("", ["Paris"], 0.0, 0.0, 0.0),
    ("Paris", [], 0.0, 0.0, 0.0),
    ("a a b", ["a b b"], 0.0, 2 / 3, 0.0),                         # "b" vs "b b": p=1 r=1/2
    ("x x y", ["x y y"], 0.0, 2 / 3, 0.0),                         # common {x:1, y:1}: p=r=2/3
])
def test_em_f1_acc(pred, golds, em, f1, acc):
    assert exact_match(pred, golds) == em
    assert f1_score(pred, golds) == pytest.approx(f1)
    assert accuracy(pred, golds) == acc


def test_accuracy_is_a_substring_test():
    assert accuracy("Tomaris", ["Tomar"]) == 1.0      # FlashRAG's acc is lenient, by design
    assert accuracy("He was born in Tomar.", ["tomar"]) == 1.0


def test_retrieval_recall_is_flashrag_substring_test():
    passages = ["Zyper\nZyper is a city in Poumkuquex.", "Other\ntext"]
    assert retrieval_recall(passages, ["poumkuquex"]) == 1.0
    assert retrieval_recall(passages, ["Laithdencho", "the Zyper"]) == 1.0
    assert retrieval_recall(passages, ["Laithdencho"]) == 0.0
    assert retrieval_recall(passages, ["city Zyper"]) == 0.0          # the words must be in order
    assert retrieval_recall(["Tomaris is far."], ["Tomar"]) == 1.0    # a substring, as FlashRAG
    assert retrieval_recall(["a city in poumku quex"], ["Poumkuquex"]) == 0.0
    assert retrieval_recall(["New-York"], ["newyork"]) == 1.0
    assert retrieval_recall([], ["x"]) == 0.0
    assert retrieval_recall(["Paris"], []) == 0.0
    assert retrieval_recall(["Other"], ["The"]) == 1.0   # FlashRAG: "" is in every passage


def test_summarize():
    rows = [{"em": 1.0, "f1": 1.0}, {"em": 0.0, "f1": 0.5, "recall": 1.0}, {"em": 0.0, "f1": 0.0}]
    out = summarize(rows)
    assert out == {"count": 3, "em": pytest.approx(1 / 3), "f1": pytest.approx(0.5),
                   "recall": 1.0}
    assert summarize([]) == {"count": 0}
