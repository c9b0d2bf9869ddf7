"""``SyntheticRoutingEnv``: a model-free backend of the routing MDP with known answers, for testing agents.

The MDP (spaces, observation layout, rewards, planning interface) is ``RoutingMDP``'s, as for
``RoutingEnv``; only transitions, priors and scores are closed-form tables: each example has a
hidden best path, and ``log p(correct)`` falls by ``penalty`` per group routed elsewhere. Its
"router" prefers the best action only on ``router_accuracy`` of the groups, so a planner can beat
it. It is a unit-test stand-in, never a default.
"""

from __future__ import annotations

import numpy as np

from routing_env.env.checks import check_number
from routing_env.env.mdp import RoutingMDP

__all__ = ["SyntheticRoutingEnv"]


class SyntheticRoutingEnv(RoutingMDP):
    """``G`` groups, ``E`` experts (``primary`` actions only), ``num_examples`` examples fixed by ``seed``."""

    def __init__(self, num_groups: int = 3, num_experts: int = 4, num_examples: int = 64, penalty: float = 0.7,
                 router_accuracy: float = 0.5, balance_weight: float = 0.0, tokens: int = 10, obs_proj_dim: int = 4,
                 seed: int = 0, reward_mode: str = "outcome") -> None:
        for name, value in (("num_groups", num_groups), ("num_experts", num_experts), ("num_examples", num_examples),
                            ("tokens", tokens)):
            check_number("SyntheticRoutingEnv", name, value, integer=True, low=1)
        check_number("SyntheticRoutingEnv", "obs_proj_dim", obs_proj_dim, integer=True, low=0)
        check_number("SyntheticRoutingEnv", "seed", seed, integer=True, low=0)
        check_number("SyntheticRoutingEnv", "penalty", penalty)
        check_number("SyntheticRoutingEnv", "router_accuracy", router_accuracy, low=0, high=1)
        check_number("SyntheticRoutingEnv", "balance_weight", balance_weight)
        self._init_mdp([num_experts] * num_groups, 1, "primary", reward_mode, balance_weight, obs_proj_dim)
        self.penalty, self.tokens = penalty, tokens
        rng = np.random.default_rng([seed, 0x5EED])  # not default_rng(seed): agents seeded alike would know the answers
        self.best = rng.integers(num_experts, size=(num_examples, num_groups))  # [N, G] hidden best paths
        hint = np.where(rng.random((num_examples, num_groups)) < router_accuracy, self.best,
                        rng.integers(num_experts, size=(num_examples, num_groups)))
        logits = rng.normal(0, 0.3, (num_examples, num_groups, num_experts))
        logits[np.arange(num_examples)[:, None], np.arange(num_groups), hint] += 1.5
        self.priors = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)  # [N, G, E]
        self.features = np.tanh(rng.normal(0, 1, (num_examples, obs_proj_dim))).astype(np.float32)
        self.examples = [f"synthetic-{i}" for i in range(num_examples)]

    # ---- the backend: closed-form transitions, priors and scores ---------------------------------
    def step_loads(self, action: int) -> np.ndarray:
        """``[E]`` the loads of routing a group with ``action``: all ``tokens`` on that expert."""
        loads = np.zeros(self.E)
        loads[int(action)] = self.tokens
        return loads

    def _loads(self, i: int, prefix: tuple) -> np.ndarray:
        return self.step_loads(prefix[-1])

    def router_probs(self, i: int, prefix: tuple) -> np.ndarray:
        return self.priors[i, len(prefix)]

    def _priors_from_probs(self, p: np.ndarray) -> np.ndarray:
        return p.copy()  # the table is normalised already (renormalising would move it by an ulp)

    def _features(self, i: int, prefix: tuple) -> np.ndarray:
        return self.features[i]

    def _path_scores(self, i: int, path: tuple) -> np.ndarray:
        return np.asarray(path)  # the score is a closed form of the path itself

    def _score(self, i: int, path: np.ndarray) -> tuple[float, bool]:
        misses = int(np.sum(path != self.best[i]))
        return -self.penalty * misses - 0.05, misses == 0
