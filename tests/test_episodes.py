"""Episode runner on a scripted fake policy: exact traces, batching, slot refill, determinism."""
import re

import numpy as np
import pytest

from reasonrag_jax.agent import protocol as P
from reasonrag_jax.agent.episodes import Episode, EpisodeRunner
from reasonrag_jax.config import AgentConfig
from reasonrag_jax.data.qa import QAExample
from reasonrag_jax.sampling import Completion
from test_protocol import D1, D2, DX, EXAMPLE, ChatML, Doc


def chatml(user: str) -> str:
    return (f"<|im_start|>system\n{P.INSTRUCTION}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            "<|im_start|>assistant\n")


class ScriptedPolicy:
    """A fake sampler whose "model" maps a step's user message to its possible responses.

    Tokens are whitespace-led words, each with log-prob -1. At temperature 0 it writes the
    first continuation; otherwise sample j of seed s writes continuation `(s + j) % len`.
    `score` gives the log of the fraction of continuations that start with a text.
    """

    def __init__(self, script):
        self.tokenizer = ChatML()
        self.script = {k: [v] if isinstance(v, str) else v for k, v in script.items()}
        self.calls = []

    def _continuations(self, prompt):
        """What the model may write after `prompt`: the rest of each response that starts with
        the scaffold the prompt ends with, else (a scaffold the model would not write) any."""
        head, scaffold = prompt.rsplit("<|im_start|>assistant\n", 1)
        user = head.split("<|im_start|>user\n", 1)[1].removesuffix("<|im_end|>\n")
        options = self.script[user]
        return [r[len(scaffold):] for r in options if r.startswith(scaffold)] or options

    def score(self, prompts, continuations):
        self.calls.append(("score", len(prompts)))
        out = []
        for prompt, conts in zip(prompts, continuations):
            options = self._continuations(prompt)
            out.append([np.log(max(sum(o.startswith(c) for o in options), 1e-20) / len(options))
                        for c in conts])
        return np.array(out)

    def generate(self, prompts, params, seeds, n=1):
        assert params.stop == P.CLOSING_TAGS
        self.calls.append(("generate", len(prompts), n))
        out = []
        for prompt, seed in zip(prompts, seeds):
            options = self._continuations(prompt)
            picks = [options[0 if params.temperature == 0 else (seed + j) % len(options)]
                     for j in range(n)]
            out.append([self._complete(text, params) for text in picks])
        return out

    @staticmethod
    def _complete(text, params):
        hits = [(text.find(s), s) for s in params.stop if s in text]
        finish, stop = "eos", None
        if hits:
            i, stop = min(hits)
            text, finish = text[: i + len(stop)], "stop"
        tokens = re.findall(r"\s*\S+", text)
        if len(tokens) > params.max_new_tokens:
            tokens, finish, stop = tokens[: params.max_new_tokens], "length", None
        return Completion("".join(tokens), list(range(len(tokens))), [-1.0] * len(tokens),
                          finish, stop)


class FakeRetriever:
    def __init__(self, docs):
        self.docs, self.calls = docs, []

    def search(self, queries, k):
        self.calls.append(("search", list(queries)))
        return [self.docs.get(q, [])[:k] for q in queries]


Q = "Question: Where was the director of Moonfall born?"
H1 = "\nQuery 1: director of Moonfall\nEvidence 1: Moonfall is a 1990 film directed by Ana Reyes."
IN = [
    Q + "\n\nReasoning step: answer the question or write the next query.",
    Q + "\nQuery 1: director of Moonfall\n\nRetrieved documents for query 1:\n"
        "Doc 1 (Moonfall) Moonfall is a 1990 film directed by Ana Reyes.\n"
        "Doc 2 (Sunrise) Sunrise is a 1991 film.\n\n"
        "Grounding step: extract the evidence for query 1.",
    Q + H1 + "\n\nReasoning step: answer the question or write the next query.",
    Q + H1 + "\nQuery 2: birthplace of Ana Reyes\n\nRetrieved documents for query 2:\n"
             "Doc 1 (Ana Reyes) Ana Reyes was born in Velmora.\n\n"
             "Grounding step: extract the evidence for query 2.",
    Q + H1 + "\nQuery 2: birthplace of Ana Reyes\nEvidence 2: Ana Reyes was born in Velmora.\n\n"
             "Reasoning step: answer the question or write the next query.",
]
GUIDED = dict(zip(IN, [
    "So the next query is <query>director of Moonfall</query>",
    "<evidence>Moonfall is a 1990 film directed by Ana Reyes.</evidence>",
    "So the next query is <query>birthplace of Ana Reyes</query>",
    "<evidence>Ana Reyes was born in Velmora.</evidence>",
    "So the answer is <answer>Velmora</answer>",
]))
DOCS = {"director of Moonfall": [D1, DX], "birthplace of Ana Reyes": [D2]}


def step(state, kind, user, response, logprob, query=None, retrieved=(), evidence=None,
         answer=None):
    return {"state": state, "kind": kind, "prompt": chatml(user), "response": response,
            "query": query, "retrieved": list(retrieved), "evidence": evidence, "answer": answer,
            "logprob": logprob}


TRACE = {
    "id": "q7", "question": "Where was the director of Moonfall born?",
    "golden_answers": ["Velmora"], "prediction": "Velmora", "retrievals": 2, "iterations": 3,
    "steps": [
        step("reasoning", "query", IN[0],
             "So the next query is <query>director of Moonfall</query>",
             -3.0, query="director of Moonfall", retrieved=["d1", "dx"]),
        step("grounding", "evidence", IN[1],
             "<evidence>Moonfall is a 1990 film directed by Ana Reyes.</evidence>", -9.0,
             evidence="Moonfall is a 1990 film directed by Ana Reyes."),
        step("reasoning", "query", IN[2],
             "So the next query is <query>birthplace of Ana Reyes</query>", -4.0,
             query="birthplace of Ana Reyes", retrieved=["d2"]),
        step("grounding", "evidence", IN[3], "<evidence>Ana Reyes was born in Velmora.</evidence>",
             -6.0, evidence="Ana Reyes was born in Velmora."),
        step("reasoning", "answer", IN[4], "So the answer is <answer>Velmora</answer>", -1.0,
             answer="Velmora"),
    ]}


def run(script, cfg, examples=(EXAMPLE,), docs=DOCS, temperature=0.0, seeds=None):
    policy, retriever = ScriptedPolicy(script), FakeRetriever(docs)
    runner = EpisodeRunner(policy, retriever, cfg)
    seeds = seeds if seeds is not None else list(range(len(examples)))
    eps = [r[0] for r in runner.finish(runner.start(examples), temperature, seeds)]
    return eps, policy.calls, retriever.calls


def test_guided_reproduces_hand_written_trace():
    (ep,), calls, searches = run(GUIDED, AgentConfig(mode="guided", num_passages=2))
    assert ep.to_trace() == TRACE
    assert ep.done and ep.next_state == "terminal" and ep.prediction == "Velmora"
    assert [s.input for s in ep.steps] == IN
    assert {s.instruction for s in ep.steps} == {P.INSTRUCTION}
    assert calls == [("score", 1), ("generate", 1, 1), ("generate", 1, 1), ("score", 1),
                     ("generate", 1, 1), ("generate", 1, 1), ("score", 1), ("generate", 1, 1)]
    assert searches == [("search", ["director of Moonfall"]),
                        ("search", ["birthplace of Ana Reyes"])]


def test_free_mode_parses_what_the_model_writes():
    free = dict(zip(IN, [
        "I do not know Moonfall. So the next query is <query>director of Moonfall</query>",
        "Doc 1 says it. <evidence>Moonfall is a 1990 film directed by Ana Reyes.</evidence>",
        "Now the birthplace. So the next query is <query>birthplace of Ana Reyes</query>",
        "<evidence>Ana Reyes was born in Velmora.</evidence>",
        "She was born in Velmora. So the answer is <answer>Velmora</answer> extra",
    ]))
    (ep,), calls, _ = run(free, AgentConfig(mode="free", num_passages=2))
    trace = ep.to_trace()
    assert [s["response"] for s in trace["steps"]] == [
        free[IN[0]], free[IN[1]], free[IN[2]], free[IN[3]],
        "She was born in Velmora. So the answer is <answer>Velmora</answer>"]   # stopped at tag
    keep = ("state", "kind", "query", "retrieved", "evidence", "answer")
    assert [{k: s[k] for k in keep} for s in trace["steps"]] == \
        [{k: s[k] for k in keep} for s in TRACE["steps"]]
    assert trace["steps"][0]["logprob"] == -13.0
    assert all(c[0] == "generate" for c in calls)        # the model chooses its own tags


def test_forced_answer_at_the_cap():
    forced_in = Q + H1 + "\n\n" + P.FORCED_TASK
    script = {**GUIDED, forced_in: ["So the answer is <answer>Ana Reyes</answer>",
                                    "So the next query is <query>never used</query>"]}
    (ep,), calls, _ = run(script, AgentConfig(max_retrievals=1, num_passages=2))
    assert [(s.kind, s.content) for s in ep.steps] == [
        ("query", "director of Moonfall"),
        ("evidence", "Moonfall is a 1990 film directed by Ana Reyes."), ("answer", "Ana Reyes")]
    assert ep.steps[-1].input == forced_in
    assert ep.steps[-1].logprob == -2.0                   # no scaffold choice at the cap
    assert calls.count(("score", 1)) == 1


def test_empty_query_retrieves_nothing_and_forces_the_answer():
    forced_in = Q + "\n\n" + P.FORCED_TASK
    script = {IN[0]: "So the next query is <query> </query>",
              forced_in: "Velmora, I guess"}
    (ep,), _, searches = run(script, AgentConfig())
    assert [(s.kind, s.content, s.retrieved) for s in ep.steps] == [
        ("query", "", ()), ("answer", "Velmora, I guess", ())]
    assert ep.steps[1].response == "So the answer is <answer>Velmora, I guess"
    assert (ep.num_retrievals, ep.num_iterations, searches) == (0, 2, [])
    (free_ep,), _, _ = run(script, AgentConfig(mode="free"))
    assert free_ep.prediction == "Velmora, I guess"


def test_length_cut_keeps_what_was_written():
    script = {IN[0]: "So the next query is <query>director of Moonfall</query>",
              Q + "\nQuery 1: director of\n\nRetrieved documents for query 1:\n(none)\n\n"
                  "Grounding step: extract the evidence for query 1.": "<evidence>None</evidence>",
              Q + "\nQuery 1: director of\nEvidence 1: None\n\n"
                  "Reasoning step: no more searches are allowed, so give the final answer.":
                  "So the answer is <answer>unknown</answer>"}
    (ep,), _, searches = run(script, AgentConfig(max_retrievals=1, max_step_tokens=2))
    assert [(s.kind, s.content) for s in ep.steps] == [
        ("query", "director of"), ("evidence", "None"), ("answer", "unknown")]
    assert searches == [("search", ["director of"])]
    assert ep.to_trace()["steps"][1]["evidence"] is None


def one_hop(i, direct=False):
    """Question i: answered directly (1 step) or after one retrieval (3 steps)."""
    q = f"What is item {i}?"
    first = f"Question: {q}\n\nReasoning step: answer the question or write the next query."
    ex = QAExample(id=f"x{i}", question=q, golden_answers=(f"a{i}",), metadata={"hops": 1})
    if direct:
        return ex, {first: f"So the answer is <answer>a{i}</answer>"}
    ground = (f"Question: {q}\nQuery 1: item {i}\n\nRetrieved documents for query 1:\n"
              f"Doc 1 (Item {i}) Item {i} is a{i}.\n\nGrounding step: extract the evidence for "
              "query 1.")
    second = (f"Question: {q}\nQuery 1: item {i}\nEvidence 1: {{}}\n\n"
              "Reasoning step: answer the question or write the next query.")
    return ex, {first: f"So the next query is <query>item {i}</query>",
                ground: [f"<evidence>Item {i} is a{i}.</evidence>", "<evidence>None</evidence>"],
                second.format(f"Item {i} is a{i}."): [f"So the answer is <answer>a{i}</answer>",
                                                     "So the answer is <answer>x"],
                second.format("None"): "So the answer is <answer>unknown</answer>"}


ITEM_DOCS = {f"item {i}": [Doc(f"d{i}", f"Item {i}\nItem {i} is a{i}.")] for i in range(9)}


def mixed_batch():
    """A (2 hops, 5 steps), B (3 steps), C (1 step), D (3 steps), E (1 step)."""
    parts = [(EXAMPLE, GUIDED), one_hop(1), one_hop(2, direct=True), one_hop(3),
             one_hop(4, direct=True)]
    script = {k: v for _, s in parts for k, v in s.items()}
    return [ex for ex, _ in parts], script, {**DOCS, **ITEM_DOCS}


def test_finished_rows_free_their_slot():
    examples, script, docs = mixed_batch()
    policy, retriever = ScriptedPolicy(script), FakeRetriever(docs)
    runner = EpisodeRunner(policy, retriever, AgentConfig(batch_size=2, num_passages=2))
    order = [ex_i for ex_i, r, _ in runner.rollouts(runner.start(examples), 0.0, range(5))]
    assert order == [1, 2, 0, 4, 3]            # B, C, A, E, D finish in this order
    # rounds: AB AB AB | AC | AD | DE | D  -- every call batched over the rows that need it
    assert [c[1] for c in policy.calls if c[0] == "generate"] == [2, 2, 2, 2, 2, 2, 1]
    assert [c[1] for c in policy.calls if c[0] == "score"] == [2, 2, 1, 2, 1, 1]
    assert retriever.calls == [("search", ["director of Moonfall", "item 1"]),
                               ("search", ["birthplace of Ana Reyes"]), ("search", ["item 3"])]


def test_rows_do_not_depend_on_their_batch():
    examples, script, docs = mixed_batch()
    seeds = [11, 12, 13, 14, 15]
    together, _, _ = run(script, AgentConfig(batch_size=16, num_passages=2), examples, docs,
                         temperature=0.7, seeds=seeds)
    small, _, _ = run(script, AgentConfig(batch_size=2, num_passages=2), examples, docs,
                      temperature=0.7, seeds=seeds)
    alone = [run(script, AgentConfig(num_passages=2), [ex], docs, 0.7, [s])[0][0]
             for ex, s in zip(examples, seeds)]
    assert together == small == alone
    other, _, _ = run(script, AgentConfig(num_passages=2), examples, docs, 0.7, [21] * 5)
    assert other != together                   # the seeds do matter at temperature > 0


def test_expand_gives_n_alternatives_per_unfinished_episode():
    script = {IN[0]: ["So the next query is <query>director of Moonfall</query>",
                      "So the answer is <answer>Velmora</answer>",
                      "So the next query is <query>Moonfall director</query>"]}
    docs = {**DOCS, "Moonfall director": [D1]}
    policy, retriever = ScriptedPolicy(script), FakeRetriever(docs)
    runner = EpisodeRunner(policy, retriever, AgentConfig(num_passages=2))
    (root,) = runner.start([EXAMPLE])
    finished = Episode(EXAMPLE, root.steps, True, "x")
    kids, none = runner.expand([root, finished], 6, 1.0, [3, 0])
    assert none == [] and len(kids) == 6
    assert all(len(k.steps) == 1 for k in kids)
    assert {k.steps[0].response for k in kids} == set(script[IN[0]])
    for k in kids:
        s = k.steps[0]
        if s.kind == "answer":
            assert k.done and k.prediction == "Velmora" and s.retrieved == ()
        else:
            assert k.next_state == "grounding" and s.retrieved == tuple(docs[s.content][:2])
    assert policy.calls[0] == ("score", 1)
    assert len(retriever.calls) == 1 and len(retriever.calls[0][1]) <= 2   # distinct queries
    again = runner.expand([finished, root], 6, 1.0, [5, 3])[1]
    assert again == kids
    greedy = runner.expand([root], 3, 0.0, [3])[0]
    assert {k.steps[0].content for k in greedy} == {"director of Moonfall"}


def test_expand_takes_the_requested_choice_with_its_own_log_prob():
    # The policy writes the query in 2 of 3 samples: greedy picks it, and log P(answer) = log 1/3.
    script = {IN[0]: ["So the next query is <query>director of Moonfall</query>",
                      "So the next query is <query>Moonfall director</query>",
                      "So the answer is <answer>Velmora</answer>"],
              IN[1]: GUIDED[IN[1]]}
    runner = EpisodeRunner(ScriptedPolicy(script), FakeRetriever(DOCS), AgentConfig(num_passages=2))
    (root,) = runner.start([EXAMPLE])
    (policy,), (answer,) = (runner.expand([root], 1, 0.0, [3], choices)[0]
                            for choices in ([None], ["answer"]))
    assert policy.steps[0].kind == "query"
    assert (answer.steps[0].kind, answer.prediction, answer.done) == ("answer", "Velmora", True)
    assert answer.steps[0].logprob == pytest.approx(np.log(1 / 3) - 1.0)   # choice + 1 word
    (query,) = runner.expand([root], 1, 0.0, [3], ["query"])[0]
    assert query.steps[0].content == "director of Moonfall"
    # A grounding step has no choice to make: the request does not apply.
    (grounded,) = runner.expand([query], 1, 0.0, [3], ["answer"])[0]
    assert grounded.steps[-1].kind == "evidence"
    free = EpisodeRunner(ScriptedPolicy(script), FakeRetriever(DOCS),
                         AgentConfig(mode="free", num_passages=2))
    (free_answer,) = free.expand([root], 1, 0.0, [3], ["answer"])[0]
    assert free_answer.steps[0].response == "So the answer is <answer>Velmora</answer>"


def test_finish_k_rollouts():
    examples, script, docs = mixed_batch()
    runner = EpisodeRunner(ScriptedPolicy(script), FakeRetriever(docs),
                           AgentConfig(batch_size=3, num_passages=2))
    out = runner.finish(runner.start(examples[1:2]), 1.0, [7], k=4)
    assert len(out) == 1 and len(out[0]) == 4 and all(ep.done for ep in out[0])
    assert len({ep.steps for ep in out[0]}) > 1             # rollouts differ
    assert runner.finish(runner.start(examples[1:2]), 1.0, [7], k=4) == out
    done = out[0][0]
    assert runner.finish([done], 1.0, [0], k=2) == [[done, done]]


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="agent.mode"):
        EpisodeRunner(ScriptedPolicy({}), FakeRetriever({}), AgentConfig(mode="chat"))
