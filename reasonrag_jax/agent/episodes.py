"""Batched agentic-RAG episodes: one runner for evaluation, MCTS expansion and SPRE rollouts.

Episodes are immutable values (an MCTS node keeps its own), and the runner advances many of
them at once, each at its own state: per round it makes at most one `sampler.score` call (the
guided scaffold choice), one `sampler.generate` call and one `retriever.search` call, each
batched over every row that needs it. Randomness is derived from the row's seed and its step
index only, so a row's trajectory never depends on which other rows share its batch.
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
    from reasonrag_jax.sampling import Completion, Sampler

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
    """Where the runner's time goes (wall seconds per phase of `_advance`, host code being the
    rest) and how many steps of each kind it took: with the sampler's `SamplerStats`, the
    breakdown that says which part of an episode to make cheaper."""
    score_s: float = 0.0          # guided scaffold choice (sampler.score)
    generate_s: float = 0.0       # sampler.generate
    retrieve_s: float = 0.0       # retriever.search
    total_s: float = 0.0          # all of `_advance`
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
                        "decode_steps": stats.decode_steps,
                        "decode_idle_rows": stats.decode_idle},
            "seconds": {"score": timing.score_s, "generate": timing.generate_s,
                        "retrieve": timing.retrieve_s, "host": timing.host_s,
                        "prefill": stats.prefill_s, "decode": stats.decode_s}}


def derive_seed(seed: int, *salts: int) -> int:
    """A 31-bit seed that depends on (seed, salts) only."""
    return int(np.random.SeedSequence([seed % 2**63, *salts]).generate_state(1)[0]) >> 1


def sampler_from_config(cfg: Config, policy: str) -> Sampler:
    """`policy` loaded, its sampler on the config's mesh (every process of a pod runs it)."""
    from reasonrag_jax.models.policy import load_policy
    from reasonrag_jax.sampling import Sampler
    from reasonrag_jax.sharding import make_mesh

    model, tokenizer = load_policy(policy, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype)
    return Sampler(model, tokenizer, cfg.sampler, mesh=make_mesh(cfg.mesh), rules=cfg.mesh.rules)


def runner_from_config(cfg: Config, policy: str, index_dir: str | Path) -> EpisodeRunner:
    """The runner of `eval` and `generate`: `policy`'s sampler (`sampler_from_config`), the index
    at `index_dir` as the retriever."""
    from reasonrag_jax.retrieval.index import Retriever

    return EpisodeRunner(sampler_from_config(cfg, policy), Retriever.load(index_dir, cfg.retrieval),
                         cfg.agent)


