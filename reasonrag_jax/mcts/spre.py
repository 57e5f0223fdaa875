"""Shortest-path reward estimation (SPRE): how good is a partial episode?

value(node) = mean over K rollouts that finish the episode from the node of
              F1(prediction, gold) × β^(steps of the finished episode, counted from the root).
Correct answers score high, and among correct ones the shorter path scores higher, which is what
teaches the policy to stop searching once it knows. A finished episode is its own only rollout.

The search only needs a *value function* (`ValueFn`): how many rollouts to run from a new node,
at what temperature, and the node's value from them. The search runs the rollouts itself, step
by step with every other tree's work, and keeps their undiscounted F1s: they are complete
trajectories, which is what outcome-reward (ORL) pairs compare. `SPRE` is the default; an LLM
judge (the original's 0–100 score) would need no rollouts, but a batched judge call of its own.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from reasonrag_jax.eval.metrics import f1_score


class ValueFn(Protocol):
    """How good a new tree node is, from the episodes the search finishes from it: it runs
    `rollouts_per_node` rollouts at `temperature` from an unfinished node, none from a finished
    one, interleaved with every other tree's work (`search.search`)."""
    rollouts_per_node: int
    temperature: float

    def value(self, node: Any, rollouts: Sequence[Any]) -> float: ...


def answer_f1(episode: Any) -> float:
    """F1 of a finished episode's answer against the gold answers."""
    return f1_score(episode.prediction or "", list(episode.example.golden_answers))


def outcome(episode: Any, beta: float) -> float:
    """F1 of a finished episode's answer × β^(its number of steps)."""
    return answer_f1(episode) * beta ** len(episode.steps)


@dataclass(frozen=True)
class SPRE:
    """Mean of `outcome` over `k` rollouts at `temperature`.

    Why K = 4 by default: a rollout's outcome lies in [0, 1], so the standard error of the mean
    is at most 0.5/√K — 0.25 at K = 4, half that of one rollout — and the tree averages it
    further over every visit below the node. Rollouts are nearly all of the cost (each is a whole
    episode of sampler rounds, the expansion is one step), so doubling K to halve the error again
    would double the run time.
    """
    k: int = 4
    beta: float = 0.9
    temperature: float = 1.0

    @property
    def rollouts_per_node(self) -> int:
        return self.k

    def value(self, node: Any, rollouts: Sequence[Any]) -> float:
        """`outcome` of a finished node, else its mean over the node's finished rollouts."""
        if node.done:
            return outcome(node, self.beta)
        return float(np.mean([outcome(r, self.beta) for r in rollouts]))
