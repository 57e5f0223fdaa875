"""Batched agentic-RAG episodes: one runner for evaluation, MCTS expansion and SPRE rollouts.

Episodes are immutable values (an MCTS node keeps its own), and the runner advances many of
them at once, each at its own state, through one decode session of the sampler
(`sampling.DecodeSession`): after every decode chunk the steps whose generations came back are
parsed, their queries retrieved (one `retriever.search` call), and their episodes' next steps
scored for the guided scaffold choice (one `sampler.score` call) and submitted while the other
rows keep decoding — no round waits for its slowest row. Randomness is derived from the row's
seed and its step index only, so a row's trajectory does not depend on which other rows share
its batch or when it joined (up to the last bits of prefill on some CPUs: `sampling`'s
"Determinism").
"""
from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from reasonrag_jax.agent import protocol as P
from reasonrag_jax.config import AgentConfig
from reasonrag_jax.sampling import SamplingParams

if TYPE_CHECKING:
    from pathlib import Path

    from reasonrag_jax.config import Config
    from reasonrag_jax.data.qa import QAExample
    from reasonrag_jax.retrieval.index import Passage
    from reasonrag_jax.sampling import Completion

_SALTS = {"": 1, P.QUERY_SCAFFOLD: 2, P.ANSWER_SCAFFOLD: 3, P.EVIDENCE_SCAFFOLD: 4}
_CHOICE_SALT = 0


@dataclass(frozen=True)
class Step:
    """One protocol step as a trace and a pair side need it (fields commented below)."""
    kind: str                      # "query" | "evidence" | "answer"
    instruction: str               # system message of the step (RAG-ProGuide `instruction`)
    input: str                     # user message of the step (RAG-ProGuide `input`)
    prompt: str                    # chat-templated (instruction, input) + generation prompt
    response: str                  # full assistant text, guided scaffold included
    content: str                   # text inside the step's tag ("" = unusable query,
                                   # "None" = no evidence)
    logprob: float                 # policy log-prob of the text it chose (scaffold choice incl.)
    retrieved: tuple[Passage, ...] = ()      # query steps: passages shown to grounding

    @property
    def state(self) -> str:
        return P.GROUNDING if self.kind == P.EVIDENCE else P.REASONING

    def to_trace(self) -> dict[str, Any]:
        evidence = self.kind == P.EVIDENCE and self.content != P.NO_EVIDENCE
        return {"state": self.state, "kind": self.kind, "prompt": self.prompt,
                "response": self.response,
                "query": self.content if self.kind == P.QUERY else None,
                "retrieved": [p.id for p in self.retrieved],
                "evidence": self.content if evidence else None,
                "answer": self.content if self.kind == P.ANSWER else None,
                "logprob": self.logprob}


@dataclass(frozen=True)
class Episode:
    """An immutable partial or finished episode: `example` (the question), `steps` so far,
    `done` (an answer was given) and `prediction` (that answer). MCTS nodes keep one each."""
    example: QAExample
    steps: tuple[Step, ...] = ()
    done: bool = False
    prediction: str | None = None

    @property
    def next_state(self) -> str:
        """ "reasoning" | "grounding" | "terminal"."""
        return P.next_state(self.steps)

    @property
    def num_retrievals(self) -> int:
        return P.num_queries(self.steps)

    @property
    def num_iterations(self) -> int:
        """Reasoning steps taken (queries, unusable ones included, and the answer)."""
        return sum(1 for s in self.steps if s.kind != P.EVIDENCE)

    @property
    def passages(self) -> list[Passage]:
        """Every passage retrieved during the episode, in order."""
        return [p for s in self.steps for p in s.retrieved]

    def to_trace(self) -> dict[str, Any]:
        ex = self.example
        return {"id": ex.id, "question": ex.question, "golden_answers": list(ex.golden_answers),
                "prediction": self.prediction, "retrievals": self.num_retrievals,
                "iterations": self.num_iterations, "steps": [s.to_trace() for s in self.steps]}

    def advance(self, step: Step) -> Episode:
        done = step.kind == P.ANSWER
        return Episode(self.example, self.steps + (step,), done, step.content if done else None)


