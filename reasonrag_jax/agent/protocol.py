"""The ReasonRAG step protocol in one place: prompts, tags, parsing and state transitions.

An episode alternates two states. *Reasoning* ends with `So the next query is <query>…</query>`
or `So the answer is <answer>…</answer>`; a query is sent to the retriever and *Grounding* then
extracts `<evidence>…</evidence>` (or `<evidence>None</evidence>`) from the passages. After
`max_retrievals` queries the reasoning step is forced to answer.

Every step is a single (instruction, input) pair — one system and one user message, the
RAG-ProGuide fields — so traces, preference pairs and SFT records share one format. The
instruction is the same for every state and every question, and the input lists the history
first and the state-specific part last, so consecutive prompts of a question share long
prefixes (a sampler with a prefix cache computes them once).

Parsing never raises. Outcomes for malformed model output:
- reasoning: the first opening tag decides the action; its content is the first non-empty line
  before the next tag of any kind or the end of the text (so a step cut by the token limit or by
  another tag's stop string keeps what was written, and rambling after a newline is dropped).
  No tag: the phrases "So the answer is X" / "So the next query is X" count as tags around the
  rest of their line. Nothing usable (no tag, no phrase, or empty
  content) is recorded as an empty query: nothing is retrieved and the next step is the forced
  answer.
- grounding: the first `<evidence>` content, read the same way; missing tag, empty content or
  "None" → no evidence.
- forced answer: any text is an answer — the tagged answer, else the phrase, else the first
  non-empty line with the tags removed (possibly "").
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

QUERY, EVIDENCE, ANSWER = "query", "evidence", "answer"
TAGS = (QUERY, EVIDENCE, ANSWER)
CLOSING_TAGS = tuple(f"</{t}>" for t in TAGS)      # the sampler's stop strings
QUERY_SCAFFOLD = "So the next query is <query>"
ANSWER_SCAFFOLD = "So the answer is <answer>"
CHOICES = (QUERY, ANSWER)   # what a reasoning step chooses between, with their scaffolds:
CHOICE_SCAFFOLDS = (QUERY_SCAFFOLD, ANSWER_SCAFFOLD)
EVIDENCE_SCAFFOLD = "<evidence>"
NO_EVIDENCE = "None"

REASONING, GROUNDING, TERMINAL = "reasoning", "grounding", "terminal"

INSTRUCTION = """\
Answer the question with a search engine, one step at a time.
Reasoning step: if the question and the evidence so far suffice, end with \
So the answer is <answer>short answer</answer>; otherwise end with \
So the next query is <query>short new search query</query>.
Grounding step: copy the sentence of the retrieved documents that answers the latest query as \
<evidence>sentence</evidence>, or write <evidence>None</evidence>."""

REASONING_TASK = "Reasoning step: answer the question or write the next query."
FORCED_TASK = "Reasoning step: no more searches are allowed, so give the final answer."
GROUNDING_TASK = "Grounding step: extract the evidence for query {n}."

History = Sequence[tuple[str, str]]   # (query, evidence) per completed retrieval round


@dataclass(frozen=True)
class Turn:
    """What the policy is asked next: the state and the messages of the step."""
    state: str                  # REASONING | GROUNDING
    forced: bool                # reasoning may only answer (query cap reached or no usable query)
    instruction: str            # system message
    input: str                  # user message


# ---------------------------------------------------------------------------------------------
# Messages

def _history_lines(question: str, history: History) -> list[str]:
    lines = [f"Question: {question.strip()}"]
    for i, (query, evidence) in enumerate(history, start=1):
        lines += [f"Query {i}: {query}", f"Evidence {i}: {evidence}"]
    return lines


def format_passage(i: int, contents: str) -> str:
    """`Doc i (Title) text` on one line; a FlashRAG passage is "Title\\ntext"."""
    title, _, text = contents.partition("\n")
    if not text:
        title, text = "", title
    text = " ".join(text.split())
    return f"Doc {i} ({title.strip()}) {text}" if title.strip() else f"Doc {i} {text}"


def reasoning_input(question: str, history: History, forced: bool = False) -> str:
    task = FORCED_TASK if forced else REASONING_TASK
    return "\n".join(_history_lines(question, history)) + f"\n\n{task}"


def grounding_input(question: str, history: History, query: str,
                    passages: Sequence[str]) -> str:
    """`passages` are FlashRAG contents strings ("Title\\ntext")."""
    n = len(history) + 1
    lines = _history_lines(question, history) + [f"Query {n}: {query}", "",
                                                 f"Retrieved documents for query {n}:"]
    lines += [format_passage(i, p) for i, p in enumerate(passages, start=1)] or ["(none)"]
    return "\n".join(lines) + "\n\n" + GROUNDING_TASK.format(n=n)


def render(tokenizer: Any, instruction: str, input: str) -> str:
    """Chat-templated prompt text for one step, ending with the assistant generation prompt."""
    messages = [{"role": "system", "content": instruction}, {"role": "user", "content": input}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def query_response(query: str) -> str:
    return f"{QUERY_SCAFFOLD}{query}</query>"


def answer_response(answer: str) -> str:
    return f"{ANSWER_SCAFFOLD}{answer}</answer>"


def evidence_response(evidence: str | None) -> str:
    return f"{EVIDENCE_SCAFFOLD}{evidence or NO_EVIDENCE}</evidence>"


# ---------------------------------------------------------------------------------------------
# Parsing

_TAG = re.compile(r"</?(?:query|evidence|answer)>")
_OPEN = re.compile(r"<(query|evidence|answer)>")
_PHRASES = ((ANSWER, re.compile(r"So the answer is:?[ \t]*(.*)", re.IGNORECASE)),
            (QUERY, re.compile(r"So the next query is:?[ \t]*(.*)", re.IGNORECASE)))


def _tagged(text: str, tags: Sequence[str]) -> tuple[str, str] | None:
    """(tag, content) of the first opening tag among `tags`; content is the first non-empty
    line before the next tag."""
    for m in _OPEN.finditer(text):
        if m.group(1) in tags:
            nxt = _TAG.search(text, m.end())
            span = text[m.end(): nxt.start() if nxt else len(text)]
            return m.group(1), next((ln.strip() for ln in span.splitlines() if ln.strip()), "")
    return None


def _phrase(text: str, tags: Sequence[str]) -> tuple[str, str] | None:
    hits = [(m.start(), tag, m.group(1)) for tag, rx in _PHRASES if tag in tags
            for m in [rx.search(text)] if m]
    if not hits:
        return None
    _, tag, rest = min(hits)
    return tag, _clean(rest)


def _clean(text: str) -> str:
    """Tags removed, first non-empty line, surrounding quotes and final period stripped."""
    while _TAG.search(text):        # removing one tag may join the halves of another
        text = _TAG.sub("", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0].strip("\"'“” ").rstrip(".").strip() if lines else ""


def parse_reasoning(text: str) -> tuple[str, str]:
    """(QUERY | ANSWER, content) of a reasoning step; ("query", "") when nothing is usable."""
    found = _tagged(text, CHOICES) or _phrase(text, CHOICES)
    if found is None or not found[1]:
        return QUERY, ""
    return found


def parse_evidence(text: str) -> str | None:
    found = _tagged(text, (EVIDENCE,))
    if found is None or not found[1] or found[1].rstrip(".").lower() == NO_EVIDENCE.lower():
        return None
    return found[1]


def parse_answer(text: str) -> str:
    """The answer of a forced answer step: any text counts."""
    found = _tagged(text, (ANSWER,)) or _phrase(text, (ANSWER,))
    return found[1] if found else _clean(text)


# ---------------------------------------------------------------------------------------------
# Transitions. A step is anything with `.kind` (QUERY | EVIDENCE | ANSWER), `.content` and,
# for queries, `.retrieved` (passages with `.contents`): episodes.Step.

def history(steps: Sequence[Any]) -> list[tuple[str, str]]:
    """(query, evidence) of every retrieval round completed so far."""
    out, query = [], None
    for s in steps:
        if s.kind == QUERY and s.content:
            query = s.content
        elif s.kind == EVIDENCE and query is not None:
            out.append((query, s.content or NO_EVIDENCE))
            query = None
    return out


def next_state(steps: Sequence[Any]) -> str:
    """REASONING after evidence (or an unusable query), GROUNDING after a query, TERMINAL after
    an answer."""
    if not steps:
        return REASONING
    last = steps[-1]
    if last.kind == ANSWER:
        return TERMINAL
    return GROUNDING if last.kind == QUERY and last.content else REASONING


def num_queries(steps: Sequence[Any]) -> int:
    """Retrievals made (usable queries)."""
    return sum(1 for s in steps if s.kind == QUERY and s.content)


def turn(question: str, steps: Sequence[Any], max_retrievals: int) -> Turn:
    """The next step's state and messages; `max_retrievals` caps the number of queries."""
    state = next_state(steps)
    if state == TERMINAL:
        raise ValueError("episode is finished")
    done = history(steps)
    if state == GROUNDING:
        last = steps[-1]
        text = grounding_input(question, done, last.content, [p.contents for p in last.retrieved])
        return Turn(GROUNDING, False, INSTRUCTION, text)
    forced = num_queries(steps) >= max_retrievals or bool(steps and steps[-1].kind == QUERY)
    return Turn(REASONING, forced, INSTRUCTION, reasoning_input(question, done, forced))


