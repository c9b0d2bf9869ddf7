"""MCTS over the routing MDP: array trees with numba kernels, batched across examples."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

import numpy as np

from agents.base import SearchResult, example_rng
from agents.mcts.search import LeafEvaluator, MCTSConfig, mcts_search, search_tree
from agents.mcts.tree import root_visits

__all__ = ["MCTSAgent", "MCTSConfig", "LeafEvaluator", "mcts_search", "search_tree"]


class MCTSAgent:
    """Searches ``batch_size`` examples at a time; priors from the learned router, greedy-rollout leaves.

    ``act`` searches the current example from the current node (slow; for use as a plain agent);
    ``search`` is what ``train_rl.py`` calls. Running loads are updated with each batch's chosen
    paths before the next batch is searched, so the balance term sees earlier decisions. Root noise
    (``dirichlet_fraction > 0``) of example ``i`` at group ``g`` is drawn from ``example_rng(seed, i, g)``
    in both, so a resumed search equals an uninterrupted one.
    """

    def __init__(self, num_simulations: int = 32, c_puct: float = 1.25, dirichlet_alpha: float = 0.3,
                 dirichlet_fraction: float = 0.0, temperature: float = 1.0, leaf_value: str = "greedy",
                 batch_size: int = 16, seed: int = 0) -> None:
        if num_simulations < 1:
            raise ValueError(f"num_simulations must be at least 1, got {num_simulations}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.cfg = MCTSConfig(num_simulations, c_puct, dirichlet_alpha, dirichlet_fraction, temperature, leaf_value)
        self.batch_size, self.seed = batch_size, seed

    def search(self, env: Any, example_ids: Sequence[int]) -> list[SearchResult]:
        out: list[SearchResult] = []
        for start in range(0, len(example_ids), self.batch_size):
            results = mcts_search(env, example_ids[start : start + self.batch_size], self.cfg, seed=self.seed)
            for r in results:
                env.finish_episode(r.loads)
            out += results
        return out

    def act(self, obs: np.ndarray, env: Any) -> int:
        s = env.get_state()
        G, A = env.G, int(env.action_space.n)
        ev = LeafEvaluator(env, self.cfg.leaf_value)
        # One tree: evaluate() is only called when it grows, so every path is real.
        tree = search_tree(lambda paths: ev([(s.example, s.prefix + p) for p in paths]), 1, A, G - len(s.prefix),
                           self.cfg, example_rng(self.seed, s.example, len(s.prefix)))
        return int(np.argmax(root_visits(tree)[0]))

    def config(self) -> dict:
        return {**asdict(self.cfg), "batch_size": self.batch_size, "seed": self.seed}

