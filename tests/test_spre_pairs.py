"""SPRE values on a scripted runner, and pair mining on a hand-built tree."""
import pytest

from reasonrag_jax.agent.episodes import Episode, Step
from reasonrag_jax.data.qa import QAExample
from reasonrag_jax.mcts.pairs import outcome_pairs, process_pairs, summarize
from reasonrag_jax.mcts.spre import spre_values

EX = QAExample("q1", "Where was Ada born?", ("Zyper",))


def step(kind, content):
    return Step(kind, "sys", "user", "prompt", f"<{kind}>{content}</{kind}>", content, 0.0)


def finished(n_steps, answer):
    steps = tuple(step("query", f"s{i}") for i in range(n_steps - 1)) + (step("answer", answer),)
    return Episode(EX, steps, True, answer)


class ScriptedRunner:
    """Returns the scripted rollouts of each episode, whatever the seeds."""

    def __init__(self, rollouts):
        self.rollouts, self.calls = rollouts, []

    def finish(self, episodes, temperature, seeds, k=1):
        self.calls.append((len(episodes), k))
        return [self.rollouts[ep.steps[-1].content][:k] for ep in episodes]


def test_spre_is_the_mean_of_f1_times_beta_to_the_steps():
    partial_a = Episode(EX, (step("query", "a"),))
    partial_b = Episode(EX, (step("query", "b"),))
    done = finished(2, "Zyper")
    runner = ScriptedRunner({
        "a": [finished(3, "Zyper"), finished(5, "Zyper city"), finished(4, "Lyon")],
        "b": [finished(2, "the Zyper"), finished(6, "nowhere"), finished(2, "Zyper")],
    })
    values = spre_values(runner, [partial_a, done, partial_b], [1, 2, 3], k=3, beta=0.9,
                         temperature=1.0)
    # a: (1·0.9^3 + (2/3)·0.9^5 + 0) / 3 ; done: 1·0.9^2 ; b: (1·0.81 + 0 + 1·0.81) / 3
    assert values[0] == pytest.approx((0.9 ** 3 + (2 / 3) * 0.9 ** 5) / 3, rel=1e-6)
    assert values[1] == pytest.approx(0.81, rel=1e-6)
    assert values[2] == pytest.approx(2 * 0.81 / 3, rel=1e-6)
    assert runner.calls == [(2, 3)]  # one batched call for every unfinished node


def node(i, parent, depth, kind, content, q, children=(), terminal=False, prediction=None):
    return {"id": i, "parent": parent, "depth": depth, "kind": kind, "visits": 1, "q_value": q,
            "reward": q, "terminal": terminal, "children": list(children), "instruction": "sys",
            "input": f"in{parent}", "prompt": f"p{parent}", "response": f"<{kind}>{content}</{kind}>",
            "content": content, "prediction": prediction, "retrieved": []}


def test_pairs_on_a_hand_built_tree():
    dump = {"question_id": "q1", "question": EX.question, "golden_answers": ["Zyper"], "nodes": [
        node(0, -1, 0, "root", "", 0.5, children=(1, 2, 3)),
        node(1, 0, 1, "query", "Ada birthplace", 0.8, children=(4, 5)),
        node(2, 0, 1, "query", "Ada", 0.2),
        node(3, 0, 1, "answer", "Lyon", 0.0, terminal=True, prediction="Lyon"),
        node(4, 1, 2, "evidence", "Ada was born in Zyper.", 0.9),
        node(5, 1, 2, "evidence", "Ada was born in Zyper.", 0.3),   # same content: no pair
    ]}
    pairs = process_pairs(dump, min_gap=0.01)
    got = [(p["chosen_content"], p["rejected_content"], p["layer"]) for p in pairs]
    assert got == [("Ada birthplace", "Ada", 1), ("Ada birthplace", "Lyon", 1), ("Ada", "Lyon", 1)]
    first = pairs[0]
    assert first["chosen_action_type"] == "Query Generation"
    assert first["rejected_action_type"] == "Query Generation"
    assert pairs[1]["rejected_action_type"] == "Answer Generation"
    assert (first["chosen_reward"], first["rejected_reward"]) == (0.8, 0.2)
    assert first["instruction"] == "sys" and first["input"] == "in0" and first["question_id"] == "q1"
    assert summarize(pairs)["by_action_type"] == {"Query Generation": 3}
    # Outcome view: no finished trajectory below 1 or 2, a wrong answer at 3 → no gap to learn.
    assert outcome_pairs(dump) == []
    dump["nodes"][4].update(terminal=True, prediction="Zyper")
    assert [(p["chosen_content"], p["rejected_content"]) for p in outcome_pairs(dump)] == [
        ("Ada birthplace", "Lyon")]
