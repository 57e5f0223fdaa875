"""Protocol: every malformed output has its defined outcome; prompts and transitions by hand."""
import re
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reasonrag_jax.agent import protocol as P
from reasonrag_jax.config import AgentConfig
from reasonrag_jax.data.qa import QAExample


@pytest.mark.parametrize("text, expected", [
    # well-formed
    ("So the next query is <query>birthplace of Ana Reyes</query>",
     ("query", "birthplace of Ana Reyes")),
    ("Moonfall needs no search. So the answer is <answer>Velmora</answer>",
     ("answer", "Velmora")),
    # both tags: the first opening tag decides
    ("So the next query is <query>a</query> So the answer is <answer>b</answer>", ("query", "a")),
    ("So the answer is <answer>b</answer> So the next query is <query>a</query>", ("answer", "b")),
    ("<answer>b<query>c</query>", ("answer", "b")),
    # empty tags: nothing usable -> empty query (forced answer next)
    ("So the next query is <query> </query>", ("query", "")),
    ("So the answer is <answer></answer>", ("query", "")),
    # a stop in the middle: cut by the token limit, or by another tag's stop string
    ("So the next query is <query>birthplace of", ("query", "birthplace of")),
    ("So the next query is <query>Ana Reyes</evidence>", ("query", "Ana Reyes")),
    ("So the answer is <answer>\nVelmora\nThe director of Moonfall was", ("answer", "Velmora")),
    # untagged text: the phrases count as tags around the rest of their line
    ("So the answer is Velmora.", ("answer", "Velmora")),
    ('so the next query is "Ana Reyes birthplace"\nand then', ("query", "Ana Reyes birthplace")),
    # untagged, no phrase: nothing usable
    ("I think it is Velmora.", ("query", "")),
    ("", ("query", "")),
])
def test_parse_reasoning(text, expected):
    assert P.parse_reasoning(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("<evidence>Ana Reyes was born in Velmora.</evidence>", "Ana Reyes was born in Velmora."),
    ("Based on the query, the relevant evidence is <evidence>Ana was born in Velmora</evidence>.",
     "Ana was born in Velmora"),
    ("<evidence>None</evidence>", None),
    ("<evidence>none.</evidence>", None),
    ("<evidence> </evidence>", None),
    ("Ana Reyes was born in Velmora.", None),          # untagged
    ("<evidence>Ana Reyes was born", "Ana Reyes was born"),  # cut mid-text
    ("<evidence>Ana</query>", "Ana"),
])
def test_parse_evidence(text, expected):
    assert P.parse_evidence(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("So the answer is <answer>Velmora</answer>", "Velmora"),
    ("So the answer is Velmora.", "Velmora"),
    ("Velmora\nbecause she was born there", "Velmora"),
    ("So the next query is <query>birthplace</query>", "So the next query is birthplace"),
    ("<answer>Velm", "Velm"),
    ("", ""),
])
def test_parse_answer_accepts_any_text(text, expected):
    assert P.parse_answer(text) == expected


PIECES = st.sampled_from(["<query>", "</query>", "<answer>", "</answer>", "<evidence>",
                          "</evidence>", "So the answer is ", "So the next query is ", "None",
                          "\n", " ", "Velmora", ".", "<", ">", "/", "que", "ry>", '"'])


@given(st.lists(st.one_of(PIECES, st.text(max_size=4)), max_size=16).map("".join))
def test_parsers_never_raise_and_return_clean_content(text):
    kind, content = P.parse_reasoning(text)
    assert kind in ("query", "answer")
    for c in (content, P.parse_evidence(text) or "", P.parse_answer(text)):
        assert not re.search(r"</?(query|answer|evidence)>", c)
        assert c == c.strip() and "\n" not in c


def test_format_passage():
    assert P.format_passage(2, "Moonfall\nMoonfall is a 1990\nfilm.") == \
        "Doc 2 (Moonfall) Moonfall is a 1990 film."
    assert P.format_passage(1, "untitled text") == "Doc 1 untitled text"


