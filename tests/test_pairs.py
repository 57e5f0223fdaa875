"""Pair mining on a hand-built tree gives exactly the expected process and outcome pairs.

`layer` is RAG-ProGuide's: the depth of the pairs' common parent, 0 among the root's children."""
from reasonrag_jax.mcts.pairs import (outcome_pairs, process_pairs, search_stats,
                                      summarize)


def node(i, parent, depth, kind, content, q, children=(), terminal=False, prediction=None,
         visits=1):
    return {"id": i, "parent": parent, "depth": depth, "kind": kind, "visits": visits,
            "q_value": q, "reward": q, "terminal": terminal, "children": list(children),
            "instruction": "sys", "input": f"in{parent}", "prompt": f"p{parent}",
            "response": f"<{kind}>{content}</{kind}>", "content": content,
            "prediction": prediction, "retrieved": []}


def tree():
    #            0
    #     1      2      3(A Lyon)
    #   4   5    6(A Zyper) 7(A Zyperia)
    #   |
    #   8 (A Zyper)     [5 duplicates 4's content; 9 is never visited]
    return {"question_id": "q1", "question": "Where was Ada born?", "golden_answers": ["Zyper"],
            "nodes": [
                node(0, -1, 0, "root", "", 0.5, children=(1, 2, 3)),
                node(1, 0, 1, "query", "Ada birthplace", 0.8, children=(4, 5)),
                node(2, 0, 1, "query", "Ada", 0.2, children=(6, 7, 9)),
                node(3, 0, 1, "answer", "Lyon", 0.0, terminal=True, prediction="Lyon"),
                node(4, 1, 2, "evidence", "Ada was born in Zyper.", 0.9, children=(8,)),
                node(5, 1, 2, "evidence", "Ada was born in Zyper.", 0.3),
                node(6, 2, 2, "answer", "Zyper", 0.81, terminal=True, prediction="Zyper"),
                node(7, 2, 2, "answer", "Zyperia", 0.805, terminal=True, prediction="Zyperia"),
                node(8, 4, 3, "answer", "Zyper", 0.729, terminal=True, prediction="Zyper"),
                node(9, 2, 2, "answer", "Nowhere", 0.0, visits=0),
            ]}


def test_process_pairs():
    pairs = process_pairs(tree(), min_gap=0.01)
    got = [(p["chosen_content"], p["rejected_content"], p["layer"], p["chosen_reward"],
            p["rejected_reward"]) for p in pairs]
    assert got == [("Ada birthplace", "Ada", 0, 0.8, 0.2),
                   ("Ada birthplace", "Lyon", 0, 0.8, 0.0),
                   ("Ada", "Lyon", 0, 0.2, 0.0)]
    # 4/5: same content; 6/7: gap 0.005 < 0.01; 9: never visited.
    first = pairs[0]
    assert first == {
        "instruction": "sys", "input": "in0", "prompt": "p0",
        "chosen": "<query>Ada birthplace</query>", "rejected": "<query>Ada</query>",
        "chosen_action_type": "Query Generation", "rejected_action_type": "Query Generation",
        "chosen_content": "Ada birthplace", "rejected_content": "Ada", "layer": 0,
        "question_id": "q1", "chosen_reward": 0.8, "rejected_reward": 0.2}
    assert pairs[1]["rejected_action_type"] == "Answer Generation"
    assert [p["chosen_content"] for p in process_pairs(tree(), min_gap=0.001)][-1] == "Zyper"
    assert summarize(pairs) == {"pairs": 3, "by_action_type": {"Query Generation": 3},
                                "by_layer": {"0": 3}, "mean_reward_gap": (0.6 + 0.8 + 0.2) / 3,
                                "reward_gap_quartiles": [0.4, 0.6, 0.7]}   # gaps .2 .6 .8


def test_outcome_pairs():
    # First trajectory through each node (creation order): 1 → 8 (Zyper, F1 1), 2 → 6 (Zyper, 1),
    # 3 → itself (Lyon, 0), 6 → 1, 7 → 0 ("zyperia" ≠ "zyper"); 5 and 9 have none.
    # Siblings (1, 2): 1 vs 1, a tie, although PRL prefers 1 (0.8 vs 0.2); (1, 3) and (2, 3):
    # 1 vs 0; (6, 7): 1 vs 0, although PRL's values are within 0.005.
    pairs = outcome_pairs(tree(), min_gap=0.01)
    got = [(p["chosen_content"], p["rejected_content"], p["layer"], p["chosen_reward"],
            p["rejected_reward"]) for p in pairs]
    assert got == [("Ada birthplace", "Lyon", 0, 1.0, 0.0),
                   ("Ada", "Lyon", 0, 1.0, 0.0),
                   ("Zyper", "Zyperia", 1, 1.0, 0.0)]
    assert pairs[-1]["input"] == "in2" and pairs[-1]["chosen_action_type"] == "Answer Generation"
    summary = summarize(pairs)
    assert summary["by_layer"] == {"0": 2, "1": 1}
    assert summary["by_action_type"] == {"Query Generation": 2, "Answer Generation": 1}


def test_outcome_pairs_take_one_sampled_trajectory_per_sibling():
    #     0
    #   1(a)  2(b)         rollouts from 1: F1 1.0, 0.5; from 2: 0.0; from 3: 0.0
    #   |
    #   3(e)
    nodes = [node(0, -1, 0, "root", "", 0.5, children=(1, 2)),
             node(1, 0, 1, "query", "a", 0.6, children=(3,)),
             node(2, 0, 1, "query", "b", 0.0),
             node(3, 1, 2, "evidence", "e", 0.0)]
    for n, f1s in zip(nodes, ([], [1.0, 0.5], [0.0], [0.0])):
        n["rollout_f1"] = f1s
    dump = {"question_id": "q2", "question": "?", "golden_answers": ["x"], "nodes": nodes}

    def got():
        return [(p["chosen_content"], p["rejected_content"], p["chosen_reward"],
                 p["rejected_reward"]) for p in outcome_pairs(dump, min_gap=0.01)]

    assert got() == [("a", "b", 1.0, 0.0)]      # a's first rollout against b's
    nodes[1]["rollout_f1"] = [0.0, 1.0]         # same mean, but the first sample failed:
    assert got() == []                          # 0 vs 0, no pair (PRL's 0.6 vs 0 still pairs)
    assert len(process_pairs(dump)) == 1
    nodes[1]["rollout_f1"] = []                 # a has no rollout of its own: its first
    assert got() == []                          # trajectory is 3's rollout (F1 0)
    for n in nodes:
        n["rollout_f1"] = []
    assert outcome_pairs(dump) == []


def test_search_stats_count_answer_nodes_correct_trajectories_and_the_root_decision():
    searched = tree()             # answers Lyon (F1 0), Zyper (1), Zyperia (0), Zyper (1)
    rollouts_only = {"question_id": "q2", "question": "?", "golden_answers": ["x"], "nodes": [
        {**node(0, -1, 0, "root", "", 0.3, children=(1,)), "rollout_f1": []},
        {**node(1, 0, 1, "query", "a", 0.3), "rollout_f1": [0.5, 0.0]}]}
    answered = tree()
    answered["nodes"][3]["q_value"] = 0.9     # the root's answer child beats both queries
    stats = search_stats([searched, rollouts_only, answered, answered])
    assert stats == {"trees": 4, "with_answer_node": 3 / 4, "found_correct": 3 / 4,
                     "mean_best_f1": (1.0 + 0.5 + 1.0 + 1.0) / 4, "root_answer_vs_query": 3,
                     "root_answer_preferred": 2 / 3}
