"""Evaluation on a scripted policy: hand-computed metrics, traces, and resume after a kill."""
import json

import pytest

from reasonrag_jax.agent.episodes import EpisodeRunner
from reasonrag_jax.config import AgentConfig
from reasonrag_jax.data.qa import QAExample
from reasonrag_jax.eval.evaluate import evaluate
from reasonrag_jax.io import read_jsonl
from test_episodes import DOCS, EXAMPLE, GUIDED, ITEM_DOCS, FakeRetriever, ScriptedPolicy, one_hop

PARTIAL = QAExample(id="y", question="Who directed Moonfall?", golden_answers=("Ana Maria Reyes",),
                    metadata={"hops": 1})
PARTIAL_SCRIPT = {"Question: Who directed Moonfall?\n\nReasoning step: answer the question or "
                  "write the next query.": "So the answer is <answer>Ana Reyes</answer>"}
X1, X1_SCRIPT = one_hop(1)
EXAMPLES = [EXAMPLE, X1, PARTIAL]
SCRIPT = {**GUIDED, **X1_SCRIPT, **PARTIAL_SCRIPT}

# EXAMPLE: right after 2 retrievals (3 iterations), gold in its passages.
# X1: right after 1 retrieval (2 iterations), gold "a1" in "Item 1 is a1.".
# PARTIAL: "Ana Reyes" vs "Ana Maria Reyes": EM 0, F1 2*(1*2/3)/(1+2/3) = 0.8, acc 0, no passages.
EXPECTED = {
    "count": 3, "em": 2 / 3, "f1": 2.8 / 3, "acc": 2 / 3, "retrieval_recall": 2 / 3,
    "avg_retrievals": 1.0, "avg_iterations": 2.0,
    "by_hops": {
        "1": {"count": 2, "em": 0.5, "f1": 0.9, "acc": 0.5, "retrieval_recall": 0.5,
              "avg_retrievals": 0.5, "avg_iterations": 1.5},
        "2": {"count": 1, "em": 1.0, "f1": 1.0, "acc": 1.0, "retrieval_recall": 1.0,
              "avg_retrievals": 2.0, "avg_iterations": 3.0}}}


class KilledPolicy(ScriptedPolicy):
    """Dies on its `budget`-th generate call, like a process killed mid-batch."""

    def __init__(self, script, budget):
        super().__init__(script)
        self.budget = budget

    def generate(self, prompts, params, seeds, n=1):
        self.budget -= 1
        if self.budget == 0:
            raise KeyboardInterrupt
        return super().generate(prompts, params, seeds, n)


def runner(policy, batch_size=1):
    return EpisodeRunner(policy, FakeRetriever({**DOCS, **ITEM_DOCS}),
                         AgentConfig(batch_size=batch_size, num_passages=2))


def approx(d):
    return {k: approx(v) if isinstance(v, dict) else pytest.approx(v) for k, v in d.items()}


def test_summary_and_traces(tmp_path, capsys):
    summary = evaluate(runner(ScriptedPolicy(SCRIPT), batch_size=4), EXAMPLES, tmp_path,
                       name="toy")
    assert summary == approx(EXPECTED)
    assert json.loads((tmp_path / "summary.json").read_text()) == approx(EXPECTED)
    traces = {obj["id"]: obj for _, obj in read_jsonl(tmp_path / "traces.jsonl")}
    assert set(traces) == {"q7", "x1", "y"}
    assert traces["y"]["metrics"] == approx({"em": 0.0, "f1": 0.8, "acc": 0.0,
                                             "retrieval_recall": 0.0})
    assert traces["q7"]["hops"] == 2 and traces["q7"]["prediction"] == "Velmora"
    assert [s["retrieved"] for s in traces["q7"]["steps"]] == [["d1", "dx"], [], ["d2"], [], []]
    out = capsys.readouterr().out
    assert "== toy ==" in out
    assert "all            3   66.7   93.3   66.7    66.7  1.00  2.00" in out
    assert "1-hop          2   50.0   90.0   50.0    50.0  0.50  1.50" in out


def test_resume_after_kill_equals_an_uninterrupted_run(tmp_path):
    full = evaluate(runner(ScriptedPolicy(SCRIPT)), EXAMPLES, tmp_path / "full")
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):       # q7 takes 5 calls; dies inside x1
        evaluate(runner(KilledPolicy(SCRIPT, budget=7)), EXAMPLES, out)
    assert [obj["id"] for _, obj in read_jsonl(out / "traces.jsonl")] == ["q7"]
    with open(out / "traces.jsonl", "a") as f:
        f.write('{"id": "x1", "predic')            # a torn line from a kill mid-write
    policy = ScriptedPolicy(SCRIPT)
    assert evaluate(runner(policy), EXAMPLES, out) == full
    assert sum(c[0] == "generate" for c in policy.calls) == 3 + 1      # only x1 and y ran
    lines = (out / "traces.jsonl").read_text().splitlines()
    assert lines == (tmp_path / "full" / "traces.jsonl").read_text().splitlines()
    assert evaluate(None, EXAMPLES, out) == full                 # nothing left: no model needed
