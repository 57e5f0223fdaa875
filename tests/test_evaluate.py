"""Evaluation on a scripted policy: hand-computed metrics, traces, and resume after a kill."""
import json
from pathlib import Path

import pytest

from reasonrag_jax.agent import protocol as P
from reasonrag_jax.agent.episodes import EpisodeRunner, Step
from reasonrag_jax.config import AgentConfig, load_config
from reasonrag_jax.data.qa import QAExample, read_qa, write_qa
from reasonrag_jax.eval import evaluate as E
from reasonrag_jax.eval.evaluate import evaluate
from reasonrag_jax.io import InputError, read_jsonl
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


def test_run_eval_wiring_and_settings_guard(tmp_path, monkeypatch):
    import reasonrag_jax.models.policy as policy
    import reasonrag_jax.retrieval.index as index
    import reasonrag_jax.sampling as sampling

    loaded = []
    monkeypatch.setattr(policy, "load_policy", lambda spec, **kw: loaded.append(spec) or
                        (None, None))
    monkeypatch.setattr(sampling, "Sampler", lambda model, tok, cfg, **mesh: ScriptedPolicy(SCRIPT))
    monkeypatch.setattr(index.Retriever, "load",
                        classmethod(lambda cls, d, cfg: FakeRetriever({**DOCS, **ITEM_DOCS})))
    dataset = tmp_path / "qa.jsonl"
    write_qa(dataset, EXAMPLES)
    cfg = load_config(None, ["agent.num_passages=2"])
    summary = E.run_eval(cfg, dataset, tmp_path / "index", "ckpt", tmp_path / "out")
    assert summary == approx(EXPECTED) and loaded == ["ckpt"]
    assert E.run_eval(cfg, dataset, tmp_path / "index", "ckpt", tmp_path / "out") == summary
    assert loaded == ["ckpt"]                   # resumed with nothing left: no model loaded
    monkeypatch.chdir(tmp_path)                 # a local checkpoint: relative == absolute
    (tmp_path / "local").mkdir()
    E.run_eval(cfg, dataset, tmp_path / "index", "local", tmp_path / "out2")
    marker = tmp_path / "out2" / "run.json"     # as written before: the path as given
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "policy": "local"}))
    for spec in (str(tmp_path / "local"), "local"):
        assert E.run_eval(cfg, dataset, tmp_path / "index", spec, "out2") == summary
    assert loaded == ["ckpt", "local"]
    with pytest.raises(InputError, match="other settings"):
        E.run_eval(cfg, dataset, tmp_path / "index", "other", tmp_path / "out")


def assert_well_formed(trace, cfg, corpus_ids):
    steps = trace["steps"]
    kinds = [s["kind"] for s in steps]
    assert kinds[-1] == "answer" and kinds.count("answer") == 1
    assert trace["prediction"] == steps[-1]["answer"]
    for prev, s in zip([None] + steps, steps):
        assert s["prompt"].startswith(f"<|im_start|>system\n{P.INSTRUCTION}<|im_end|>\n")
        assert s["prompt"].endswith("<|im_start|>assistant\n")
        after_query = prev is not None and prev["kind"] == "query" and prev["query"]
        assert (s["kind"] == "evidence") == bool(after_query)
        scaffold = {"query": P.QUERY_SCAFFOLD, "answer": P.ANSWER_SCAFFOLD,
                    "evidence": P.EVIDENCE_SCAFFOLD}[s["kind"]]
        assert s["response"].startswith(scaffold)
        if s["query"]:
            assert len(s["retrieved"]) == cfg.num_passages
        assert set(s["retrieved"]) <= corpus_ids
    assert trace["retrievals"] <= cfg.max_retrievals
    assert all(0.0 <= v <= 1.0 for v in trace.get("metrics", {}).values())


@pytest.mark.slow
def test_smollm2_guided_traces_are_well_formed(tmp_path, smollm2):
    from reasonrag_jax.data.synthetic import write_synthetic
    from reasonrag_jax.retrieval.index import Retriever, build_index
    from reasonrag_jax.sampling import Sampler

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "configs" / "smollm2_cpu.yaml",
                      ["agent.max_retrievals=1", "agent.max_step_tokens=8", "agent.batch_size=8"])
    paths = write_synthetic(tmp_path / "data", seed=0, num_entities=20)
    retriever = Retriever.load(build_index(paths["corpus"], tmp_path / "index", cfg.retrieval),
                               cfg.retrieval)
    corpus_ids = {obj["id"] for _, obj in read_jsonl(paths["corpus"])}
    examples = read_qa(paths["test"])[:8]
    model, tokenizer = smollm2
    runner = EpisodeRunner(Sampler(model, tokenizer, cfg.sampler), retriever, cfg.agent)

    summary = evaluate(runner, examples, tmp_path / "eval")
    traces = [obj for _, obj in read_jsonl(tmp_path / "eval" / "traces.jsonl")]
    assert summary["count"] == len(traces) == 8
    for trace in traces:
        assert_well_formed(trace, cfg.agent, corpus_ids)

    # From each gold first query on, grounding and the forced answer run on the model too.
    starts = []
    for ep in runner.start(examples):
        turn = P.turn(ep.example.question, (), cfg.agent.max_retrievals)
        query = ep.example.metadata["gold_chain"][0]["query"]
        passages = retriever.search([query], cfg.agent.num_passages)[0]
        starts.append(ep.advance(Step("query", turn.instruction, turn.input,
                                      P.render(tokenizer, turn.instruction, turn.input),
                                      P.query_response(query), query, 0.0, tuple(passages))))
    for (ep,) in runner.finish(starts, 0.0, range(len(starts))):
        assert ep.steps[1].kind == "evidence"
        assert_well_formed(ep.to_trace(), cfg.agent, corpus_ids)