# ---------------------------------------------------------------------------------------------
# Supervised warm-up records from a synthetic gold chain

def gold_sft_records(example: Any, retriever: Any, cfg: Any) -> list[dict[str, str]]:
    """`{"instruction","input","output"}` records for every step of `example`'s gold chain.

    `metadata.gold_chain` is `[{"query", "doc_id", "evidence"}, ...]`; the grounding prompts
    show what `retriever.search(query, cfg.num_passages)` returns, exactly as at inference. A
    chain the runner could not have followed — longer than `cfg.max_retrievals`, or whose gold passage
    is not among the passages retrieved for its query — yields no records rather than teaching
    steps the policy will never be in.

    The final answer is recorded twice when the chain ends below the cap: after the normal
    reasoning prompt and after the forced-answer prompt (the chain as if capped at its length),
    so a policy that searches up to the cap has been taught to answer there too. In guided mode
    the runner writes the answer scaffold at the cap itself, so the forced record carries it as
    `output_prefix` (prompt, no loss): trained, it would double the weight on "So the answer is"
    after reasoning prompts and teach the guided choice to answer before searching.
    """
    chain = example.metadata.get("gold_chain") or []
    if not chain or len(chain) > cfg.max_retrievals or not example.golden_answers:
        return []
    retrieved = retriever.search([link["query"] for link in chain], cfg.num_passages)
    question, done, records = example.question, [], []

    def add(input: str, output: str, prefix: str = "") -> None:
        records.append({"instruction": INSTRUCTION, "input": input, "output": output}
                       | ({"output_prefix": prefix} if prefix else {}))

    for link, passages in zip(chain, retrieved):
        if link["doc_id"] not in {p.id for p in passages}:
            return []
        add(reasoning_input(question, done), query_response(link["query"]))
        add(grounding_input(question, done, link["query"], [p.contents for p in passages]),
            evidence_response(link["evidence"]))
        done.append((link["query"], link["evidence"]))
    answer = answer_response(example.golden_answers[0])
    for forced in (True,) if len(done) >= cfg.max_retrievals else (False, True):
        prefix = ANSWER_SCAFFOLD if forced and cfg.mode == "guided" else ""
        add(reasoning_input(question, done, forced), answer.removeprefix(prefix), prefix)
    return records

