"""Is the oracle's route predictable from the input? The trained router against the dev oracle.

    python experiments/hindsight.py --checkpoint runs/x/final [--checkpoint runs/y/final ...] --examples 200

For each checkpoint, on the first ``--examples`` dev questions (answers used for this analysis only,
never for choosing what is reported on test), with the balance weight 0 so everything is log p:

* ``agreement``: share of questions (and per group) where the router's greedy route equals the
  exhaustive oracle's best route;
* ``recovered``: how much of the oracle's log-p gain over a uniformly random route the router's own
  route recovers, ``(router - random) / (oracle - random)`` averaged over questions (1 = the router
  routes like the oracle; 0 = no better than chance).

If stage 3 only memorised training routes, neither rises on dev. Prints JSON (and ``--output``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gymnasium as gym
import numpy as np

import agents
import routing_env  # noqa: F401  (registers the ids)
from agents.exhaustive import exhaustive_q, optimal_path


def measure(checkpoint: str, env_id: str, n: int, data_dir: str | None) -> dict:
    env = gym.make(env_id, checkpoint=checkpoint, split="dev", data_dir=data_dir, balance_weight=0.0).unwrapped
    ids = list(range(min(n, len(env.examples))))
    router = agents.run_agent(agents.make("router"), env, ids)
    oracle_path, oracle, random_route = [], [], []
    for start in range(0, len(ids), 16):
        for q in exhaustive_q(env, ids[start : start + 16]):
            oracle_path.append(optimal_path(q, env.G))
            oracle.append(float(q[()].max()))
            leaves = [q[pre] for pre in q if len(pre) == env.G - 1]  # [A**(G-1)] rows of leaf values
            random_route.append(float(np.mean(leaves)))
    r_out = np.array([r.outcome for r in router])
    o, rnd = np.array(oracle), np.array(random_route)
    same = np.array([[r.path[g] == p[g] for g in range(env.G)] for r, p in zip(router, oracle_path)])
    gain = o - rnd
    return {"checkpoint": checkpoint, "examples": len(ids), "oracle_logp": float(o.mean()),
            "router_logp": float(r_out.mean()), "random_route_logp": float(rnd.mean()),
            "agreement_path": float(same.all(1).mean()), "agreement_group": same.mean(0).tolist(),
            "recovered": float(np.mean((r_out - rnd)[gain > 1e-9] / gain[gain > 1e-9]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", action="append", required=True)
    ap.add_argument("--env", default="layermoe-arc")
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    rows = [measure(c, args.env, args.examples, args.data_dir) for c in args.checkpoint]
    text = json.dumps(rows, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
