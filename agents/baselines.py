"""Baseline agents: the learned router itself (greedy), uniform random, balanced round-robin."""

from __future__ import annotations

from typing import Any

import numpy as np

from agents.base import action_widths, current_example, current_group, example_rng

__all__ = ["RouterAgent", "RandomAgent", "RoundRobinAgent"]


def _valid(obs: np.ndarray, env: Any) -> np.ndarray:  # [A] float 0/1
    valid = np.zeros(int(env.action_space.n))
    valid[: action_widths(env)[current_group(obs, env)]] = 1.0
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
    """Uniformly random actions; group g of example n draws from ``example_rng(seed, n, g)``.

    A function of (seed, example, group), not one stream over the run: a resumed search makes the
    same choices as an uninterrupted one, and an example's path does not depend on which examples
    ran before it.
    """

    def __init__(self, seed: int = 0) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.seed = seed

    def act(self, obs: np.ndarray, env: Any) -> int:
        rng = example_rng(self.seed, current_example(env), current_group(obs, env))
        return int(rng.choice(np.flatnonzero(_valid(obs, env))))

    def policy(self, obs: np.ndarray, env: Any) -> np.ndarray:
        valid = _valid(obs, env)
        return valid / valid.sum()

    def config(self) -> dict:
        return {"seed": self.seed}


class RoundRobinAgent:
    """Balanced by construction: group g of example n (its index in the split) takes ``(n + g) mod A_g``.

    ``A_g`` is the group's number of valid actions. Over consecutive examples every action of a group
    is taken equally often (exactly, for a multiple of ``A_g`` examples). The choice is a function of
    the example, not of a count of episodes run, so a resumed search routes like an uninterrupted one.
    """

    def act(self, obs: np.ndarray, env: Any) -> int:
        g = current_group(obs, env)
        return (current_example(env) + g) % action_widths(env)[g]

    def config(self) -> dict:
        return {}
