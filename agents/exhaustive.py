"""The exact oracle: every path of the routing tree, exact Q* of every group choice.

With ``A`` actions and ``G`` groups a question has ``A**G`` paths (a MoLA model: the product of
its groups' expert counts); the tree has ``A + A**2 + ... + A**G`` non-root nodes, each one group
forward (prefixes are cached, so a node is computed once). For MiniLM's default (E=4 primary
actions, G=3) that is 84 group forwards per question, fewer than MCTS spends at 32 simulations per
group, and every value is exact. Where that is affordable this is the right target source and the
ground truth MCTS is measured against; MCTS is for trees too big to enumerate (``combo`` actions,
more groups, more experts).

Values use the env's ``process`` decomposition of the return: the edge reward into a node is its
group's balance term (against the running loads when the batch starts) plus, at a leaf,
``log p(correct)``. Backward induction gives ``Q*(s, a) = r(s, a) + max_b Q*(s + a, b)``.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np

from agents.base import SearchResult, action_widths
from routing_env.targets import q_targets

__all__ = ["ExhaustiveAgent", "exhaustive_q", "optimal_path"]


def exhaustive_q(env: Any, example_ids: Sequence[int]) -> list[dict[tuple, np.ndarray]]:
    """``Q*`` of every non-terminal node of every example's tree: ``{prefix: Q [A]}`` per example.

    One ``env.evaluate_prefixes`` call per tree level over all examples together, so the whole
    batch costs ``G`` batched calls. Actions a group lacks (MoLA) have ``Q = NaN``.
    """
    A, G = int(env.action_space.n), env.G
    widths = action_widths(env)
    ids = [int(i) for i in example_ids]
    reward: list[dict[tuple, float]] = [{} for _ in ids]  # edge reward into each node
    for depth in range(1, G + 1):
        level = _prefixes(widths, depth)  # every prefix of this many groups
        res = env.evaluate_prefixes([i for i in ids for _ in level], [p for _ in ids for p in level])
        for n in range(len(ids)):
            for m, p in enumerate(level):
                reward[n][p] = float(res["reward"][n * len(level) + m])
    out: list[dict[tuple, np.ndarray]] = []
    for n in range(len(ids)):
        q: dict[tuple, np.ndarray] = {}
        for depth in range(G - 1, -1, -1):  # leaves' parents first
            for p in _prefixes(widths, depth):
                q[p] = np.full(A, np.nan)
                for a in range(widths[depth]):
                    q[p][a] = reward[n][p + (a,)] + (0.0 if depth + 1 == G else float(np.nanmax(q[p + (a,)])))
        out.append(q)
    return out


def _prefixes(widths: Sequence[int], depth: int) -> list[tuple]:
    """Every action prefix of ``depth`` groups (``widths[g]`` actions at group g), in lexicographic order."""
    return list(itertools.product(*(range(w) for w in widths[:depth])))


def optimal_path(q: dict[tuple, np.ndarray], num_groups: int) -> tuple:
    """The path that takes the best ``Q*`` action at every group (ties to the lower index; NaN: no such action)."""
    p: tuple = ()
    for _ in range(num_groups):
        p = p + (int(np.nanargmax(q[p])),)
    return p


class ExhaustiveAgent:
    """Enumerates every path; targets ``q_targets(Q*, temperature)`` along the optimal path.

    ``search`` is what ``train_rl.py`` calls: examples are enumerated ``batch_size`` at a time and
    the running loads are updated with each batch's optimal paths before the next batch, as MCTS
    does. Refuses trees above ``max_paths`` leaves, naming MCTS as the agent for those.
    """

    def __init__(self, temperature: float = 0.0, batch_size: int = 16, max_paths: int = 4096) -> None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = one-hot of the best action), got {temperature}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.temperature, self.batch_size, self.max_paths = temperature, batch_size, max_paths

    def _check(self, env: Any) -> None:
        widths = action_widths(env)
        paths = int(np.prod(widths))
        if paths > self.max_paths:
            raise ValueError(f"the routing tree has {paths} paths per question ({widths} actions per group), "
                             f"above max_paths={self.max_paths}: use --agent mcts for trees this big, or raise max_paths")

    def search(self, env: Any, example_ids: Sequence[int]) -> list[SearchResult]:
        self._check(env)
        out: list[SearchResult] = []
        for start in range(0, len(example_ids), self.batch_size):
            ids = [int(i) for i in example_ids[start : start + self.batch_size]]
            qs = exhaustive_q(env, ids)
            G, widths = env.G, action_widths(env)
            paths = [optimal_path(q, G) for q in qs]
            # Each group's Q* at the node the optimal path reaches.
            values = np.array([[q[p[:g]] for g in range(G)] for q, p in zip(qs, paths)])  # [B, G, A]
            targets = q_targets(values, self.temperature)
            final = env.evaluate_paths(ids, [list(p) for p in paths])
            nodes = sum(int(np.prod(widths[:g])) for g in range(1, G + 1))
            for n, i in enumerate(ids):
                r = SearchResult.scored(i, targets[n], values[n], paths[n], final, n,
                                        extra={"group_forwards": nodes, "depth": 1.0, "nodes": nodes})
                env.finish_episode(r.loads)
                out.append(r)
        return out

    def act(self, obs: np.ndarray, env: Any) -> int:
        """The first action of the optimal path from the env's current node (enumerates its subtree)."""
        self._check(env)
        s = env.get_state()
        rest = env.G - len(s.prefix)
        best, best_return = 0, -np.inf
        # Enumerate the subtree's complete paths and score them in one batch; the return from here on
        # is what differs between them (the prefix's rewards are shared).
        tails = _prefixes(action_widths(env)[len(s.prefix):], rest)
        res = env.evaluate_paths([s.example] * len(tails), [list(s.prefix) + list(t) for t in tails])
        for t, ret in zip(tails, res["reward"]):  # each path's return, outcome + balance
            if ret > best_return:
                best, best_return = t[0], ret
        return int(best)

    def config(self) -> dict:
        return {"temperature": self.temperature, "batch_size": self.batch_size, "max_paths": self.max_paths}
