"""Batched MCTS over the routing MDP, re-rooted at every layer group.

Many examples are searched together, one array tree each. Per simulation: one numba ``select`` over
all trees, one batched leaf evaluation through the env's planning interface (every uncached group
transition of all trees in one forward per group level), one numba ``expand_and_backup``. After
``num_simulations`` the root's visit counts give the group's target distribution and its Q values
the group's process values; the most-visited action is taken and the search moves one group down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from agents.base import SearchResult, action_widths, example_rng
from agents.mcts.tree import expand_and_backup, init_roots, new_tree, root_q, root_visits, select

__all__ = ["MCTSConfig", "LeafEvaluator", "search_tree", "mcts_search"]

Node = tuple[int, tuple]  # (example index, action prefix from the start of the episode)


@dataclass
class MCTSConfig:
    num_simulations: int = 32  # per group (the search is re-rooted at each group)
    c_puct: float = 1.25  # exploration weight of the PUCT prior term
    dirichlet_alpha: float = 0.3  # root noise concentration
    dirichlet_fraction: float = 0.0  # root noise weight; 0 = no noise (deterministic search)
    temperature: float = 1.0  # targets = visits ** (1 / temperature), normalised; 0 = one-hot
    leaf_value: str = "greedy"  # "greedy": complete with the router's greedy choices; "zero": no rollout


class LeafEvaluator:
    """Expansion data and leaf values of search nodes, memoised for one batch of searches.

    ``value`` of a node is its return-to-go: with ``leaf_value="greedy"`` the path is completed with
    the learned router's greedy (argmax prior) actions and scored; all rollouts of one call advance
    together, so each group level is one batched ``env.evaluate_prefixes``. Memoised values stay
    valid while the env's running loads do not change (one batch of searches).
    """

    def __init__(self, env: Any, leaf_value: str | Callable[[int, tuple], float] = "greedy") -> None:
        if not callable(leaf_value) and leaf_value not in ("greedy", "zero"):
            raise ValueError(f"unknown leaf_value {leaf_value!r}; valid: 'greedy', 'zero' or a callable (example, prefix) -> float")
        self.env, self.leaf_value = env, leaf_value
        self.info: dict[Node, tuple[float, bool, np.ndarray]] = {}  # node -> (edge reward, terminal, prior [A])
        self.values: dict[Node, float] = {}

    def _expand(self, nodes: Sequence[Node]) -> None:
        todo = list(dict.fromkeys(n for n in nodes if n not in self.info))
        if todo:
            res = self.env.evaluate_prefixes([i for i, _ in todo], [p for _, p in todo])
            for m, n in enumerate(todo):
                self.info[n] = (float(res["reward"][m]), bool(res["terminal"][m]), res["prior"][m])

    def __call__(self, nodes: Sequence[Node]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``prior [n, A]``, edge ``reward [n]`` and ``value [n]`` of ``nodes``."""
        self._expand(nodes)
        if self.leaf_value == "greedy":
            frontier = [n for n in dict.fromkeys(nodes) if n not in self.values and not self.info[n][1]]
            chains = {n: [n] for n in frontier}  # node -> its greedy continuation so far
            while frontier:
                ends = [chains[n][-1] for n in frontier]
                nxt = [(i, p + (int(np.argmax(self.info[(i, p)][2])),)) for i, p in ends]
                self._expand(nxt)
                for n, m in zip(frontier, nxt):
                    chains[n].append(m)
                frontier = [n for n in frontier if not self.info[chains[n][-1]][1] and chains[n][-1] not in self.values]
            for chain in chains.values():
                tail = self.values.get(chain[-1], 0.0)  # a terminal or an already valued node
                for k in range(len(chain) - 1, 0, -1):
                    tail += self.info[chain[k]][0]
                    self.values.setdefault(chain[k - 1], tail)
        prior = np.array([self.info[n][2] for n in nodes])
        reward = np.array([self.info[n][0] for n in nodes])
        if self.leaf_value == "greedy":
            value = np.array([0.0 if self.info[n][1] else self.values[n] for n in nodes])
        elif self.leaf_value == "zero":
            value = np.zeros(len(nodes))
        else:
            value = np.array([0.0 if self.info[n][1] else float(self.leaf_value(*n)) for n in nodes])
        return prior, reward, value


