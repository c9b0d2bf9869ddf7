"""Benchmark: steps/s of the cached env vs a naive env (full forward every step), and paths/s of
``evaluate_paths`` at batch 1, 16 and 64, all in one run. Prints JSON.

    python bench/env_step.py [--checkpoint runs/arc-easy-lora-moe-s0/final] [--episodes 40]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from routing_env.env import RoutingEnv


class NaiveRoutingEnv(RoutingEnv):
    """The same MDP computed the obvious way: each step runs the whole model, no prefix cache.

    It remembers only the last forward, so one step costs one full forward (as a straightforward
    implementation would), not one per observation field.
    """

    _last: tuple | None = None

    def _boundary(self, i, prefix):
        if self._last is not None and self._last[0] == (i, prefix):
            return self._last[1]
        ex = self._example_rows(i)
        node = self._embed_batch([i])[0]
        out, h = node, node.hidden
        for g in range(self.G):
            if g < len(prefix):
                node = self._run_batch([i], [h], g, [prefix[g]])[0]
                h = node.hidden
                out = node if g + 1 == len(prefix) else out
            else:  # the rest of the model with learned routing, as a full forward pass computes it
                h = self.stepper.run_group(h, ex.rows.attention_mask, g, None)
        self._last = ((i, prefix), out)
        return out


def steps_per_second(env: RoutingEnv, episodes: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    steps, t0 = 0, time.perf_counter()
    for _ in range(episodes):
        env.reset()
        done = False
        while not done:
            _, _, done, _, _ = env.step(int(rng.integers(env.E)))
            steps += 1
    return steps / (time.perf_counter() - t0)


def paths_per_second(env: RoutingEnv, batch: int, rounds: int, seed: int, per_example: int = 1) -> float:
    """Fresh random paths (cache cleared each round); ``per_example`` paths share each example, as the
    leaves of one search tree do, so they share the hidden states entering group 0."""
    rng = np.random.default_rng(seed)
    n = 0
    t0 = time.perf_counter()
    for _ in range(rounds):
        env.cache.clear()  # fresh paths: measure computing them, not cache hits
        ids = np.repeat(rng.choice(len(env.examples), size=batch // per_example, replace=False), per_example)
        env.evaluate_paths(ids, rng.integers(env.E, size=(batch, env.G)))
        n += batch
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", default=None, help="warm-up checkpoint (default: the cached one)")
    p.add_argument("--task", default="arc-easy")
    p.add_argument("--episodes", type=int, default=40)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kw = dict(task=args.task, checkpoint=args.checkpoint, max_examples=256)
    cached, naive = RoutingEnv(**kw), NaiveRoutingEnv(**kw)
    # Episodes revisit examples, as search and multi-epoch RL do; distinct draws keep it honest.
    sps_cached = steps_per_second(cached, args.episodes, 0)
    sps_naive = steps_per_second(naive, args.episodes, 0)
    paths = {b: paths_per_second(cached, b, max(1, 64 // b) if b > 1 else 24, 1) for b in (1, 16, 64)}
    tree = {b: paths_per_second(cached, b, max(1, 64 // b) if b > 1 else 24, 2, per_example=min(b, 16))
            for b in (1, 16, 64)}
    print(json.dumps({
        "groups": cached.G,
        "steps_per_s": {"cached": sps_cached, "naive": sps_naive, "ratio": sps_cached / sps_naive,
                        "target_ratio": cached.G / 2},
        "evaluate_paths_per_s": {"distinct_examples": paths, "16_paths_per_example": tree},
        "batch64_over_batch1": {"distinct_examples": paths[64] / paths[1],
                                "16_paths_per_example": tree[64] / paths[1]},
        "torch_threads": torch.get_num_threads(),
    }, indent=2))


if __name__ == "__main__":
    main()
