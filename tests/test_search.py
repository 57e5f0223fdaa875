"""The search loop on a scripted runner: batched calls, values as SPRE says, consistent
statistics, batch-independent trees, kill + resume = uninterrupted; and a small real run."""
import dataclasses
import json

import numpy as np
import pytest

from reasonrag_jax.agent.episodes import Episode, Step, derive_seed
from reasonrag_jax.config import MCTSConfig
from reasonrag_jax.data.qa import QAExample
from reasonrag_jax.io import read_jsonl
from reasonrag_jax.mcts.search import (generate, output_paths, question_seed, search,
                                       untried_choice)
from reasonrag_jax.mcts.spre import SPRE, answer_f1

GOLD = "Zyper"
EXAMPLES = [QAExample(f"q{i}", f"Where was person {i} born?", (GOLD,), {}) for i in range(5)]


def step(kind, content, depth):
    return Step(kind, "sys", f"state {depth}", f"prompt {depth}", f"<{kind}>{content}</{kind}>",
                content, 0.0)


class FakeRunner:
    """Scripted policy, one step per row from the row's seed: after a query, evidence; else an
    answer (right or wrong) or one of two queries, and an answer at depth 5 — expansions and
    rollout steps alike, as in the real runner. Records each call's (question, seed) rows and
    temperature; `die_on` raises KeyboardInterrupt (a kill) at the first row of that question."""

    def __init__(self, die_on=None):
        self.calls, self.temperatures, self.die_on = [], [], die_on

    def start(self, examples):
        return [Episode(ex) for ex in examples]

    def expand(self, episodes, n, temperature, seeds, choices=None):
        assert n == 1 and temperature > 0 and episodes and not any(e.done for e in episodes)
        self.calls.append([(ep.example.id, seed) for ep, seed in zip(episodes, seeds)])
        self.temperatures.append(temperature)
        if any(ep.example.id == self.die_on for ep in episodes):
            raise KeyboardInterrupt
        return [[ep.advance(self.next_step(ep, seed, choice))]
                for ep, seed, choice in zip(episodes, seeds, choices or [None] * len(seeds))]

    @staticmethod
    def next_step(ep, seed, choice=None):
        """`choice` (query / answer) overrides the scripted one, except for the forced answer
        at depth 5, as in the real runner."""
        depth, r = len(ep.steps), seed % 4
        if ep.steps and ep.steps[-1].kind == "query":
            return step("evidence", f"fact {r}", depth)
        if depth >= 5 or choice == "answer" or (choice is None and r < 2):
            return step("answer", GOLD if r % 2 == 0 else "Lyon", depth)
        return step("query", f"query {r}", depth)

    def finish(self, ep, seed, k):
        """The node's k rollouts, as `EpisodeRunner.finish([ep], T, [seed], k)[0]` runs them."""
        out = []
        for r in range(k):
            e = ep
            while not e.done:
                ((e,),) = self.expand([e], 1, 1.0, [derive_seed(seed, r)])
            out.append(e)
        return out


CFG = MCTSConfig(max_rollouts=10, max_children=2, spre_rollouts=3, beta=0.9, temperature=1.0,
                 batch_questions=2)


def episode_of(dump, i):
    """Rebuild a node's episode from the dump (path of steps from the root)."""
    nodes, path = dump["nodes"], []
    while i > 0:
        path.append(nodes[i])
        i = nodes[i]["parent"]
    ex = next(e for e in EXAMPLES if e.id == dump["question_id"])
    ep = Episode(ex)
    for n in reversed(path):
        ep = ep.advance(step(n["kind"], n["content"], n["depth"] - 1))
    return ep


def iteration_seeds(examples, seed):
    """Every seed an expansion of these questions' trees can be drawn with."""
    return {derive_seed(question_seed(seed, ex.id), it)
            for ex in examples for it in range(CFG.max_rollouts)}