@dataclass
class RunnerStats:
    """Where the runner's time goes (wall seconds per phase of a step, host code being the
    rest) and how many steps of each kind it took: with the sampler's `SamplerStats`, the
    breakdown that says which part of an episode to make cheaper."""
    score_s: float = 0.0          # guided scaffold choice (sampler.score)
    generate_s: float = 0.0       # decode session steps (their prefill included)
    retrieve_s: float = 0.0       # retriever.search
    total_s: float = 0.0          # all of the runner's step code
    steps: Counter = field(default_factory=Counter)    # kind → steps taken

    @property
    def host_s(self) -> float:
        return self.total_s - self.score_s - self.generate_s - self.retrieve_s


def runner_scalars(runner: Any) -> dict[str, Any]:
    """How the run used the sampler (prefix reuse, padding, idle decode rows) and where its time
    went, for TensorBoard; empty for a run that had nothing left to do."""
    stats = getattr(getattr(runner, "sampler", None), "stats", None)
    if stats is None:
        return {}
    timing = runner.stats
    return {"sampler": {"prefix_hit_rate": stats.hit_rate,
                        "padding_fraction": stats.padding_fraction,
                        "prompt_tokens": stats.prompt_tokens,
                        "computed_tokens": stats.computed_tokens,
                        "decode_tokens": stats.decode_tokens,
                        "decode_idle_rows": stats.decode_idle},
            "seconds": {"score": timing.score_s, "generate": timing.generate_s,
                        "retrieve": timing.retrieve_s, "host": timing.host_s,
                        "prefill": stats.prefill_s, "decode": stats.decode_s}}


def derive_seed(seed: int, *salts: int) -> int:
    """A 31-bit seed that depends on (seed, salts) only."""
    return int(np.random.SeedSequence([seed % 2**63, *salts]).generate_state(1)[0]) >> 1


def runner_from_config(cfg: Config, policy: str, index_dir: str | Path) -> EpisodeRunner:
    """The runner of `eval` and `generate`: `policy` loaded, its sampler on the config's mesh
    (every process of a pod runs it), the index at `index_dir` as the retriever."""
    from reasonrag_jax.models.policy import load_policy
    from reasonrag_jax.retrieval.index import Retriever
    from reasonrag_jax.sampling import Sampler
    from reasonrag_jax.sharding import make_mesh

    model, tokenizer = load_policy(policy, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype)
    sampler = Sampler(model, tokenizer, cfg.sampler, mesh=make_mesh(cfg.mesh),
                      rules=cfg.mesh.rules)
    return EpisodeRunner(sampler, Retriever.load(index_dir, cfg.retrieval), cfg.agent)


