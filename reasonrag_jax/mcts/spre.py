"""Shortest-path reward estimation (SPRE): how good is a partial episode?

value(node) = mean over K rollouts that finish the episode from the node of
              F1(prediction, gold) × β^(steps of the finished episode, counted from the root).
Correct answers score high, and among correct ones the shorter path scores higher, which is
what teaches the policy to stop searching once it knows. A value function is any callable
`(runner, episodes, seeds) -> values`, so an LLM judge could stand in for SPRE.

Default K: each rollout costs a full episode of sampler calls, and the tree already averages
over many visits; K = 2–4 halves the variance of a single rollout at CPU-affordable cost (the
paper's own budget is far higher with GPT-4o rollouts).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from reasonrag_jax.eval.metrics import f1_score

ValueFn = Callable[[Any, Sequence[Any], Sequence[int]], np.ndarray]


def outcome(episode: Any, beta: float) -> float:
    """F1 × β^steps of a finished episode."""
    return f1_score(episode.prediction or "", list(episode.example.golden_answers)) * beta ** len(
        episode.steps)


def spre_values(runner: Any, episodes: Sequence[Any], seeds: Sequence[int], k: int, beta: float,
                temperature: float) -> np.ndarray:
    """SPRE value of each episode; a finished episode is its own (only) rollout."""
    values = np.zeros(len(episodes), np.float32)
    live = [i for i, ep in enumerate(episodes) if not ep.done]
    for i, ep in enumerate(episodes):
        if ep.done:
            values[i] = outcome(ep, beta)
    if live:
        finished = runner.finish([episodes[i] for i in live], temperature, [seeds[i] for i in live], k)
        for i, rollouts in zip(live, finished):
            values[i] = np.mean([outcome(r, beta) for r in rollouts])
    return values