def test_search_interleaves_trees_and_keeps_consistent_statistics():
    runner = FakeRunner()
    dumps = search(runner, EXAMPLES[:3], CFG, seed=7)
    expansion_seeds = iteration_seeds(EXAMPLES[:3], 7)
    rows = [[seed in expansion_seeds for _, seed in call] for call in runner.calls]
    # Every new node is one expansion row; a round never holds more than every tree's work.
    assert sum(map(sum, rows)) == sum(len(d["nodes"]) - 1 for d in dumps)
    assert max(map(len, rows)) <= 3 * CFG.spre_rollouts
    # Trees do not wait for each other: some round expands one tree while others roll out.
    assert any(any(r) and not all(r) for r in rows)
    spre = SPRE(k=3, beta=0.9)
    replay = FakeRunner()
    for dump in dumps:
        nodes = dump["nodes"]
        assert 2 <= len(nodes) <= CFG.max_rollouts + 1
        assert dump["rollouts"] == 3 * sum(not n["terminal"] for n in nodes[1:])
        assert nodes[0]["seed"] == question_seed(7, dump["question_id"])
        for n in nodes:
            kids = [nodes[c] for c in n["children"]]
            assert len(kids) <= CFG.max_children and not (n["terminal"] and kids)
            assert all(k["depth"] == n["depth"] + 1 and k["parent"] == n["id"] for k in kids)
            if n["id"] == 0:
                continue
            # The node's reward is SPRE over its rollouts, replayed from its episode and seed;
            # its statistics are its own backups (once, or once per visit for an answer node)
            # plus its children's.
            ep = episode_of(dump, n["id"])
            assert n["seed"] in expansion_seeds
            rollouts = [] if ep.done else replay.finish(ep, n["seed"], 3)
            assert n["reward"] == pytest.approx(spre.value(ep, rollouts))
            assert n["rollout_f1"] == pytest.approx([answer_f1(r) for r in rollouts])
            own = n["visits"] - sum(k["visits"] for k in kids)
            assert own == 1 or (n["terminal"] and own >= 1)
            assert n["q_value"] * n["visits"] == pytest.approx(
                own * n["reward"] + sum(k["q_value"] * k["visits"] for k in kids), abs=1e-5)
        root = nodes[0]
        assert root["visits"] == CFG.max_rollouts
    # Rollouts reach different answers: the values are not all equal.
    assert len({n["reward"] for d in dumps for n in d["nodes"][1:]}) > 2


def test_rollouts_run_at_the_value_function_temperature():
    runner = FakeRunner()
    spre = SPRE(k=3, beta=0.9, temperature=0.5)
    dumps = search(runner, EXAMPLES[:3], CFG, seed=7, value_fn=spre)
    expansion_seeds = iteration_seeds(EXAMPLES[:3], 7)
    assert set(runner.temperatures) == {0.5, CFG.temperature}
    for temperature, call in zip(runner.temperatures, runner.calls):
        assert all((s in expansion_seeds) == (temperature == CFG.temperature) for _, s in call)
    # The scripted policy ignores the temperature: the same trees as one call per round.
    assert dumps == search(FakeRunner(), EXAMPLES[:3], CFG, seed=7)


def test_untried_choice_is_the_one_no_child_took():
    assert [untried_choice(k) for k in ([], ["query"], ["answer", "answer"], ["query", "answer"],
                                        ["evidence"])] == [None, "answer", "query", None, None]


def test_untried_choice_gives_every_reasoning_node_an_answer_and_a_query_child():
    def sibling_kinds(untried):
        dumps = search(FakeRunner(), EXAMPLES, dataclasses.replace(
            CFG, max_rollouts=16, untried_choice=untried), seed=7)
        return [sorted(d["nodes"][c]["kind"] for c in n["children"]) for d in dumps
                for n in d["nodes"] if n["kind"] in ("root", "evidence") and n["depth"] < 5
                and len(n["children"]) == 2]
    # The scripted policy's own choices often repeat (two queries or two answers) ...
    assert ["query", "query"] in sibling_kinds(False) and ["answer", "answer"] in sibling_kinds(False)
    # ... the untried choice never does.
    both = sibling_kinds(True)
    assert len(both) >= 5 and all(k == ["answer", "query"] for k in both)


def test_trees_do_not_depend_on_the_batch():
    alone = [search(FakeRunner(), [ex], CFG, seed=7)[0] for ex in EXAMPLES[:3]]
    together = search(FakeRunner(), EXAMPLES[:3], CFG, seed=7)
    assert together == alone
    other_seed = search(FakeRunner(), EXAMPLES[:3], CFG, seed=8)
    assert other_seed != together