def test_inputs_are_hand_written():
    assert P.reasoning_input(" Who? ", []) == (
        "Question: Who?\n\nReasoning step: answer the question or write the next query.")
    assert P.reasoning_input("Who?", [("q1", "e1"), ("q2", "None")], forced=True) == (
        "Question: Who?\nQuery 1: q1\nEvidence 1: e1\nQuery 2: q2\nEvidence 2: None\n\n"
        "Reasoning step: no more searches are allowed, so give the final answer.")
    assert P.grounding_input("Who?", [("q1", "e1")], "q2", ["T\nx y", "z"]) == (
        "Question: Who?\nQuery 1: q1\nEvidence 1: e1\nQuery 2: q2\n\n"
        "Retrieved documents for query 2:\nDoc 1 (T) x y\nDoc 2 z\n\n"
        "Grounding step: extract the evidence for query 2.")
    assert "(none)" in P.grounding_input("Who?", [], "q", [])


class ChatML:
    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                       for m in messages) + "<|im_start|>assistant\n"


def test_render_uses_the_chat_template():
    assert P.render(ChatML(), "sys", "user") == (
        "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nuser<|im_end|>\n"
        "<|im_start|>assistant\n")


@dataclass(frozen=True)
class S:   # the fields of episodes.Step that transitions read
    kind: str
    content: str
    retrieved: tuple = ()


@dataclass(frozen=True)
class Doc:
    id: str
    contents: str
    score: float = 0.0


def test_transitions_and_forced_answer_at_cap():
    q1 = S("query", "q1", (Doc("d1", "T\nx"),))
    e1 = S("evidence", "e1")
    assert P.next_state([]) == P.REASONING
    assert P.next_state([q1]) == P.GROUNDING
    assert P.next_state([q1, e1]) == P.REASONING
    assert P.next_state([q1, e1, S("answer", "")]) == P.TERMINAL
    assert P.next_state([S("query", "")]) == P.REASONING

    t = P.turn("Who?", [q1], max_retrievals=2)
    assert (t.state, t.forced) == (P.GROUNDING, False)
    assert t.input.endswith("Doc 1 (T) x\n\nGrounding step: extract the evidence for query 1.")
    assert not P.turn("Who?", [q1, e1], max_retrievals=2).forced
    capped = P.turn("Who?", [q1, e1], max_retrievals=1)
    assert (capped.state, capped.forced) == (P.REASONING, True)
    assert capped.input == P.reasoning_input("Who?", [("q1", "e1")], forced=True)
    assert P.turn("Who?", [], max_retrievals=0).forced                # closed book
    after_empty = P.turn("Who?", [q1, e1, S("query", "")], max_retrievals=4)
    assert after_empty.forced and after_empty.input == capped.input
    assert P.history([q1, S("evidence", "None")]) == [("q1", "None")]
    with pytest.raises(ValueError):
        P.turn("Who?", [S("answer", "x")], max_retrievals=2)


class ChainRetriever:
    def __init__(self, docs):
        self.docs, self.calls = docs, []

    def search(self, queries, k):
        self.calls.append((list(queries), k))
        return [self.docs[q][:k] for q in queries]


D1 = Doc("d1", "Moonfall\nMoonfall is a 1990 film directed by Ana Reyes.")
D2 = Doc("d2", "Ana Reyes\nAna Reyes was born in Velmora.")
DX = Doc("dx", "Sunrise\nSunrise is a 1991 film.")
EXAMPLE = QAExample(
    id="q7", question="Where was the director of Moonfall born?", golden_answers=("Velmora",),
    metadata={"hops": 2, "type": "composition", "gold_chain": [
        {"query": "director of Moonfall", "doc_id": "d1",
         "evidence": "Moonfall is a 1990 film directed by Ana Reyes."},
        {"query": "birthplace of Ana Reyes", "doc_id": "d2",
         "evidence": "Ana Reyes was born in Velmora."}]})