class EpisodeRunner:
    """Advances batches of episodes through the protocol with a sampler and a retriever.

    `sampler` needs `tokenizer` (chat template), `generate(prompts, params, seeds, n)` and, in
    guided mode, `score(prompts, continuations)`; `retriever` needs `search(queries, k)`.
    """

    def __init__(self, sampler: Any, retriever: Any, cfg: AgentConfig):
        if cfg.mode not in ("guided", "free"):
            raise ValueError(f"agent.mode must be 'guided' or 'free', got {cfg.mode!r}")
        self.sampler, self.retriever, self.cfg = sampler, retriever, cfg
        self.stats = RunnerStats()

    def start(self, examples: Sequence[QAExample]) -> list[Episode]:
        return [Episode(ex) for ex in examples]

    def expand(self, episodes: Sequence[Episode], n: int, temperature: float,
               seeds: Sequence[int], choices: Sequence[str | None] | None = None
               ) -> list[list[Episode]]:
        """`n` one-step continuations of each episode (none for a finished one). `choices`:
        per episode, the reasoning choice (`query` or `answer`) its continuations must take
        instead of the policy's, or None; it applies where the episode is at a reasoning step
        the agent may choose at (not grounding, not the forced answer at the cap)."""
        live = [i for i, ep in enumerate(episodes) if not ep.done]
        children = self._advance([episodes[i] for i in live], [seeds[i] for i in live], n,
                                 temperature, [choices[i] for i in live] if choices else None)
        out: list[list[Episode]] = [[] for _ in episodes]
        for i, c in zip(live, children):
            out[i] = c
        return out

    def rollouts(self, episodes: Sequence[Episode], temperature: float, seeds: Sequence[int],
                 k: int = 1) -> Iterator[tuple[int, int, Episode]]:
        """Yield `(episode index, rollout index, finished episode)` as rollouts end.

        At most `cfg.batch_size` rollouts are in flight; a finished one frees its slot for the
        next at once, so long episodes do not hold short ones back.
        """
        queue = deque((i, r) for i in range(len(episodes)) for r in range(k))
        flight: list[tuple[int, int, Episode, int]] = []
        while queue or flight:
            while queue and len(flight) < self.cfg.batch_size:
                i, r = queue.popleft()
                if episodes[i].done:
                    yield i, r, episodes[i]
                else:
                    flight.append((i, r, episodes[i], derive_seed(seeds[i], r)))
            if not flight:
                continue
            advanced = self._advance([f[2] for f in flight], [f[3] for f in flight], 1,
                                     temperature)
            kept = []
            for (i, r, _, seed), (ep,) in zip(flight, advanced):
                if ep.done:
                    yield i, r, ep
                else:
                    kept.append((i, r, ep, seed))
            flight = kept

    def finish(self, episodes: Sequence[Episode], temperature: float, seeds: Sequence[int],
               k: int = 1) -> list[list[Episode]]:
        """Run every episode to its answer `k` times: `[len(episodes)][k]`."""
        out: list[list[Any]] = [[None] * k for _ in episodes]
        for i, r, ep in self.rollouts(episodes, temperature, seeds, k):
            out[i][r] = ep
        return out

    # -----------------------------------------------------------------------------------------

    def _advance(self, episodes: Sequence[Episode], seeds: Sequence[int], n: int,
                 temperature: float, choices: Sequence[str | None] | None = None
                 ) -> list[list[Episode]]:
        """One protocol step for every (unfinished) episode, `n` alternatives each (`choices`:
        as in `expand`)."""
        if not episodes:
            return []
        started = time.perf_counter()
        turns = [P.turn(ep.example.question, ep.steps, self.cfg.max_retrievals) for ep in episodes]
        prompts = [P.render(self.sampler.tokenizer, t.instruction, t.input) for t in turns]
        seeds = [derive_seed(s, len(ep.steps)) for s, ep in zip(seeds, episodes)]
        clock = time.perf_counter()
        scaffolds, choice_logp = self._scaffolds(turns, prompts, seeds, n, temperature, choices)
        self.stats.score_s += time.perf_counter() - clock
        clock = time.perf_counter()
        completions = self._generate(prompts, scaffolds, seeds, temperature)
        self.stats.generate_s += time.perf_counter() - clock

        steps: list[list[Step]] = []
        for t, prompt, row_scaffolds, row_logp, row_comps in zip(
                turns, prompts, scaffolds, choice_logp, completions):
            row = []
            for scaffold, logp, comp in zip(row_scaffolds, row_logp, row_comps):
                response = scaffold + comp.text
                if t.state == P.GROUNDING:
                    kind, content = P.EVIDENCE, P.parse_evidence(response) or P.NO_EVIDENCE
                elif t.forced:
                    kind, content = P.ANSWER, P.parse_answer(response)
                else:
                    kind, content = P.parse_reasoning(response)
                row.append(Step(kind, t.instruction, t.input, prompt, response, content,
                                float(logp + sum(comp.logprobs))))
            steps.append(row)

        queries = list(dict.fromkeys(s.content for row in steps for s in row
                                     if s.kind == P.QUERY and s.content))
        clock = time.perf_counter()
        found = dict(zip(queries, self.retriever.search(queries, self.cfg.num_passages))) \
            if queries else {}
        self.stats.retrieve_s += time.perf_counter() - clock
        self.stats.steps.update(s.kind for row in steps for s in row)
        self.stats.total_s += time.perf_counter() - started
        return [[ep.advance(replace(s, retrieved=tuple(found[s.content]))
                            if s.kind == P.QUERY and s.content else s) for s in row]
                for ep, row in zip(episodes, steps)]

    def _scaffolds(self, turns: list[P.Turn], prompts: list[str], seeds: list[int], n: int,
                   temperature: float, choices: Sequence[str | None] | None
                   ) -> tuple[list[list[str]], list[list[float]]]:
        """Per row and alternative: the text the runner writes before the model continues, and
        the log-prob of the model choosing it (guided reasoning only). A row's requested
        choice (`choices`) replaces the policy's; in free mode it is the only text written."""
        choices, options = choices or [None] * len(turns), P.CHOICE_SCAFFOLDS
        choose = [i for i, t in enumerate(turns) if t.state == P.REASONING and not t.forced]
        if self.cfg.mode == "free":
            scaffolds = [[""] * n for _ in turns]
            for i in choose:
                if choices[i]:
                    scaffolds[i] = [options[P.CHOICES.index(choices[i])]] * n
            return scaffolds, [[0.0] * n for _ in turns]
        scores = self.sampler.score([prompts[i] for i in choose], [list(options)] * len(choose)) \
            if choose else np.zeros((0, 2))
        scaffolds = [[P.EVIDENCE_SCAFFOLD if t.state == P.GROUNDING else P.ANSWER_SCAFFOLD] * n
                     for t in turns]
        logps = [[0.0] * n for _ in turns]
        for i, lp in zip(choose, np.asarray(scores, dtype=np.float64)):
            if choices[i]:
                picks = [P.CHOICES.index(choices[i])] * n
            elif temperature <= 0:
                picks = [int(np.argmax(lp))] * n
            else:
                z = lp / temperature
                p = np.exp(z - z.max())
                rng = np.random.default_rng(derive_seed(seeds[i], _CHOICE_SALT))
                picks = list(rng.choice(len(options), size=n, p=p / p.sum()))
            scaffolds[i] = [options[c] for c in picks]
            logps[i] = [float(lp[c]) for c in picks]
        return scaffolds, logps

    def _generate(self, prompts: list[str], scaffolds: list[list[str]], seeds: list[int],
                  temperature: float) -> list[list[Completion]]:
        """Completions after each (row, scaffold); alternatives sharing a scaffold are `n`
        samples of one prompt. One sampler call per distinct group size (one when n = 1)."""
        cfg = self.cfg
        params = SamplingParams(max_new_tokens=cfg.max_step_tokens, temperature=temperature,
                                top_p=cfg.top_p, top_k=cfg.top_k, stop=P.CLOSING_TAGS)
        groups: dict[tuple[int, str], list[int]] = {}
        for row, row_scaffolds in enumerate(scaffolds):
            for alt, scaffold in enumerate(row_scaffolds):
                groups.setdefault((row, scaffold), []).append(alt)
        by_size: dict[int, list[tuple[int, str]]] = {}
        for key, alts in groups.items():
            by_size.setdefault(len(alts), []).append(key)
        out: list[list[Any]] = [[None] * len(s) for s in scaffolds]
        for size, keys in sorted(by_size.items()):
            results = self.sampler.generate(
                [prompts[row] + scaffold for row, scaffold in keys], params,
                [derive_seed(seeds[row], _SALTS[scaffold]) for row, scaffold in keys], n=size)
            for key, comps in zip(keys, results):
                for alt, comp in zip(groups[key], comps):
                    out[key[0]][alt] = comp
        return out
