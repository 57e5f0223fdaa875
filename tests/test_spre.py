"""SPRE values equal the hand-computed mean of F1 × β^steps over a node's rollouts."""
import pytest

from reasonrag_jax.agent.episodes import Episode, Step
from reasonrag_jax.data.qa import QAExample
from reasonrag_jax.mcts.spre import SPRE, outcome

EX = QAExample("q1", "Where was Ada born?", ("Zyper",), {})


def step(kind, content):
    return Step(kind, "sys", "user", "prompt", f"<{kind}>{content}</{kind}>", content, 0.0)


def finished(n_steps, answer):
    steps = tuple(step("query", f"s{i}") for i in range(n_steps - 1)) + (step("answer", answer),)
    return Episode(EX, steps, True, answer)


def test_spre_is_the_mean_of_f1_times_beta_to_the_steps():
    partial = Episode(EX, (step("query", "a"),))
    spre = SPRE(k=3, beta=0.9, temperature=0.7)
    rollouts = [finished(3, "Zyper"), finished(5, "Zyper city"), finished(4, "Lyon")]
    # (F1 1 · 0.9^3 + F1 2/3 · 0.9^5 + 0) / 3
    assert spre.value(partial, rollouts) == pytest.approx((0.9 ** 3 + (2 / 3) * 0.9 ** 5) / 3)
    assert spre.value(partial, [finished(2, "the Zyper"), finished(6, "nowhere"),
                                finished(2, "Zyper")]) == pytest.approx(2 * 0.81 / 3)
    # A finished node is its own only rollout.
    assert spre.value(finished(2, "Zyper"), []) == pytest.approx(0.81)


def test_outcome_and_defaults():
    assert outcome(finished(4, "Lyon"), 0.9) == 0.0
    assert outcome(finished(1, "zyper!"), 0.5) == pytest.approx(0.5)
    spre = SPRE()
    assert (spre.k, spre.beta, spre.rollouts_per_node, spre.temperature) == (4, 0.9, 4, 1.0)
