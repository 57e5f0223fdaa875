"""Shortest-path reward estimation (SPRE): how good is a partial episode?

value(node) = mean over K rollouts that finish the episode from the node of
              F1(prediction, gold) × β^(steps of the finished episode, counted from the root).
Correct answers score high, and among correct ones the shorter path scores higher, which is what
teaches the policy to stop searching once it knows. A finished episode is its own only rollout.

The search only needs a *value function*: any callable `(runner, episodes, seeds) -> Valuation`
(`ValueFn`). `SPRE` is the default; an LLM judge (the original's 0–100 score) would be a second
class with the same call and no rollouts to report. The rollouts' undiscounted F1s come back
too: they are complete trajectories, which is what outcome-reward (ORL) pairs compare.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np

from reasonrag_jax.eval.metrics import f1_score


class Valuation(NamedTuple):
    values: np.ndarray               # [len] float32 in [0, 1], one per episode
    rollout_f1: list[list[float]]    # per episode: final-answer F1 of each rollout run from it


class ValueFn(Protocol):
    rollouts_per_node: int      # episodes run to the end per unfinished node (progress display)

    def __call__(self, runner: Any, episodes: Sequence[Any], seeds: Sequence[int]) -> Valuation:
        """Value of each episode (a new tree node), from one batched evaluation."""


def answer_f1(episode: Any) -> float:
    """F1 of a finished episode's answer against the gold answers."""
    return f1_score(episode.prediction or "", list(episode.example.golden_answers))


def outcome(episode: Any, beta: float) -> float:
    """F1 of a finished episode's answer × β^(its number of steps)."""
    return answer_f1(episode) * beta ** len(episode.steps)


@dataclass(frozen=True)
class SPRE:
    """Mean of `outcome` over `k` rollouts at `temperature`, all rows in ONE `runner.finish`.

    Why K = 4 by default: a rollout's outcome lies in [0, 1], so the standard error of the mean
    is at most 0.5/√K — 0.25 at K = 4, half that of one rollout — and the tree averages it
    further over every visit below the node. Rollouts are nearly all of the cost (each is a whole
    episode of sampler rounds, the expansion is one step), so doubling K to halve the error again
    would double the run time; and with the default 8 questions per search batch, 8 × 4 = 32
    rollouts fill exactly one sampler batch (`sampler.max_batch`).
    """
    k: int = 4
    beta: float = 0.9
    temperature: float = 1.0

    @property
    def rollouts_per_node(self) -> int:
        return self.k

    def __call__(self, runner: Any, episodes: Sequence[Any], seeds: Sequence[int]) -> Valuation:
        values = np.array([outcome(ep, self.beta) if ep.done else 0.0 for ep in episodes],
                          np.float32)
        rollout_f1: list[list[float]] = [[] for _ in episodes]
        live = [i for i, ep in enumerate(episodes) if not ep.done]
        if live:
            finished = runner.finish([episodes[i] for i in live], self.temperature,
                                     [seeds[i] for i in live], self.k)
            for i, rollouts in zip(live, finished):
                values[i] = np.mean([outcome(r, self.beta) for r in rollouts])
                rollout_f1[i] = [answer_f1(r) for r in rollouts]
        return Valuation(values, rollout_f1)
