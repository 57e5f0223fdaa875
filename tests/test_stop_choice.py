"""The stop-or-search margin: which reasoning states it reads from traces, that its sign is the
guided runner's greedy choice, and the per-group comparison of policies."""
import json

import numpy as np
import pytest

from reasonrag_jax.agent.episodes import EpisodeRunner
from reasonrag_jax.config import AgentConfig
from reasonrag_jax.eval.stop_choice import ReasoningState, answer_margins, compare, reasoning_states
from reasonrag_jax.eval.evaluate import trace_record
from reasonrag_jax.io import InputError, read_jsonl
from test_episodes import DOCS, GUIDED, IN, FakeRetriever, ScriptedPolicy
from test_protocol import EXAMPLE

FORCED = IN[2].replace("Reasoning step: answer the question or write the next query.",
                       "Reasoning step: no more searches are allowed, so give the final answer.")


def traces(tmp_path, max_retrievals):
    policy = ScriptedPolicy({**GUIDED, FORCED: "So the answer is <answer>Ana Reyes</answer>"})
    runner = EpisodeRunner(policy, FakeRetriever(DOCS),
                           AgentConfig(num_passages=2, max_retrievals=max_retrievals))
    ((ep,),) = runner.finish(runner.start([EXAMPLE]), 0.0, [0])
    path = tmp_path / "traces.jsonl"
    path.write_text(json.dumps(trace_record(ep)) + "\n")
    return path, ep, policy


def test_states_are_the_chosen_reasoning_steps_with_what_was_known(tmp_path):
    path, ep, _ = traces(tmp_path, max_retrievals=4)
    states = reasoning_states(read_jsonl(path), path)
    # Velmora is in the evidence only after the second retrieval.
    assert [(s.retrievals, s.knows) for s in states] == [(0, False), (1, False), (2, True)]
    assert [s.prompt for s in states] == [ep.steps[k].prompt for k in (0, 2, 4)]
    assert {(s.id, s.hops) for s in states} == {("q7", 2)}
    # At the cap the answer is forced: not a choice, so not a state.
    path, ep, _ = traces(tmp_path, max_retrievals=1)
    assert [s.kind for s in ep.steps] == ["query", "evidence", "answer"]
    assert [s.retrievals for s in reasoning_states(read_jsonl(path), path)] == [0]


def test_a_gold_answer_counts_as_known_only_as_whole_words(tmp_path):
    path, _, _ = traces(tmp_path, max_retrievals=4)
    rec = json.loads(path.read_text())
    rec["steps"][3]["evidence"] = "Ana Reyes was born in Velmoran country."
    path.write_text(json.dumps(rec) + "\n")
    assert [s.knows for s in reasoning_states(read_jsonl(path), path)] == [False, False, False]


def test_the_margin_sign_is_the_runners_greedy_choice(tmp_path):
    path, ep, policy = traces(tmp_path, max_retrievals=4)
    states = reasoning_states(read_jsonl(path), path)
    margins = answer_margins(policy, [s.prompt for s in states])
    assert [s.kind for s in ep.steps if s.state == "reasoning"] == ["query", "query", "answer"]
    assert [m > 0 for m in margins] == [False, False, True]
    # Half the policy's samples answer: log(1/2) - log(1/2) = 0, the greedy tie goes to the query.
    both = ScriptedPolicy({IN[0]: ["So the answer is <answer>Velmora</answer>",
                                   "So the next query is <query>director of Moonfall</query>"]})
    assert answer_margins(both, [states[0].prompt]) == pytest.approx([0.0])
    one_in_three = ScriptedPolicy({IN[0]: [GUIDED[IN[0]]] * 2 + ["So the answer is <answer>x</answer>"]})
    assert answer_margins(one_in_three, [states[0].prompt]) == pytest.approx([np.log(1 / 2)])


def test_compare_groups_states_and_pairs_policies_on_them():
    states = [ReasoningState("a", 1, 0, False, "p"), ReasoningState("b", 1, 0, False, "p"),
              ReasoningState("a", 1, 1, True, "p"), ReasoningState("b", 1, 1, True, "p"),
              ReasoningState("c", 1, 1, False, "p")]
    sft, prl = np.array([-2.0, -1.0, -1.0, -3.0, -1.0]), np.array([-1.0, -1.0, 2.0, 1.0, -2.0])
    out = compare(states, {"sft": sft, "prl": prl})
    groups = out["groups"]
    assert list(groups) == ["0 retrievals, no answer in evidence",
                            "1 retrieval, answer in evidence",
                            "1 retrieval, no answer in evidence"]
    known = groups["1 retrieval, answer in evidence"]
    assert known["states"] == 2
    assert known["sft"]["margin"] == pytest.approx(-2.0) and known["sft"]["answers"] == 0.0
    assert known["prl"]["margin"] == pytest.approx(1.5) and known["prl"]["answers"] == 1.0
    assert known["prl"]["minus_first"]["margin"] == pytest.approx(3.5)
    assert "minus_first" not in known["sft"]
    lone = groups["1 retrieval, no answer in evidence"]["prl"]
    assert lone["ci"] == pytest.approx([-2.0, -2.0]) and lone["minus_first"]["margin"] == -1.0


def test_a_file_that_is_not_eval_traces_is_named_with_its_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"id": "q", "golden_answers": ["x"], "steps": []}) + "\n"
                    + json.dumps({"id": "q2", "chosen": "a"}) + "\n")
    with pytest.raises(InputError, match=r"pairs.jsonl:2: field 'golden_answers' is missing"):
        reasoning_states(read_jsonl(path), path)


def test_the_command_refuses_bad_traces_in_one_line_before_loading_a_policy(tmp_path, capsys):
    from reasonrag_jax.cli import main

    path = tmp_path / "traces.jsonl"
    path.write_text(json.dumps({"id": "q", "golden_answers": ["x"]}) + "\n")
    out = tmp_path / "margins.json"
    assert main(["stop-choice", "--traces", str(path), "--checkpoint", "no/such/policy",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"reasonrag-jax stop-choice: error: {path}:1: field 'steps' is missing " \
                  "(not an eval traces file?)"
    assert not out.exists()


def test_the_same_checkpoint_twice_is_refused_before_anything_loads(tmp_path, capsys):
    from reasonrag_jax.cli import main

    path, _, _ = traces(tmp_path, max_retrievals=4)
    assert main(["stop-choice", "--traces", str(path), "--checkpoint", "a", "--checkpoint", "b",
                 "--checkpoint", "a", "--out", str(tmp_path / "m.json")]) == 2
    assert capsys.readouterr().err.strip() == ("reasonrag-jax stop-choice: error: --checkpoint a "
                                               "is given twice: each policy is one column")
    assert not (tmp_path / "m.json").exists()