def test_gold_sft_records():
    retriever = ChainRetriever({"director of Moonfall": [D1, DX, D2],
                                "birthplace of Ana Reyes": [DX, D2]})
    records = P.gold_sft_records(EXAMPLE, retriever, AgentConfig(num_passages=2))
    assert retriever.calls == [(["director of Moonfall", "birthplace of Ana Reyes"], 2)]
    q = "Question: Where was the director of Moonfall born?"
    h1 = ("\nQuery 1: director of Moonfall\n"
          "Evidence 1: Moonfall is a 1990 film directed by Ana Reyes.")
    h2 = "\nQuery 2: birthplace of Ana Reyes\nEvidence 2: Ana Reyes was born in Velmora."
    assert records == [
        {"instruction": P.INSTRUCTION, "input": q + "\n\n" + P.REASONING_TASK,
         "output": "So the next query is <query>director of Moonfall</query>"},
        {"instruction": P.INSTRUCTION,
         "input": q + "\nQuery 1: director of Moonfall\n\nRetrieved documents for query 1:\n"
                      "Doc 1 (Moonfall) Moonfall is a 1990 film directed by Ana Reyes.\n"
                      "Doc 2 (Sunrise) Sunrise is a 1991 film.\n\n"
                      "Grounding step: extract the evidence for query 1.",
         "output": "<evidence>Moonfall is a 1990 film directed by Ana Reyes.</evidence>"},
        {"instruction": P.INSTRUCTION, "input": q + h1 + "\n\n" + P.REASONING_TASK,
         "output": "So the next query is <query>birthplace of Ana Reyes</query>"},
        {"instruction": P.INSTRUCTION,
         "input": q + h1 + "\nQuery 2: birthplace of Ana Reyes\n\nRetrieved documents for query 2:"
                           "\nDoc 1 (Sunrise) Sunrise is a 1991 film.\n"
                           "Doc 2 (Ana Reyes) Ana Reyes was born in Velmora.\n\n"
                           "Grounding step: extract the evidence for query 2.",
         "output": "<evidence>Ana Reyes was born in Velmora.</evidence>"},
        {"instruction": P.INSTRUCTION, "input": q + h1 + h2 + "\n\n" + P.REASONING_TASK,
         "output": "So the answer is <answer>Velmora</answer>"},
        # the chain as if capped at its 2 retrievals: the forced-answer prompt is trained too,
        # but not the scaffold the runner writes there (it would teach the choice to answer)
        {"instruction": P.INSTRUCTION, "input": q + h1 + h2 + "\n\n" + P.FORCED_TASK,
         "output_prefix": "So the answer is <answer>", "output": "Velmora</answer>"},
    ]
    # at the cap the forced prompt is the only one the runner shows, as at inference
    capped = P.gold_sft_records(EXAMPLE, retriever, AgentConfig(num_passages=2, max_retrievals=2))
    assert capped == records[:4] + records[5:]
    # free mode: the model writes the forced answer whole, so all of it is trained
    free = P.gold_sft_records(EXAMPLE, retriever, AgentConfig(num_passages=2, mode="free"))
    assert free[5] == {**records[4], "input": records[5]["input"]}


def test_gold_sft_records_skips_chains_the_runner_cannot_follow():
    missed = ChainRetriever({"director of Moonfall": [D1], "birthplace of Ana Reyes": [DX]})
    assert P.gold_sft_records(EXAMPLE, missed, AgentConfig()) == []
    found = ChainRetriever({"director of Moonfall": [D1], "birthplace of Ana Reyes": [D2]})
    assert P.gold_sft_records(EXAMPLE, found, AgentConfig(max_retrievals=1)) == []
    assert len(P.gold_sft_records(EXAMPLE, found, AgentConfig(max_retrievals=2))) == 5
