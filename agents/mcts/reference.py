"""Plain-Python MCTS: node objects and dicts, written independently of the array kernels.

It implements the same rules as ``agents/mcts/tree.py`` (PUCT on min-max normalised Q, first-play
urgency from the parent's value, undiscounted backup, one node per simulation) and is the oracle the
numba kernels are tested against, operation by operation. ``bench/mcts.py`` times it as the
"plain-Python MCTS".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["RefNode", "RefTree"]


@dataclass
class RefNode:
    prior: list[float]
    reward: float = 0.0
    visits: int = 0
    value_sum: float = 0.0
    parent: "RefNode | None" = None
    path: tuple = ()
    terminal: bool = False
    index: int = 0
    children: dict[int, "RefNode"] = field(default_factory=dict)

    def q(self) -> float:
        """Return-to-go from the parent through this node (the root has no incoming reward)."""
        return self.value_sum / self.visits + (self.reward if self.parent is not None else 0.0)


class RefTree:
    """One search tree; ``nodes[k]`` is the k-th node created (node 0 the root), as in the arrays."""

    def __init__(self, root_prior: list[float], root_value: float, max_depth: int) -> None:
        self.max_depth = max_depth
        self.root = RefNode(list(root_prior), visits=1, value_sum=root_value, terminal=max_depth == 0)
        self.nodes = [self.root]
        self.qmin = self.qmax = root_value

    def _norm(self, q: float) -> float:
        return (q - self.qmin) / (self.qmax - self.qmin) if self.qmax > self.qmin else 0.0

    def select(self, c_puct: float) -> tuple[int, int]:
        node = self.root
        while not node.terminal:
            sqrt_n = math.sqrt(node.visits)
            fpu = self._norm(node.value_sum / node.visits)
            scores = []
            for a, p in enumerate(node.prior):
                child = node.children.get(a)
                if p < 0:  # no such action at this node
                    scores.append(-math.inf)
                elif child is None:
                    scores.append(fpu + c_puct * p * sqrt_n)
                else:
                    scores.append(self._norm(child.q()) + c_puct * p * sqrt_n / (1.0 + child.visits))
            a = max(range(len(scores)), key=lambda i: (scores[i], -i))  # first of equal maxima
            if a not in node.children:
                return node.index, a
            node = node.children[a]
        return node.index, -1

    def expand_and_backup(self, node_index: int, action: int, prior: list[float], reward: float, value: float) -> int:
        node = self.nodes[node_index]
        if action >= 0:
            path = node.path + (action,)
            child = RefNode(list(prior), reward=reward, parent=node, path=path,
                            terminal=len(path) == self.max_depth, index=len(self.nodes))
            node.children[action] = child
            self.nodes.append(child)
            node, g = child, (0.0 if child.terminal else value)
        else:
            g = 0.0
        leaf = node.index
        while node is not None:
            node.visits += 1
            node.value_sum += g
            self.qmin, self.qmax = min(self.qmin, node.q()), max(self.qmax, node.q())
            if node.parent is not None:
                g += node.reward
            node = node.parent
        return leaf

    def root_visits(self, num_actions: int) -> list[int]:
        return [self.root.children[a].visits if a in self.root.children else 0 for a in range(num_actions)]