def test_generate_resumes_after_a_kill_to_the_same_files(tmp_path):
    full = output_paths(tmp_path / "full" / "pairs.jsonl")
    summary = generate(FakeRunner(), EXAMPLES, full, CFG, seed=3)
    assert summary["questions"] == 5 and summary["process"]["pairs"] > 0
    assert summary["outcome"]["pairs"] > 0
    assert full["picture"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pairs = [obj for _, obj in read_jsonl(full["pairs"])]
    assert {"instruction", "input", "prompt", "chosen", "rejected", "chosen_action_type",
            "rejected_action_type", "chosen_content", "rejected_content", "layer", "question_id",
            "chosen_reward", "rejected_reward"} == set(pairs[0])
    assert all(p["chosen_reward"] - p["rejected_reward"] >= CFG.min_value_gap for p in pairs)

    killed = output_paths(tmp_path / "killed" / "pairs.jsonl")
    with pytest.raises(KeyboardInterrupt):      # dies in the second batch (q2, q3)
        generate(FakeRunner(die_on="q2"), EXAMPLES, killed, CFG, seed=3)
    assert [o["question_id"] for _, o in read_jsonl(killed["trees"])] == ["q0", "q1"]
    with open(killed["trees"], "a") as f:        # a torn line from a kill mid-write
        f.write('{"question_id": "q2", "nod')
    killed["pairs"].write_text("")               # a kill between the tree and pair appends
    runner = FakeRunner()
    assert generate(runner, EXAMPLES, killed, CFG, seed=3) == summary
    assert {q for call in runner.calls for q, _ in call} == {"q2", "q3", "q4"}   # only these
    for key in ("trees", "pairs", "outcome", "summary"):
        assert killed[key].read_text() == full[key].read_text(), key
    runner = FakeRunner()
    assert generate(runner, EXAMPLES, killed, CFG, seed=3) == summary and runner.calls == []


@pytest.mark.slow
def test_smollm2_small_run_writes_valid_pairs_and_resumes(tmp_path, smollm2):
    from reasonrag_jax.agent.episodes import EpisodeRunner
    from reasonrag_jax.config import AgentConfig, RetrievalConfig, SamplerConfig
    from reasonrag_jax.data.qa import read_qa
    from reasonrag_jax.data.synthetic import write_synthetic
    from reasonrag_jax.retrieval.index import Retriever, build_index
    from reasonrag_jax.sampling import Sampler

    files = write_synthetic(tmp_path / "data", seed=0, num_entities=40)
    retrieval = RetrievalConfig(backend="exact")
    retriever = Retriever.load(build_index(files["corpus"], tmp_path / "index", retrieval),
                               retrieval)
    model, tokenizer = smollm2
    sampler = Sampler(model, tokenizer, SamplerConfig(cache_size=1024, max_batch=8))
    agent = AgentConfig(mode="guided", max_retrievals=1, max_step_tokens=12, batch_size=8)
    cfg = MCTSConfig(max_rollouts=3, max_children=2, spre_rollouts=2, batch_questions=2)
    examples = read_qa(files["train"])[:4]

    full = output_paths(tmp_path / "full.jsonl")
    summary = generate(EpisodeRunner(sampler, retriever, agent), examples, full, cfg, seed=0)
    assert summary["questions"] == 4
    dumps = [o for _, o in read_jsonl(full["trees"])]
    assert [d["question_id"] for d in dumps] == [ex.id for ex in examples]
    for d in dumps:
        nodes = d["nodes"]      # two answers at the root exhaust a tree early
        assert 3 <= len(nodes) <= 4 and nodes[0]["visits"] == 3
        assert all(0.0 <= n["reward"] <= 1.0 for n in nodes)
        assert {n["kind"] for n in nodes if n["depth"] == 1} <= {"query", "answer"}
        assert all(n["prediction"] is not None for n in nodes if n["terminal"])
    for _, p in read_jsonl(full["pairs"], allow_empty=True):
        assert p["chosen_content"] != p["rejected_content"]
        assert p["chosen_action_type"] in ("Query Generation", "Answer Generation")

    resumed = output_paths(tmp_path / "resumed.jsonl")
    # A run killed in its second batch has the first batch's trees only.
    resumed["trees"].write_text("".join(full["trees"].read_text().splitlines(keepends=True)[:2]))
    assert generate(EpisodeRunner(sampler, retriever, agent), examples, resumed, cfg,
                    seed=0) == summary
    for key in ("trees", "pairs", "outcome"):
        assert resumed[key].read_text() == full[key].read_text(), key
    assert json.loads(resumed["summary"].read_text()) == summary
    assert np.isfinite(summary["process"]["mean_reward_gap"])


@pytest.mark.parametrize("name", ["qwen2_5_7b_8xh100.yaml", "qwen2_5_7b_tpu_v5e64.yaml",
                                  "smollm2_cpu.yaml"])
def test_configs_carry_the_original_caps(name):
    """The original caps the chain at 3 retrievals in data generation and 4 at inference;
    `generate` builds its runner with the search's cap."""
    from pathlib import Path

    from reasonrag_jax.config import load_config
    from reasonrag_jax.mcts.search import search_config

    cfg = load_config(Path(__file__).parents[1] / "configs" / name)
    assert (cfg.agent.max_retrievals, cfg.mcts.max_retrievals) == (4, 3)
    searching = search_config(cfg)
    assert searching.agent.max_retrievals == 3 and searching.mcts == cfg.mcts
    assert searching.agent.num_passages == cfg.agent.num_passages
    # A search round holds every tree's expansion or K rollout steps: one agent batch.
    assert cfg.agent.batch_size == cfg.mcts.batch_questions * cfg.mcts.spre_rollouts
