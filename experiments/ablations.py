"""LayerMoE stage-3 ablations on the dev split, each paired with the same lora-moe run.

    python experiments/ablations.py --runs /work/runs_abl --seeds 0          # runs what is missing, writes the table

Budget: ARC-Easy, the first ``--train-limit`` (500) training questions, MiniLM LoRA-MoE defaults,
2 epochs (``--expert-iteration``: also 3-epoch runs, one round of search vs two). Per seed: the lora-moe run (``moe-s<seed>``), searches on its epoch-1 checkpoint
(``train_rl.py``: exhaustive oracle at two balance weights, MCTS, the router itself), then every
variant continues that run for epoch 2 with its routing loss (paired design). Only dev is read
(``--eval-test false``); the test split is left for the final table. Finished runs are skipped.
Writes ``results/ablations.md`` and ``results/ablations.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--task", "arc-easy", "--epochs", "2", "--eval-test", "false"]

#: search name -> train_rl.py arguments (on the seed's epoch-1 checkpoint)
SEARCHES = {
    "exh": ["--agent", "exhaustive", "--balance-weight", "0.1"],
    "exh-bw0": ["--agent", "exhaustive", "--balance-weight", "0"],
    "exh-bw1": ["--agent", "exhaustive", "--balance-weight", "1"],
    "router": ["--agent", "router", "--balance-weight", "0.1"],
    "mcts": ["--agent", "mcts", "--num-simulations", "32", "--balance-weight", "0.1"],
}

#: variant -> (search, finetune.py stage-3 arguments)
VARIANTS = {
    "beta 0 (checks the pairing: should equal the base)": ("exh", ["--beta", "0"]),
    "router control, beta 1": ("router", ["--beta", "1"]),
    "oracle one-hot, beta 1": ("exh", ["--beta", "1"]),
    "oracle one-hot, beta 0.3": ("exh", ["--beta", "0.3"]),
    "oracle one-hot, beta 3": ("exh", ["--beta", "3"]),
    "oracle softmax(Q/0.05), beta 1": ("exh", ["--beta", "1", "--target-form", "softmax", "--target-temperature", "0.05"]),
    "oracle softmax(Q/0.01), beta 1": ("exh", ["--beta", "1", "--target-form", "softmax", "--target-temperature", "0.01"]),
    "oracle one-hot, sinkhorn, beta 1": ("exh", ["--beta", "1", "--target-balance", "sinkhorn"]),
    "oracle softmax(Q/0.05), sinkhorn, beta 1": ("exh", ["--beta", "1", "--target-form", "softmax",
                                                         "--target-temperature", "0.05", "--target-balance", "sinkhorn"]),
    "oracle one-hot, per token, beta 1": ("exh", ["--beta", "1", "--route-granularity", "token"]),
    "oracle route teacher-forced 0.5, beta 0": ("exh", ["--beta", "0", "--teacher-forcing", "0.5"]),
    "oracle route teacher-forced 0.5, beta 1": ("exh", ["--beta", "1", "--teacher-forcing", "0.5"]),
    "oracle (balance weight 0) one-hot, beta 1": ("exh-bw0", ["--beta", "1"]),
    "oracle (balance weight 1) one-hot, beta 1": ("exh-bw1", ["--beta", "1"]),
    "MCTS-32 visits, beta 1": ("mcts", ["--beta", "1"]),
}


def _run(cmd: list[str], done: Path) -> None:
    if done.is_file():
        return
    print("$", shlex.join(cmd), flush=True)
    subprocess.run([sys.executable if c == "python" else c for c in cmd], check=True, cwd=ROOT)


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s).strip("-").replace("--", "-")


def _dev(res: dict) -> tuple[float, float]:
    last = res["history"][-1]["dev"]
    return last["accuracy"], float(np.mean([s["cv"] for s in last["layers"].values()]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/ablations", help="folder of the runs (not committed)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--train-limit", type=int, default=500)
    ap.add_argument("--only", default=None, help="comma-separated variant slugs to run, e.g. router-control-beta-1 "
                    "(default: all)")
    ap.add_argument("--table-only", action="store_true", help="write the table from finished runs, run nothing")
    ap.add_argument("--expert-iteration", action="store_true", help="also run the 3-epoch expert-iteration comparison "
                    "(base, one round, two rounds) for each seed")
    args = ap.parse_args()
    py, runs = "python", Path(args.runs)
    limit = ["--train-limit", str(args.train_limit)]
    slugs = {_slug(v): v for v in VARIANTS}
    unknown = set(args.only.split(",")) - set(slugs) if args.only else set()
    if unknown:
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}; valid: {', '.join(slugs)}")
    chosen = [slugs[s] for s in args.only.split(",")] if args.only else list(VARIANTS)
    rows, commands = [], {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        base = runs / f"moe-s{seed}"
        cmd = [py, "finetune.py", *COMMON, *limit, "--method", "lora-moe", "--seed", str(seed), "--logdir", str(runs),
               "--name", base.name]
        commands["lora-moe (the paired base)"] = cmd
        if not args.table_only:
            _run(cmd, base / "results.json")
        if not (base / "results.json").is_file():
            continue
        ck = base / "checkpoints" / "epoch_1"
        base_acc, base_cv = _dev(json.loads((base / "results.json").read_text()))
        rows.append({"variant": "lora-moe (the paired base)", "seed": seed, "dev_accuracy": base_acc, "dev_cv": base_cv})
        for variant in chosen:
            search, extra = VARIANTS[variant]
            s_dir = runs / f"search-{search}-s{seed}"
            s_cmd = [py, "train_rl.py", "--env", "layermoe-arc", *SEARCHES[search], "--checkpoint", str(ck),
                     "--num-examples", str(args.train_limit), "--seed", str(seed), "--logdir", str(runs), "--name", s_dir.name]
            name = f"{_slug(variant)}-s{seed}"
            cmd = [py, "finetune.py", *COMMON, *limit, "--method", "layermoe", "--seed", str(seed), "--init-checkpoint",
                   str(ck), "--targets", str(s_dir / "targets.jsonl"), *extra, "--logdir", str(runs), "--name", name]
            commands[variant] = s_cmd + ["&&"] + cmd
            if not args.table_only:
                _run(s_cmd, s_dir / "summary.json")
                _run(cmd, runs / name / "results.json")
            if not (runs / name / "results.json").is_file():
                continue
            res = json.loads((runs / name / "results.json").read_text())
            acc, cv = _dev(res)
            summ = json.loads((s_dir / "summary.json").read_text())
            rows.append({"variant": variant, "seed": seed, "dev_accuracy": acc, "dev_cv": cv,
                         "paired_diff_accuracy": acc - base_acc, "paired_diff_cv": cv - base_cv,
                         "targets_histogram": res["targets_histogram"],
                         "search_outcome": summ["agent"]["outcome_mean"], "router_outcome": summ["router"]["outcome_mean"],
                         "search_seconds_per_question": summ["wall_time_s"] / summ["agent"]["examples"]})
    if args.expert_iteration:
        for seed in [int(s) for s in args.seeds.split(",")]:
            _expert_iteration(seed, runs, limit, rows, commands, args.table_only)
    _write(rows, commands, args)


#: the best stage-3 setting of the two-epoch ablations, used by every expert-iteration run
BEST = ["--beta", "1", "--target-form", "softmax", "--target-temperature", "0.05", "--target-balance", "sinkhorn"]


def _expert_iteration(seed: int, runs: Path, limit: list[str], rows: list[dict], commands: dict, table_only: bool) -> None:
    """Search -> train -> search again, against one round, both paired with a 3-epoch lora-moe run.

    Round 1 searches the base's epoch-1 checkpoint and trains epochs 2-3 on those targets (one
    round). Round 2 searches that run's epoch-2 model again and trains epoch 3 on the new targets,
    continuing the same chain (optimiser, schedule, RNG), so the two differ only in epoch 3's targets.
    """
    py, common = "python", ["--task", "arc-easy", "--epochs", "3", "--eval-test", "false", *limit]
    base = runs / f"moe3-s{seed}"
    steps = [("lora-moe, 3 epochs (the paired base)",
              [py, "finetune.py", *common, "--method", "lora-moe", "--seed", str(seed), "--logdir", str(runs),
               "--name", base.name], base / "results.json", None)]
    for rnd, start in ((1, base / "checkpoints" / "epoch_1"), (2, runs / f"ei-round1-s{seed}" / "checkpoints" / "epoch_2")):
        s_dir = runs / f"search3-exh-r{rnd}-s{seed}"
        s_cmd = [py, "train_rl.py", "--env", "layermoe-arc", *SEARCHES["exh"], "--checkpoint", str(start),
                 "--num-examples", limit[1], "--seed", str(seed), "--logdir", str(runs), "--name", s_dir.name]
        name = f"ei-round{rnd}-s{seed}"
        cmd = [py, "finetune.py", *common, "--method", "layermoe", "--seed", str(seed), "--init-checkpoint", str(start),
               "--targets", str(s_dir / "targets.jsonl"), *BEST, "--logdir", str(runs), "--name", name]
        label = ("expert iteration, 1 round: oracle targets of the epoch-1 model for epochs 2-3" if rnd == 1 else
                 "expert iteration, 2 rounds: epoch 3 on targets re-searched on the round-1 epoch-2 model")
        steps += [(None, s_cmd, s_dir / "summary.json", None), (label, cmd, runs / name / "results.json", s_dir)]
    base_acc = base_cv = None
    for label, cmd, done, s_dir in steps:
        if label:
            commands[label] = cmd
        if not table_only:
            _run(cmd, done)
        if not done.is_file():
            return
        if label is None:
            continue
        res = json.loads(done.read_text())
        acc, cv = _dev(res)
        row = {"variant": label, "seed": seed, "dev_accuracy": acc, "dev_cv": cv}
        if base_acc is None:
            base_acc, base_cv = acc, cv
        else:
            summ = json.loads((s_dir / "summary.json").read_text())
            row.update({"paired_diff_accuracy": acc - base_acc, "paired_diff_cv": cv - base_cv,
                        "targets_histogram": res["targets_histogram"], "search_outcome": summ["agent"]["outcome_mean"],
                        "router_outcome": summ["router"]["outcome_mean"],
                        "search_seconds_per_question": summ["wall_time_s"] / summ["agent"]["examples"]})
        rows.append(row)


def _write(rows: list[dict], commands: dict, args) -> None:
    out = ROOT / "results"
    (out / "ablations.json").write_text(json.dumps({"train_limit": args.train_limit, "rows": rows,
                                                     "commands": {k: shlex.join(v) for k, v in commands.items()}}, indent=2))
    lines = ["# LayerMoE stage-3 ablations (ARC-Easy dev, paired with the same lora-moe run)", "",
             f"Budget: first {args.train_limit} ARC-Easy training questions, MiniLM-L6 LoRA-MoE (4 experts, top-2, r 8), "
             "2 epochs; every variant is epoch 2 of the base run plus its routing loss (same optimiser state, schedule, "
             "batches, dropout). Dev split (570 questions) only; test unread. Δ = variant minus base, same seed.", "",
             "| variant | seed | dev acc (%) | Δ acc (pts) | dev CV | Δ CV | mean target per expert, group 0 / 1 / 2 | "
             "search log p (router) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        hist = " / ".join("[" + " ".join(f"{x:.2f}" for x in g) + "]" for g in r.get("targets_histogram") or [])
        d_acc = f"{100 * r['paired_diff_accuracy']:+.2f}" if "paired_diff_accuracy" in r else ""
        d_cv = f"{r['paired_diff_cv']:+.3f}" if "paired_diff_cv" in r else ""
        srch = f"{r['search_outcome']:.3f} ({r['router_outcome']:.3f})" if "search_outcome" in r else ""
        lines.append(f"| {r['variant']} | {r['seed']} | {100 * r['dev_accuracy']:.2f} | {d_acc} | {r['dev_cv']:.3f} | "
                     f"{d_cv} | {hist} | {srch} |")
    by_variant: dict[str, list[dict]] = {}
    for r in rows:
        if "paired_diff_accuracy" in r:
            by_variant.setdefault(r["variant"], []).append(r)
    multi = {v: rs for v, rs in by_variant.items() if len(rs) > 1}
    if multi:
        lines += ["", "Over seeds (variants run on more than one seed): mean ± sample std of the paired differences.", "",
                  "| variant | seeds | Δ acc (pts) | Δ CV |", "| --- | --- | --- | --- |"]
        for v, rs in multi.items():
            d = 100 * np.array([r["paired_diff_accuracy"] for r in rs])
            c = np.array([r["paired_diff_cv"] for r in rs])
            lines.append(f"| {v} | {len(rs)} | {d.mean():+.2f} ± {d.std(ddof=1):.2f} | {c.mean():+.3f} ± {c.std(ddof=1):.3f} |")
    if any(r["variant"].startswith("expert iteration") for r in rows):
        lines += ["", "Expert iteration rows are paired with their own 3-epoch lora-moe base (\"lora-moe, 3 epochs\"), "
                  "not with the 2-epoch one: one round trains epochs 2-3 on the oracle targets of the epoch-1 model; "
                  "two rounds train epoch 2 the same way, search again on that model, and train epoch 3 on the new "
                  "targets (same optimiser state, schedule and RNG chain). Setting of every expert-iteration run: "
                  "softmax(Q/0.05), sinkhorn, beta 1."]
    lines += ["", "Seed 0's base ran with 2 CPU threads, every other run with 1 (OMP_NUM_THREADS=1): at beta 0 the "
              "dev loss differs by 2e-7 from the base, the accuracy not at all. One question of dev is 0.18 points.",
              "", "## Not run, and why", "",
              "- Outcome vs process reward: the exhaustive oracle's Q* is the same under both (they split the same "
              "return differently), so its targets are identical; MCTS plans through the env's planning interface, "
              "which always uses the process decomposition. The choice only matters to step-based agents (PPO).",
              "", "## Commands", ""] + [f"- {k}: `{shlex.join(v)}`" for k, v in commands.items()] + [""]
    (out / "ablations.md").write_text("\n".join(lines))
    print("\n".join(lines[:len(rows) + 6]))


if __name__ == "__main__":
    main()
