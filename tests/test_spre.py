"""SPRE values on a scripted runner equal the hand-computed mean of F1 × β^steps."""
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


class ScriptedRunner:
    """Returns the scripted rollouts of each episode (by its last step's content)."""

    def __init__(self, rollouts):
        self.rollouts, self.calls = rollouts, []

    def finish(self, episodes, temperature, seeds, k=1):
        self.calls.append((len(episodes), k, temperature, list(seeds)))
        return [self.rollouts[ep.steps[-1].content][:k] for ep in episodes]


def test_spre_is_the_mean_of_f1_times_beta_to_the_steps():
    partial_a = Episode(EX, (step("query", "a"),))
    partial_b = Episode(EX, (step("query", "b"),))
    done = finished(2, "Zyper")
    runner = ScriptedRunner({
        "a": [finished(3, "Zyper"), finished(5, "Zyper city"), finished(4, "Lyon")],
        "b": [finished(2, "the Zyper"), finished(6, "nowhere"), finished(2, "Zyper")],
    })
    values, rollout_f1 = SPRE(k=3, beta=0.9, temperature=0.7)(
        runner, [partial_a, done, partial_b], [1, 2, 3])
    # a: (F1 1 · 0.9^3 + F1 2/3 · 0.9^5 + 0) / 3 ; done: 1 · 0.9^2 ; b: (0.81 + 0 + 0.81) / 3
    assert values.tolist() == pytest.approx(
        [(0.9 ** 3 + (2 / 3) * 0.9 ** 5) / 3, 0.81, 2 * 0.81 / 3], rel=1e-6)
    assert rollout_f1 == [[1.0, pytest.approx(2 / 3), 0.0], [], [1.0, 0.0, 1.0]]
    assert runner.calls == [(2, 3, 0.7, [1, 3])]   # ONE batched call for the unfinished nodes


def test_outcome_and_defaults():
    assert outcome(finished(4, "Lyon"), 0.9) == 0.0
    assert outcome(finished(1, "zyper!"), 0.5) == pytest.approx(0.5)
    spre = SPRE()
    assert (spre.k, spre.beta, spre.rollouts_per_node) == (4, 0.9, 4)
    assert SPRE(k=2)(ScriptedRunner({}), [], []).values.shape == (0,)
