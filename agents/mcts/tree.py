"""Search trees as arrays (one tree per example, ``B`` trees at once) and their numba kernels.

Layout as in DeepMind's mctx: node 0 is the root, a node's children are indices into the same
arrays (-1 = not expanded), and every simulation adds at most one node, so ``N = simulations + 1``
nodes always suffice. Returns are undiscounted; a node's ``reward`` is the reward of the edge into
it, its ``value_sum`` sums returns-to-go from it, so ``Q(s, a) = reward[c] + value_sum[c] / visits[c]``
for the child ``c`` reached by ``a``.

Selection is PUCT (AlphaZero) on Q values min-max normalised per tree (MuZero), because our
returns (log-probabilities plus balance terms) are unbounded; an unvisited action scores its
parent's value ("first-play urgency": explore only when the prior or the parent says so).
``agents/mcts/reference.py`` is an independent plain-Python implementation the kernels are tested
against, operation by operation.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

__all__ = ["Tree", "new_tree", "init_roots", "select", "expand_and_backup", "root_visits", "root_q"]


class Tree(NamedTuple):
    visits: np.ndarray  # [B, N] int32
    value_sum: np.ndarray  # [B, N] float64: sum of returns-to-go backed up through the node
    reward: np.ndarray  # [B, N] float64: reward of the edge into the node
    prior: np.ndarray  # [B, N, A] float64: action priors at the node
    children: np.ndarray  # [B, N, A] int32, -1 = not expanded
    parent: np.ndarray  # [B, N] int32, -1 at the root
    depth: np.ndarray  # [B, N] int32, the root has depth 0
    path: np.ndarray  # [B, N, D] int32: actions from the root to the node, -1 padded
    terminal: np.ndarray  # [B, N] bool
    num_nodes: np.ndarray  # [B] int32
    qmin: np.ndarray  # [B] float64: smallest Q seen in the tree (for normalisation)
    qmax: np.ndarray  # [B] float64


def new_tree(batch: int, num_simulations: int, num_actions: int, max_depth: int) -> Tree:
    """Empty trees for ``batch`` searches of ``num_simulations`` each, ``max_depth`` actions deep."""
    B, N, A, D = batch, num_simulations + 1, num_actions, max_depth
    return Tree(
        visits=np.zeros((B, N), np.int32), value_sum=np.zeros((B, N)), reward=np.zeros((B, N)),
        prior=np.zeros((B, N, A)), children=np.full((B, N, A), -1, np.int32), parent=np.full((B, N), -1, np.int32),
        depth=np.zeros((B, N), np.int32), path=np.full((B, N, D), -1, np.int32), terminal=np.zeros((B, N), np.bool_),
        num_nodes=np.zeros(B, np.int32), qmin=np.full(B, np.inf), qmax=np.full(B, -np.inf),
    )


@numba.njit(cache=True)
def init_roots(visits, value_sum, prior, terminal, num_nodes, qmin, qmax, max_depth,
               root_prior, root_value) -> None:  # root_prior [B, A], root_value [B]
    """Make node 0 of every tree a root with one visit worth ``root_value`` (as mctx does)."""
    for b in range(visits.shape[0]):
        visits[b, 0] = 1
        value_sum[b, 0] = root_value[b]
        prior[b, 0, :] = root_prior[b]
        terminal[b, 0] = max_depth == 0
        num_nodes[b] = 1
        qmin[b] = root_value[b]
        qmax[b] = root_value[b]


@numba.njit(cache=True, inline="always")
def _normalise(q, lo, hi):
    return (q - lo) / (hi - lo) if hi > lo else 0.0


@numba.njit(cache=True)
def select(visits, value_sum, reward, prior, children, terminal, qmin, qmax, c_puct):
    """Walk every tree from the root by PUCT to a node with an unexpanded chosen action.

    Returns ``node [B]`` and ``action [B]``: expand ``action`` at ``node``; ``action = -1`` means
    the walk reached a terminal node, which is re-evaluated (its value is known) and backed up.
    Ties go to the lowest action index. A negative prior marks an action the node does not have
    (a MoLA model's lower groups have fewer experts than ``A``): it is never selected.
    """
    B, _, A = prior.shape
    nodes = np.empty(B, np.int32)
    actions = np.empty(B, np.int32)
    for b in range(B):
        node = 0
        while True:
            if terminal[b, node]:
                nodes[b], actions[b] = node, -1
                break
            n = visits[b, node]
            sqrt_n = np.sqrt(n)
            fpu = _normalise(value_sum[b, node] / n, qmin[b], qmax[b])
            best, best_a = -np.inf, 0
            for a in range(A):
                if prior[b, node, a] < 0.0:
                    continue
                c = children[b, node, a]
                if c >= 0:
                    q = _normalise(reward[b, c] + value_sum[b, c] / visits[b, c], qmin[b], qmax[b])
                    u = c_puct * prior[b, node, a] * sqrt_n / (1.0 + visits[b, c])
                else:
                    q = fpu
                    u = c_puct * prior[b, node, a] * sqrt_n
                if q + u > best:
                    best, best_a = q + u, a
            c = children[b, node, best_a]
            if c < 0:
                nodes[b], actions[b] = node, best_a
                break
            node = c
    return nodes, actions


@numba.njit(cache=True)
def expand_and_backup(visits, value_sum, reward, prior, children, parent, depth, path, terminal, num_nodes,
                      qmin, qmax, max_depth, nodes, actions, new_prior, new_reward, new_value) -> np.ndarray:
    """Add the child ``actions[b]`` of ``nodes[b]`` (prior, edge reward, value estimate), back it up.

    ``new_prior [B, A]``, ``new_reward [B]``, ``new_value [B]`` describe the new nodes; where
    ``actions[b] == -1`` no node is added and ``nodes[b]`` (terminal) is backed up with value 0.
    Every node on the path gains a visit and the return-to-go at it. Returns the backed-up leaves.
    """
    B = nodes.shape[0]
    leaves = np.empty(B, np.int32)
    for b in range(B):
        node, value = nodes[b], 0.0
        if actions[b] >= 0:
            p, a = node, actions[b]
            node = num_nodes[b]
            num_nodes[b] += 1
            children[b, p, a] = node
            parent[b, node] = p
            depth[b, node] = depth[b, p] + 1
            path[b, node, :] = path[b, p, :]
            path[b, node, depth[b, p]] = a
            terminal[b, node] = depth[b, node] == max_depth
            prior[b, node, :] = new_prior[b]
            reward[b, node] = new_reward[b]
            value = 0.0 if terminal[b, node] else new_value[b]
        leaves[b] = node
        while node >= 0:  # backup: G <- r + G on the way up
            visits[b, node] += 1
            value_sum[b, node] += value
            q = value_sum[b, node] / visits[b, node] + (reward[b, node] if parent[b, node] >= 0 else 0.0)
            qmin[b] = min(qmin[b], q)
            qmax[b] = max(qmax[b], q)
            value += reward[b, node] if parent[b, node] >= 0 else 0.0
            node = parent[b, node]
    return leaves


def root_visits(tree: Tree) -> np.ndarray:  # [B, A]
    """Visit counts of the root's actions (0 where not expanded)."""
    ch = tree.children[:, 0]  # [B, A]
    return np.where(ch >= 0, np.take_along_axis(tree.visits, np.maximum(ch, 0), 1), 0)


def root_q(tree: Tree) -> np.ndarray:  # [B, A]
    """``Q(root, a)`` (NaN where the action was never tried)."""
    ch = np.maximum(tree.children[:, 0], 0)
    v = np.take_along_axis(tree.visits, ch, 1)
    q = np.take_along_axis(tree.reward, ch, 1) + np.take_along_axis(tree.value_sum, ch, 1) / np.maximum(v, 1)
    return np.where(tree.children[:, 0] >= 0, q, np.nan)
