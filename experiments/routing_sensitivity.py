"""How much does the route decide, with and without the answer? Router vs random vs oracle routes on dev.

    python experiments/routing_sensitivity.py --examples 300 --output results/routing_sensitivity.json

For each task of the table, seed and checkpoint (the lora-moe run and its layermoe-exhaustive
continuation, ``runs/pipeline/<task>/...``), on the first ``--examples`` dev questions, with the env's
routing (one primary expert per layer group and question, in every token's top-k) and balance
weight 0 so every number is the model's own:

* ``router``: the learned router's greedy route;
* ``random``: uniformly random routes (``--random-draws`` seeded draws, averaged);
* ``oracle``: the exhaustive oracle's route, chosen *knowing the answer* (max log p(correct)); for the
  ``--oracle-kinds`` checkpoints only (it costs 28 times the other two).

``router - random`` is what routing learned from the input is worth; ``oracle - router`` is what
the best route in hindsight would add. Stage 3 can only move the router; if the first is about zero
while the second is large, the routes that help are not predictable from the question, and
supervising the router with them cannot raise accuracy much. Dev only: the table's test split is not
read. Rows are written to ``--output`` as they finish; a rerun skips finished rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gymnasium as gym
import numpy as np
from tqdm import tqdm

import agents
from routing_env import pipeline
from routing_env.compare import LAYERMOE

#: the tasks of the results table (the pipeline maps each to its registered env id)
TASKS = ("arc-easy", "arc-challenge", "obqa")
#: the table's stage-3 runs are named by the pipeline's tag of its settings (`make reproduce`, compare's LAYERMOE)
_TAG = pipeline.settings_tag(pipeline.PipelineConfig(**LAYERMOE), pipeline.SEARCH_FIELDS + pipeline.STAGE3_FIELDS)
#: checkpoint kind -> run folder under runs/pipeline/<task>/ ({s} = seed)
RUNS = {"lora-moe": "lora-moe-s{s}", "layermoe": f"layermoe-exhaustive{_TAG}-s{{s}}"}


def _score(results: list) -> dict:
    return {"accuracy": float(np.mean([r.correct for r in results])),
            "logp": float(np.mean([r.outcome for r in results]))}


def measure(checkpoint: str, env_id: str, n: int, draws: int, data_dir: str | None, oracle: bool = True) -> dict:
    """Accuracy and mean log p(correct) of the router's, random and (``oracle``) the oracle's routes on dev."""
    env = gym.make(env_id, checkpoint=checkpoint, split="dev", data_dir=data_dir, balance_weight=0.0).unwrapped
    ids = list(range(min(n, len(env.examples))))
    row = {"checkpoint": checkpoint, "examples": len(ids),
           "router": _score(agents.run_agent(agents.make("router"), env, ids))}
    rnd = [_score(agents.run_agent(agents.make("random", seed=d), env, ids)) for d in range(draws)]
    row["random"] = {k: float(np.mean([r[k] for r in rnd])) for k in ("accuracy", "logp")}
    if oracle:  # 84 group forwards per question (4 experts, 3 groups) against 3 per route above
        found = []
        for start in tqdm(range(0, len(ids), 16), desc=f"oracle {Path(checkpoint).parent.name}", leave=False):
            found += agents.run_agent(agents.make("exhaustive"), env, ids[start : start + 16])
        row["oracle"] = _score(found)
    env.close()
    return row


def summarize(rows: dict) -> str:
    """Markdown: per task and checkpoint kind, mean ± std over seeds of the three routes and their gaps."""
    n = sorted({r["examples"] for r in rows.values() if "examples" in r})
    lines = ["# What the route decides: dev accuracy of the router's, random and the oracle's routes\n",
             f"First {'/'.join(map(str, n))} dev questions per task; the env's routing (one primary expert per layer "
             "group and question), balance weight 0; oracle = the exhaustive search's route chosen knowing the "
             "answer; mean ± sample std over seeds. `python experiments/routing_sensitivity.py`\n",
             "| task | checkpoint | seeds | router acc % | random acc % | oracle acc % | router - random (pts) "
             "| oracle - router (pts) | log p: router / random / oracle |", "| --- " * 9 + "|"]
    for task in TASKS:
        for kind in RUNS:
            rs = [r for k, r in sorted(rows.items()) if k.startswith(f"{task}/{kind}/")]
            if not rs:
                continue
            routes = [w for w in ("router", "random", "oracle") if all(w in r for r in rs)]
            acc = {w: 100 * np.array([r[w]["accuracy"] for r in rs]) for w in routes}
            lp = {w: np.mean([r[w]["logp"] for r in rs]) for w in routes}

            def ms(x: np.ndarray | None, fmt: str = "{:.2f}") -> str:
                if x is None:
                    return "n/a"
                return fmt.format(x.mean()) + (f" ± {x.std(ddof=1):.2f}" if len(x) > 1 else "")

            oracle = acc.get("oracle")
            lines.append(f"| {task} | {kind} | {len(rs)} | {ms(acc['router'])} | {ms(acc['random'])} | "
                         f"{ms(oracle)} | {ms(acc['router'] - acc['random'], '{:+.2f}')} | "
                         f"{ms(None if oracle is None else oracle - acc['router'], '{:+.2f}')} | "
                         + " / ".join(f"{lp[w]:.3f}" if w in lp else "n/a" for w in ("router", "random", "oracle"))
                         + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/pipeline", help="the pipeline's --logdir")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--kinds", default=",".join(RUNS))
    ap.add_argument("--examples", type=int, default=300)
    ap.add_argument("--random-draws", type=int, default=4)
    ap.add_argument("--oracle-kinds", default="lora-moe", help="checkpoint kinds that also get the (costly) oracle")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--output", default="results/routing_sensitivity.json")
    args = ap.parse_args()
    out = Path(args.output)
    rows: dict = json.loads(out.read_text()) if out.exists() else {}
    for task in args.tasks.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            for kind in args.kinds.split(","):
                key = f"{task}/{kind}/s{seed}"
                if key in rows:
                    continue
                ckpt = Path(args.runs) / task / RUNS[kind].format(s=seed) / "final"
                if not ckpt.exists():
                    raise SystemExit(f"error: no checkpoint {ckpt}; run the pipeline for {task} seed {seed} first")
                rows[key] = measure(str(ckpt), pipeline.TASK_ENV[task], args.examples, args.random_draws, args.data_dir,
                                    oracle=kind in args.oracle_kinds.split(","))
                out.write_text(json.dumps(rows, indent=2) + "\n")  # each finished row survives a crash
                print(key, json.dumps({w: v for w, v in rows[key].items() if isinstance(v, dict)}), flush=True)
    out.with_suffix(".md").write_text(summarize(rows))
    print(summarize(rows))


if __name__ == "__main__":
    main()
