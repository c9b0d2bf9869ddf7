"""Baseline agents: the learned router itself (greedy), uniform random, balanced round-robin."""

from __future__ import annotations

from typing import Any

import numpy as np

from agents.base import action_widths

__all__ = ["RouterAgent", "RandomAgent", "RoundRobinAgent"]


def _group(obs: np.ndarray, env: Any) -> int:
    return int(np.argmax(obs[: env.G]))  # the observation starts with the group one-hot


def _valid(obs: np.ndarray, env: Any) -> np.ndarray:  # [A] float 0/1
    valid = np.zeros(int(env.action_space.n))
    valid[: action_widths(env)[_group(obs, env)]] = 1.0
    return valid


class RouterAgent:
    """The learned router's own preference: the action with the highest router prior, every group."""

    def act(self, obs: np.ndarray, env: Any) -> int:
        return int(np.argmax(self.policy(obs, env)))

    def policy(self, obs: np.ndarray, env: Any) -> np.ndarray:
        s = env.get_state()
        return env.action_priors(s.example, s.prefix)

    def config(self) -> dict:
        return {}


class RandomAgent:
    """Uniformly random actions from its own seeded generator."""

    def __init__(self, seed: int = 0) -> None:
        self.seed, self.rng = seed, np.random.default_rng(seed)

    def act(self, obs: np.ndarray, env: Any) -> int:
        return int(self.rng.choice(np.flatnonzero(_valid(obs, env))))

    def policy(self, obs: np.ndarray, env: Any) -> np.ndarray:
        valid = _valid(obs, env)
        return valid / valid.sum()

    def config(self) -> dict:
        return {"seed": self.seed}


class RoundRobinAgent:
    """Perfectly balanced by construction: group g of the n-th episode takes action ``(n + g) mod A``."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}

    def act(self, obs: np.ndarray, env: Any) -> int:
        g = _group(obs, env)
        n = self.counts.get(g, 0)
        self.counts[g] = n + 1
        return (n + g) % action_widths(env)[g]

    def config(self) -> dict:
        return {}