class EpisodeRunner:
    """Advances batches of episodes through the protocol with a sampler and a retriever.

    `sampler` needs `tokenizer` (chat template), `session(params)` (a `DecodeSession`) or
    else `generate(prompts, params, seeds, n)`, and, in guided mode,
    `score(prompts, continuations)`; `retriever` needs `search(queries, k)`.
    """

    def __init__(self, sampler: Any, retriever: Any, cfg: AgentConfig):
        if cfg.mode not in ("guided", "free"):
            raise ValueError(f"agent.mode must be 'guided' or 'free', got {cfg.mode!r}")
        self.sampler, self.retriever, self.cfg = sampler, retriever, cfg
        self.stats = RunnerStats()

    def start(self, examples: Sequence[QAExample]) -> list[Episode]:
        return [Episode(ex) for ex in examples]

    def expand(self, episodes: Sequence[Episode], n: int, temperature: float,
               seeds: Sequence[int]) -> list[list[Episode]]:
        """`n` one-step continuations of each episode (none for a finished one)."""
        live = [i for i, ep in enumerate(episodes) if not ep.done]
        children = self._advance([episodes[i] for i in live], [seeds[i] for i in live], n,
                                 temperature)
        out: list[list[Episode]] = [[] for _ in episodes]
        for i, c in zip(live, children):
            out[i] = c
        return out

    def rollouts(self, episodes: Sequence[Episode], temperature: float, seeds: Sequence[int],
                 k: int = 1) -> Iterator[tuple[int, int, Episode]]:
        """Yield `(episode index, rollout index, finished episode)` as rollouts end.

        At most `cfg.batch_size` rollouts are in flight, and there is no round barrier: the
        moment one step's generation comes back, its episode is advanced (retrieval included)
        and its next step is submitted to the still-decoding session, so a long step never
        holds short ones back and a finished rollout's place goes to the next at once.
        """
        queue = deque((i, r) for i in range(len(episodes)) for r in range(k))
        session = self._session(temperature)
        flight: dict[int, tuple[int, int, Episode, int]] = {}   # key → (i, r, episode, seed)
        steps: dict[int, _Step] = {}
        ready: list[int] = []                                   # keys whose next step is due
        keys = iter(range(len(queue)))
        while queue or flight:
            while queue and len(flight) < self.cfg.batch_size:
                i, r = queue.popleft()
                if episodes[i].done:
                    yield i, r, episodes[i]
                else:
                    key = next(keys)
                    flight[key] = (i, r, episodes[i], derive_seed(seeds[i], r))
                    ready.append(key)
            if ready:
                steps.update(self._begin(session, {key: flight[key][2:] for key in ready}, 1,
                                         temperature))
                ready = []
            taken = self._collect(session, steps)
            advanced = self._complete([steps.pop(key) for key in taken])
            for key, (ep,) in zip(taken, advanced):
                i, r, _, seed = flight[key]
                if ep.done:
                    del flight[key]
                    yield i, r, ep
                else:
                    flight[key] = (i, r, ep, seed)
                    ready.append(key)
        session.close()

    def finish(self, episodes: Sequence[Episode], temperature: float, seeds: Sequence[int],
               k: int = 1) -> list[list[Episode]]:
        """Run every episode to its answer `k` times: `[len(episodes)][k]`."""
        out: list[list[Any]] = [[None] * k for _ in episodes]
        for i, r, ep in self.rollouts(episodes, temperature, seeds, k):
            out[i][r] = ep
        return out

    # -----------------------------------------------------------------------------------------

    def _advance(self, episodes: Sequence[Episode], seeds: Sequence[int], n: int,
                 temperature: float) -> list[list[Episode]]:
        """One protocol step for every episode, `n` alternatives each."""
        session = self._session(temperature)
        steps = self._begin(session, dict(enumerate(zip(episodes, seeds))), n, temperature)
        while session.busy:
            self._collect(session, steps)
        session.close()
        return self._complete([steps[i] for i in range(len(episodes))])

    def _session(self, temperature: float) -> Any:
        """The sampler's decode session for steps at `temperature`; a sampler without one (the
        benchmark's peers, test doubles) gets `RoundSession`: one `generate` call per round."""
        cfg = self.cfg
        params = SamplingParams(max_new_tokens=cfg.max_step_tokens, temperature=temperature,
                                top_p=cfg.top_p, top_k=cfg.top_k, stop=P.CLOSING_TAGS)
        if hasattr(self.sampler, "session"):
            return self.sampler.session(params)
        return RoundSession(self.sampler, params)

    def _begin(self, session: Any, todo: dict[int, tuple[Episode, int]], n: int,
               temperature: float) -> dict[int, _Step]:
        """The next step of each `todo` episode (key → (episode, seed)): its prompt, the guided
        scaffold choice (one `score` call for all of them), and its `n` generations submitted
        to `session`; alternatives sharing a scaffold are `n` samples of one prompt."""
        started = time.perf_counter()
        out: dict[int, _Step] = {}
        for key, (ep, seed) in todo.items():
            t = P.turn(ep.example.question, ep.steps, self.cfg.max_retrievals)
            prompt = P.render(self.sampler.tokenizer, t.instruction, t.input)
            out[key] = _Step(ep, t, prompt, derive_seed(seed, len(ep.steps)))
        clock = time.perf_counter()
        self._scaffolds(list(out.values()), n, temperature)
        self.stats.score_s += time.perf_counter() - clock
        for key, step in out.items():
            groups: dict[str, list[int]] = {}
            for alt, scaffold in enumerate(step.scaffolds):
                groups.setdefault(scaffold, []).append(alt)
            step.groups = groups
            step.completions = [None] * n
            for scaffold, alts in groups.items():
                session.submit(step.prompt + scaffold, derive_seed(step.seed, _SALTS[scaffold]),
                               len(alts), (key, scaffold))
        self.stats.total_s += time.perf_counter() - started
        return out

    def _collect(self, session: Any, steps: dict[int, _Step]) -> list[int]:
        """One session step: its finished generations into `steps` → the keys whose every
        alternative is now back."""
        started = time.perf_counter()
        taken = []
        for (key, scaffold), j, completion in session.step():
            step = steps[key]
            step.completions[step.groups[scaffold][j]] = completion
            if all(c is not None for c in step.completions):
                taken.append(key)
        elapsed = time.perf_counter() - started
        self.stats.generate_s += elapsed
        self.stats.total_s += elapsed
        return taken

    def _complete(self, steps: list[_Step]) -> list[list[Episode]]:
        """The generated steps parsed, their queries retrieved (one `search` call), and each
        episode advanced by each alternative."""
        started = time.perf_counter()
        rows: list[list[Step]] = []
        for st in steps:
            row = []
            for scaffold, logp, comp in zip(st.scaffolds, st.choice_logp, st.completions):
                response = scaffold + comp.text
                if st.turn.state == P.GROUNDING:
                    kind, content = P.EVIDENCE, P.parse_evidence(response) or P.NO_EVIDENCE
                elif st.turn.forced:
                    kind, content = P.ANSWER, P.parse_answer(response)
                else:
                    kind, content = P.parse_reasoning(response)
                row.append(Step(kind, st.turn.instruction, st.turn.input, st.prompt, response,
                                content, float(logp + sum(comp.logprobs))))
            rows.append(row)

        queries = list(dict.fromkeys(s.content for row in rows for s in row
                                     if s.kind == P.QUERY and s.content))
        clock = time.perf_counter()
        found = dict(zip(queries, self.retriever.search(queries, self.cfg.num_passages))) \
            if queries else {}
        self.stats.retrieve_s += time.perf_counter() - clock
        self.stats.steps.update(s.kind for row in rows for s in row)
        self.stats.total_s += time.perf_counter() - started
        return [[st.episode.advance(replace(s, retrieved=tuple(found[s.content]))
                                    if s.kind == P.QUERY and s.content else s) for s in row]
                for st, row in zip(steps, rows)]

    def _scaffolds(self, steps: list[_Step], n: int, temperature: float) -> None:
        """Per step and alternative: the text the runner writes before the model continues, and
        the log-prob of the model choosing it (guided reasoning only)."""
        for st in steps:
            st.scaffolds = [""] * n if self.cfg.mode == "free" else (
                [P.EVIDENCE_SCAFFOLD if st.turn.state == P.GROUNDING else P.ANSWER_SCAFFOLD] * n)
            st.choice_logp = [0.0] * n
        if self.cfg.mode == "free":
            return
        options = (P.QUERY_SCAFFOLD, P.ANSWER_SCAFFOLD)
        choose = [st for st in steps if st.turn.state == P.REASONING and not st.turn.forced]
        if not choose:
            return
        scores = self.sampler.score([st.prompt for st in choose], [list(options)] * len(choose))
        for st, lp in zip(choose, np.asarray(scores, dtype=np.float64)):
            if temperature <= 0:
                picks = [int(np.argmax(lp))] * n
            else:
                z = lp / temperature
                p = np.exp(z - z.max())
                rng = np.random.default_rng(derive_seed(st.seed, _CHOICE_SALT))
                picks = list(rng.choice(len(options), size=n, p=p / p.sum()))
            st.scaffolds = [options[c] for c in picks]
            st.choice_logp = [float(lp[c]) for c in picks]


