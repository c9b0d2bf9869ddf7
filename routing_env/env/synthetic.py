"""``SyntheticRoutingEnv``: a model-free routing MDP with known answers, for testing agents.

Same spaces, observation layout, rewards and planning interface as ``RoutingEnv``, but the outcome of
a path is a closed-form table: each example has a hidden best path, and ``log p(correct)`` falls by
``penalty`` per group routed elsewhere. Its "router" prefers the best action only on ``router_accuracy``
of the groups, so a planner can beat it. It is a unit-test stand-in, never a default.
"""

from __future__ import annotations

from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from routing_env.env.model import check_number
from routing_env.env.planning import EnvState

__all__ = ["SyntheticRoutingEnv"]


class SyntheticRoutingEnv(gym.Env):
    """``G`` groups, ``E`` experts (``primary`` actions only), ``num_examples`` examples fixed by ``seed``."""

    metadata = {"render_modes": []}

    def __init__(self, num_groups: int = 3, num_experts: int = 4, num_examples: int = 64, penalty: float = 0.7,
                 router_accuracy: float = 0.5, balance_weight: float = 0.0, tokens: int = 10, obs_proj_dim: int = 4,
                 seed: int = 0) -> None:
        for name, value in (("num_groups", num_groups), ("num_experts", num_experts), ("num_examples", num_examples),
                            ("tokens", tokens)):
            check_number("SyntheticRoutingEnv", name, value, integer=True, low=1)
        check_number("SyntheticRoutingEnv", "obs_proj_dim", obs_proj_dim, integer=True, low=0)
        check_number("SyntheticRoutingEnv", "seed", seed, integer=True, low=0)
        check_number("SyntheticRoutingEnv", "penalty", penalty)
        check_number("SyntheticRoutingEnv", "router_accuracy", router_accuracy, low=0, high=1)
        check_number("SyntheticRoutingEnv", "balance_weight", balance_weight)
        self.G, self.E, self.k = num_groups, num_experts, 1
        self.action_mode, self.balance_weight, self.penalty, self.tokens = "primary", balance_weight, penalty, tokens
        rng = np.random.default_rng([seed, 0x5EED])  # not default_rng(seed): agents seeded alike would know the answers
        self.best = rng.integers(num_experts, size=(num_examples, num_groups))  # [N, G] hidden best paths
        hint = np.where(rng.random((num_examples, num_groups)) < router_accuracy, self.best,
                        rng.integers(num_experts, size=(num_examples, num_groups)))
        logits = rng.normal(0, 0.3, (num_examples, num_groups, num_experts))
        logits[np.arange(num_examples)[:, None], np.arange(num_groups), hint] += 1.5
        self.priors = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)  # [N, G, E]
        self.features = np.tanh(rng.normal(0, 1, (num_examples, obs_proj_dim))).astype(np.float32)
        self.examples = [f"synthetic-{i}" for i in range(num_examples)]
        self.action_space = spaces.Discrete(num_experts)
        n_obs = num_groups + 2 * num_experts + obs_proj_dim
        low = np.concatenate([np.zeros(num_groups + 2 * num_experts), -np.ones(obs_proj_dim)]).astype(np.float32)
        self.observation_space = spaces.Box(low, np.ones(n_obs, np.float32), dtype=np.float32)
        self.load_stats = np.zeros((num_groups, num_experts))
        self._example, self._prefix, self._done = 0, (), True
        self._episode_loads = np.zeros((num_groups, num_experts))
        self._episode_balance = 0.0

    # ---- model-free stand-ins for the model ------------------------------------------------------
    def action_priors(self, i: int, prefix: tuple) -> np.ndarray:
        return self.priors[i, len(prefix)].copy()

    def outcome(self, i: int, path: tuple) -> tuple[float, bool]:
        misses = int(np.sum(np.asarray(path) != self.best[i]))
        return -self.penalty * misses - 0.05, misses == 0

    def step_loads(self, action: int) -> np.ndarray:
        loads = np.zeros(self.E)
        loads[int(action)] = self.tokens
        return loads

    def _load_share(self, g: int) -> np.ndarray:
        total = self.load_stats[g].sum()
        return self.load_stats[g] / total if total > 0 else np.full(self.E, 1.0 / self.E)

    def balance_reward(self, g: int, counts: np.ndarray) -> float:
        p = counts / max(counts.sum(), 1.0)
        return float(-self.balance_weight * self.E * np.dot(p, self._load_share(g) - 1.0 / self.E))

    def _observation(self) -> np.ndarray:
        obs = np.zeros(self.observation_space.shape, np.float32)
        g = len(self._prefix)
        obs[self.G + 2 * self.E :] = self.features[self._example]
        if g < self.G:
            obs[g] = 1.0
            obs[self.G : self.G + self.E] = self.priors[self._example, g]
            obs[self.G + self.E : self.G + 2 * self.E] = self._load_share(g)
        return obs

    # ---- Gymnasium API ---------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = options or {}
        i = int(options["example"]) if "example" in options else int(self.np_random.integers(len(self.examples)))
        self._example, self._prefix, self._done = i, (), False
        self._episode_loads, self._episode_balance = np.zeros((self.G, self.E)), 0.0
        return self._observation(), {"example": i, "id": self.examples[i]}

    def step(self, action: Any):
        if self._done:
            raise ValueError("step() called after the episode ended; call reset() first")
        if not self.action_space.contains(action):
            raise ValueError(f"action must be an integer in [0, {self.E}), got {action!r}")
        g = len(self._prefix)
        self._prefix += (int(action),)
        self._episode_loads[g] = self.step_loads(action)
        r = self.balance_reward(g, self._episode_loads[g])
        self._episode_balance += r
        info: dict[str, Any] = {"example": self._example, "path": list(self._prefix), "balance_reward": r,
                                "group_loads": self._episode_loads.copy()}
        terminated = len(self._prefix) == self.G
        reward = 0.0
        if terminated:
            logp, correct = self.outcome(self._example, self._prefix)
            reward = logp + self._episode_balance
            info.update(outcome=logp, correct=correct)
            self.load_stats += self._episode_loads
            self._done = True
        return self._observation(), float(reward), terminated, False, info

    # ---- planning interface (as RoutingEnv's) ----------------------------------------------------
    def get_state(self) -> EnvState:
        return EnvState(self._example, self._prefix, self.load_stats.copy(), self._episode_loads.copy(), self._done)

    def set_state(self, state: EnvState) -> None:
        self._example, self._prefix, self._done = state.example, tuple(state.prefix), state.done
        self.load_stats, self._episode_loads = state.load_stats.copy(), state.episode_loads.copy()

    def evaluate_prefixes(self, example_ids: Any, prefixes: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        n = len(prefixes)
        out = {"reward": np.zeros(n), "terminal": np.zeros(n, bool), "prior": np.zeros((n, self.E)),
               "outcome": np.full(n, np.nan), "correct": np.zeros(n, bool)}
        for m, (i, p) in enumerate(zip(np.asarray(example_ids).reshape(-1), prefixes)):
            p = tuple(int(a) for a in p)
            if p:
                out["reward"][m] = self.balance_reward(len(p) - 1, self.step_loads(p[-1]))
            if len(p) == self.G:
                out["terminal"][m] = True
                out["outcome"][m], out["correct"][m] = self.outcome(int(i), p)
                out["reward"][m] += out["outcome"][m]
            else:
                out["prior"][m] = self.action_priors(int(i), p)
        return out

    def evaluate_paths(self, example_ids: Any, paths: Any) -> dict[str, np.ndarray]:
        ids = np.asarray(example_ids).reshape(-1)
        paths = np.asarray(paths, dtype=int).reshape(len(ids), self.G)
        res = [self.outcome(int(i), tuple(p)) for i, p in zip(ids, paths)]
        loads = np.array([[self.step_loads(a) for a in p] for p in paths])
        balance = np.array([sum(self.balance_reward(g, l[g]) for g in range(self.G)) for l in loads])
        return {"outcome": np.array([r[0] for r in res]), "correct": np.array([r[1] for r in res]),
                "loads": loads, "balance": balance}

    def finish_episode(self, loads: np.ndarray) -> None:
        self.load_stats += np.asarray(loads, dtype=float)
