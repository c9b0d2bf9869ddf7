"""Benchmark: simulations/s of our numba tree operations vs a plain-Python MCTS vs DeepMind's mctx.

Same problem for all three, in one run: batch 64 trees, 8 actions, 64 simulations, depth 4, a
trivial deterministic evaluation (edge reward ``((action * 7 + depth * 3) % 11) / 10``, uniform
priors, zero leaf values), so the figure is the cost of the tree operations themselves. Prints JSON.

    python bench/mcts.py            # mctx needs `pip install "jax[cpu]" mctx` (benchmark only)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from agents.mcts.reference import RefTree
from agents.mcts.tree import expand_and_backup, init_roots, new_tree, root_visits, select

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _reward(actions: np.ndarray, depth: np.ndarray) -> np.ndarray:
    return ((actions * 7 + depth * 3) % 11) / 10.0


def numba_search(B: int, A: int, S: int, D: int, c_puct: float = 1.25):
    """One batched search with the array kernels; the evaluation is vectorised numpy."""
    t = new_tree(B, S, A, D)
    rows = np.arange(B)
    uniform = np.full((B, A), 1.0 / A)
    init_roots(t.visits, t.value_sum, t.prior, t.terminal, t.num_nodes, t.qmin, t.qmax, D, uniform, np.zeros(B))
    zeros = np.zeros(B)
    for _ in range(S):
        nodes, actions = select(t.visits, t.value_sum, t.reward, t.prior, t.children, t.terminal, t.qmin, t.qmax, c_puct)
        reward = np.where(actions >= 0, _reward(actions, t.depth[rows, nodes]), 0.0)
        expand_and_backup(t.visits, t.value_sum, t.reward, t.prior, t.children, t.parent, t.depth, t.path, t.terminal,
                          t.num_nodes, t.qmin, t.qmax, D, nodes, actions, uniform, reward, zeros)
    return t


def python_search(B: int, A: int, S: int, D: int, c_puct: float = 1.25) -> list[RefTree]:
    """The same search with the plain-Python reference, tree by tree."""
    trees = [RefTree([1.0 / A] * A, 0.0, D) for _ in range(B)]
    for _ in range(S):
        for tr in trees:
            node, action = tr.select(c_puct)
            reward = _reward(action, len(tr.nodes[node].path)) if action >= 0 else 0.0
            tr.expand_and_backup(node, action, [1.0 / A] * A, float(reward), 0.0)
    return trees


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--actions", type=int, default=8)
    ap.add_argument("--simulations", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    B, A, S, D = a.batch, a.actions, a.simulations, a.depth
    sims = B * S

    numba_search(B, A, S, D)  # compile (or load the cache), not timed
    t_numba = best_time(lambda: numba_search(B, A, S, D), a.repeats)
    t_python = best_time(lambda: python_search(B, A, S, D), max(1, a.repeats // 10))
    same = np.array_equal(root_visits(numba_search(B, A, S, D)), [t.root_visits(A) for t in python_search(B, A, S, D)])

    out = {
        "problem": {"batch": B, "actions": A, "simulations": S, "depth": D},
        "numba_simulations_per_s": sims / t_numba,
        "python_simulations_per_s": sims / t_python,
        "numba_vs_python": t_python / t_numba,
        "numba_equals_python_visits": bool(same),
    }
    try:
        from _mctx_side import mctx_simulations_per_second

        m = mctx_simulations_per_second(B, A, S, D, repeats=a.repeats)
        out["mctx_simulations_per_s"] = m["simulations_per_s"]
        out["numba_vs_mctx"] = out["numba_simulations_per_s"] / m["simulations_per_s"]
        out["mctx"] = {k: m[k] for k in ("jax_version", "mctx_version", "jax_devices")}
    except ImportError as e:
        out["mctx_simulations_per_s"] = None
        out["mctx_note"] = str(e)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