@dataclass
class _Step:
    """A step being taken: the episode it extends, its turn and prompt, the row seed, the
    chosen scaffolds with their choice log-probs, and the generations as they come back
    (`groups`: scaffold → the alternatives that are its samples)."""
    episode: Episode
    turn: P.Turn
    prompt: str
    seed: int
    scaffolds: list[str] = field(default_factory=list)
    choice_logp: list[float] = field(default_factory=list)
    groups: dict[str, list[int]] = field(default_factory=dict)
    completions: list[Completion | None] = field(default_factory=list)


class RoundSession:
    """`sampling.DecodeSession`'s interface over a sampler that only has `generate`: each step
    generates every waiting request, one call per sample count — the original's structure, one
    batched generation per round over all active questions."""

    def __init__(self, sampler: Any, params: SamplingParams):
        self.sampler, self.params = sampler, params
        self.waiting: list[tuple[str, int, int, Any]] = []

    @property
    def busy(self) -> bool:
        return bool(self.waiting)

    def submit(self, prompt: str, seed: int, n: int, key: Any) -> None:
        self.waiting.append((prompt, seed, n, key))

    def step(self) -> list[tuple[Any, int, Any]]:
        by_n: dict[int, list[tuple[str, int, int, Any]]] = {}
        for request in self.waiting:
            by_n.setdefault(request[2], []).append(request)
        self.waiting = []
        out = []
        for n, requests in sorted(by_n.items()):
            results = self.sampler.generate([r[0] for r in requests], self.params,
                                            [r[1] for r in requests], n=n)
            out += [(r[3], j, c) for r, comps in zip(requests, results) for j, c in enumerate(comps)]
        return out

    def close(self) -> None:
        pass