def search_tree(evaluate: Callable[[list[tuple]], tuple[np.ndarray, np.ndarray, np.ndarray]], batch: int,
                num_actions: int, max_depth: int, cfg: MCTSConfig,
                rng: np.random.Generator | Sequence[np.random.Generator] | None = None):
    """Run ``cfg.num_simulations`` simulations on ``batch`` fresh trees; returns the ``Tree``.

    ``evaluate(paths)`` receives one action tuple per tree (``()`` = the root) and returns the
    nodes' ``prior [B, A]`` (negative: no such action), edge ``reward [B]`` and ``value [B]``
    (return-to-go estimate). ``rng`` draws the root noise (``cfg.dirichlet_fraction > 0``): one
    generator for all roots in turn, or one per tree (``[B]``, so that a root's noise does not depend
    on the other trees of the batch; ``mcts_search`` gives each root its own).
    """
    tree = new_tree(batch, cfg.num_simulations, num_actions, max_depth)
    prior, _, value = evaluate([()] * batch)
    if cfg.dirichlet_fraction > 0:  # over the actions each root has (prior >= 0)
        rng = rng if rng is not None else np.random.default_rng()
        rngs = [rng] * batch if isinstance(rng, np.random.Generator) else list(rng)
        if len(rngs) != batch:
            raise ValueError(f"search_tree: {len(rngs)} generators for {batch} trees; give one, or one per tree")
        prior = prior.copy()
        for b in range(batch):
            valid = prior[b] >= 0
            noise = rngs[b].dirichlet(np.full(int(valid.sum()), cfg.dirichlet_alpha))
            prior[b, valid] = (1 - cfg.dirichlet_fraction) * prior[b, valid] + cfg.dirichlet_fraction * noise
    init_roots(tree.visits, tree.value_sum, tree.prior, tree.terminal, tree.num_nodes, tree.qmin, tree.qmax,
               max_depth, np.ascontiguousarray(prior, np.float64), np.ascontiguousarray(value, np.float64))
    for _ in range(cfg.num_simulations):
        nodes, actions = select(tree.visits, tree.value_sum, tree.reward, tree.prior, tree.children, tree.terminal,
                                tree.qmin, tree.qmax, cfg.c_puct)
        new_prior, new_reward, new_value = np.zeros((batch, num_actions)), np.zeros(batch), np.zeros(batch)
        grow = np.flatnonzero(actions >= 0)
        if len(grow):
            paths = [tuple(int(a) for a in tree.path[b, nodes[b], : tree.depth[b, nodes[b]]]) + (int(actions[b]),) for b in grow]
            new_prior[grow], new_reward[grow], new_value[grow] = evaluate_subset(evaluate, paths, grow, batch)
        expand_and_backup(tree.visits, tree.value_sum, tree.reward, tree.prior, tree.children, tree.parent, tree.depth,
                          tree.path, tree.terminal, tree.num_nodes, tree.qmin, tree.qmax, max_depth, nodes, actions,
                          new_prior, new_reward, new_value)
    return tree


def evaluate_subset(evaluate: Callable, paths: list[tuple], trees: np.ndarray, batch: int):
    """Call a per-tree ``evaluate`` for the trees in ``trees`` only (the others are not expanding)."""
    full: list[tuple | None] = [None] * batch
    for b, p in zip(trees, paths):
        full[b] = p
    prior, reward, value = evaluate(full)
    return prior[trees], reward[trees], value[trees]


def mcts_search(env: Any, example_ids: Sequence[int], cfg: MCTSConfig, rng: np.random.Generator | None = None,
                seed: int | None = None) -> list[SearchResult]:
    """Search ``example_ids`` together on ``env`` (a ``RoutingEnv`` or anything with its planning interface).

    Root noise (``cfg.dirichlet_fraction > 0``): with ``seed``, the root of example ``i`` at group
    ``g`` draws from ``example_rng(seed, i, g)``, so an example's search does not depend on the
    examples searched before it or beside it (a resumed search equals an uninterrupted one); else
    all roots draw from ``rng`` in turn. Without noise neither is used.
    """
    ids = [int(i) for i in example_ids]
    B, G, A = len(ids), env.G, int(env.action_space.n)
    widths = action_widths(env)  # valid actions per group (a MoLA model's lower groups have fewer)
    evaluator = LeafEvaluator(env, cfg.leaf_value)
    prefixes: list[tuple] = [()] * B
    targets, values = np.zeros((B, G, A)), np.full((B, G, A), np.nan)
    depth_reached, nodes = np.zeros(B), np.zeros(B)
    for g in range(G):
        def evaluate(paths: list[tuple | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            live = [b for b, p in enumerate(paths) if p is not None]
            prior, reward, value = np.zeros((B, A)), np.zeros(B), np.zeros(B)
            if live:
                prior[live], reward[live], value[live] = evaluator([(ids[b], prefixes[b] + paths[b]) for b in live])
                for b in live:  # actions the node's group lacks (MoLA) are marked, so select skips them
                    group = len(prefixes[b]) + len(paths[b])
                    if group < G:
                        prior[b, widths[group]:] = -1.0
            return prior, reward, value

        roots_rng = [example_rng(seed, i, g) for i in ids] if seed is not None and cfg.dirichlet_fraction > 0 else rng
        tree = search_tree(evaluate, B, A, G - g, cfg, roots_rng)
        visits, q = root_visits(tree), root_q(tree)  # [B, A]
        depth_reached += tree.depth.max(1) / G
        nodes += tree.num_nodes
        targets[:, g] = _visit_distribution(visits, cfg.temperature)
        values[:, g] = q
        for b in range(B):  # most visited; ties to the higher Q, then the lower index
            order = np.lexsort((np.arange(A), -np.nan_to_num(q[b], nan=-np.inf), -visits[b]))
            prefixes[b] = prefixes[b] + (int(order[0]),)
    final = env.evaluate_paths(ids, [list(p) for p in prefixes])
    return [SearchResult.scored(ids[b], targets[b], values[b], prefixes[b], final, b,
                                extra={"simulations": G * cfg.num_simulations, "depth": float(depth_reached[b]),
                                       "nodes": int(nodes[b])})
            for b in range(B)]


def _visit_distribution(visits: np.ndarray, temperature: float) -> np.ndarray:
    if temperature <= 0:
        out = np.zeros_like(visits, dtype=float)
        out[np.arange(len(visits)), visits.argmax(1)] = 1.0
        return out
    w = visits.astype(float) ** (1.0 / temperature)
    return w / np.maximum(w.sum(1, keepdims=True), 1e-12)
