"""MCTS against the exact oracle on the real env: regret (optimal minus found log p) per simulation budget.

    python bench/mcts_regret.py --checkpoint runs/arc-easy-lora-moe-s0/checkpoints/epoch_1 --examples 64

Part 1 (a tree small enough to enumerate: primary actions, E=4, G=3, 64 paths): the exhaustive
agent gives every question's optimal path; MCTS at each budget searches the *same* questions; the
balance weight is 0 so both optimise log p(correct) alone and regret is in log-p units. Part 2 (a
tree too big to enumerate: ``combo`` actions over one-layer groups, C(4,2)^6 = 46,656 paths): MCTS
against the learned router's greedy paths. Prints JSON (also written to ``--output``).
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np

import agents
import routing_env  # noqa: F401  (registers the ids)
from routing_env.common.results import report


def _run(agent, env, ids):
    env.load_stats[:] = 0.0  # every agent starts from the same running loads
    t0 = time.time()
    res = agents.run_agent(agent, env, ids)
    return res, time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--env", default="layermoe-arc")
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--simulations", default="2,4,8,16,32")
    ap.add_argument("--big-examples", type=int, default=16, help="questions for part 2 (0 skips it)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    ids = list(range(args.examples))
    out: dict = {"checkpoint": args.checkpoint, "examples": args.examples}

    # ---- part 1: regret against the exact oracle --------------------------------------------------
    env = gym.make(args.env, checkpoint=args.checkpoint, data_dir=args.data_dir, balance_weight=0.0).unwrapped
    oracle, secs = _run(agents.make("exhaustive"), env, ids)
    best = np.array([r.outcome for r in oracle])
    router, _ = _run(agents.make("router"), env, ids)
    rows = [{"agent": "exhaustive", "group_forwards_per_question": oracle[0].extra["group_forwards"],
             "outcome_mean": float(best.mean()), "seconds_per_question": secs / len(ids)},
            {"agent": "router", "regret_mean": float((best - [r.outcome for r in router]).mean()),
             "optimal_share": float(np.mean(np.isclose(best, [r.outcome for r in router], atol=1e-4)))}]
    for sims in [int(s) for s in args.simulations.split(",")]:
        env.cache.clear()  # no search reuses another's cached group forwards in its timing
        found, secs = _run(agents.make("mcts", num_simulations=sims), env, ids)
        regret = best - np.array([r.outcome for r in found])
        rows.append({"agent": f"mcts-{sims}", "simulations_per_group": sims, "regret_mean": float(regret.mean()),
                     "regret_max": float(regret.max()), "optimal_share": float(np.mean(regret < 1e-4)),
                     "nodes_per_question": float(np.mean([r.extra["nodes"] for r in found])),
                     "seconds_per_question": secs / len(ids)})
    out["oracle_vs_mcts"] = rows

    # ---- part 2: a tree too big to enumerate -----------------------------------------------------
    if args.big_examples:
        big = gym.make(args.env, checkpoint=args.checkpoint, data_dir=args.data_dir, balance_weight=0.0,
                       action_mode="combo", group_sizes=[1] * 6).unwrapped
        big_ids = list(range(args.big_examples))
        paths = int(big.action_space.n) ** big.G
        r_router, _ = _run(agents.make("router"), big, big_ids)
        r_mcts, secs = _run(agents.make("mcts", num_simulations=32), big, big_ids)
        out["big_tree"] = {"action_mode": "combo", "groups": big.G, "actions": int(big.action_space.n),
                           "paths_per_question": paths, "examples": len(big_ids),
                           "router_outcome_mean": float(np.mean([r.outcome for r in r_router])),
                           "mcts32_outcome_mean": float(np.mean([r.outcome for r in r_mcts])),
                           "mcts32_seconds_per_question": secs / len(big_ids)}
    report(out, args.output)


if __name__ == "__main__":
    main()
