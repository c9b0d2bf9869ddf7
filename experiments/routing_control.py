"""The positive control's nulls and route agreement, beside the pipeline's table on the generated task.

    python -m routing_env.data.generated --out runs/routing-control --num-tags 4 --num-words 16
    python -m routing_env.pipeline --task runs/routing-control --top-k 1 --rank 4 --lr 1e-3 --epochs 8 \
        --warmup-epochs 1 --gate-examples 0 --methods lora-moe,layermoe-exhaustive,layermoe-random,layermoe-router,layermoe-known-route
    python experiments/routing_control.py --runs runs/pipeline/routing-control-<hash>-<budget> --seeds 0,1,2

Two questions the pipeline's table cannot answer alone:

* **Is the gain the search's information, or any one-hot routing loss?** The shuffled null: each
  seed's exhaustive targets re-paired across the training questions (a seeded permutation), so they
  keep their form (one-hot per group), their histogram and the routing loss's size, and lose what ties
  a route to its question's answer. Stage 3 on them continues the same lora-moe epoch checkpoint with
  the exhaustive run's stored settings (``config.json``), only ``--targets`` differs.
* **Did the search find the route the task was built around?** Agreement of each targets file's
  per-group route (its argmax) with the tag route (tag k -> one expert per tag, the best one-to-one
  map per group: experts are exchangeable), against the same statistic with the tags shuffled across
  questions (``--agreement-draws`` draws: mean and 95th percentile), which is what a route carrying no
  tag information scores.

Rows are written to ``--output`` as they finish; the stage-3 runs resume (finetune's own resume).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from routing_env.training import finetune
from routing_env.common.configs import FinetuneConfig
from routing_env.data.generated import TAGS
from routing_env.common.results import dumps_record
from routing_env.common.stats import mcnemar_exact, paired_outcomes

__all__ = ["tag_agreement", "agreement_null", "shuffled_targets", "run"]


def _tags(ids: list[str]) -> np.ndarray:
    """``[N]`` tag index of each routing-control question id (``<split>-<rep>-<tag>-<word>``)."""
    return np.array([TAGS.index(i.split("-")[2]) for i in ids])


def tag_agreement(tags: np.ndarray, route: np.ndarray, num_experts: int) -> float:
    """Share of questions whose ``route [N]`` expert is their tag's under the best one-to-one tag -> expert map."""
    K = int(tags.max()) + 1
    counts = np.zeros((K, num_experts))
    np.add.at(counts, (tags, route), 1)
    best = max(sum(counts[k, p[k]] for k in range(K)) for p in itertools.permutations(range(num_experts), K))
    return float(best / len(tags))


def agreement_null(tags: np.ndarray, route: np.ndarray, num_experts: int, draws: int, seed: int) -> dict:
    """The agreement of ``route`` with tags shuffled across questions: ``{"mean", "p95"}``."""
    rng = np.random.default_rng(seed)
    vals = [tag_agreement(rng.permutation(tags), route, num_experts) for _ in range(draws)]
    return {"mean": float(np.mean(vals)), "p95": float(np.quantile(vals, 0.95))}


def shuffled_targets(src: Path, dst: Path, seed: int) -> Path:
    """``src``'s records with their routes (targets, values, path, outcome...) re-paired across questions."""
    lines = src.read_text().splitlines()
    header, recs = lines[0], [json.loads(x) for x in lines[1:]]
    order = np.random.default_rng([seed, 0x5F]).permutation(len(recs))
    keep = ("example", "id")
    out = [header] + [json.dumps({**{k: r[k] for k in keep}, **{k: v for k, v in recs[j].items() if k not in keep}})
                      for r, j in zip(recs, order)]
    dst.write_text("\n".join(out) + "\n")
    return dst


def _routes(path: Path) -> tuple[list[str], np.ndarray, int]:
    recs = [json.loads(x) for x in path.read_text().splitlines()[1:]]
    t = np.array([r["targets"] for r in recs])  # [N, G, E]
    return [r["id"] for r in recs], t.argmax(-1), t.shape[-1]


def _paired(a: dict, b: dict) -> dict:
    """layermoe ``a`` minus lora-moe ``b`` on the test questions both answered."""
    _, ca, cb = paired_outcomes(a["test"]["questions"], b["test"]["questions"])
    mc = mcnemar_exact(ca, cb)
    return {"delta_pts": 100 * (float(np.mean(ca)) - float(np.mean(cb))), "mcnemar_p": mc["p"]}


def run(runs: Path, seeds: list[int], output: Path, draws: int = 200, records: Path | None = None) -> dict:
    """Agreement and the shuffled null for ``seeds`` of the pipeline folder ``runs``; rows merged into ``output``."""
    out = json.loads(output.read_text()) if output.is_file() else {"seeds": {}}
    for seed in seeds:
        exh = runs / f"layermoe-exhaustive-s{seed}"  # the pipeline's default stage-3 settings (no tag)
        cfg = json.loads((exh / "config.json").read_text())
        row: dict = {"agreement": {}}
        for name in ("exhaustive", "random", "router", "known-route"):
            f = runs / f"search-{name}-s{seed}" / "targets.jsonl"
            if not f.is_file():
                continue
            ids, route, E = _routes(f)
            tags = _tags(ids)
            row["agreement"][name] = [{"agreement": tag_agreement(tags, route[:, g], E),
                                       "null": agreement_null(tags, route[:, g], E, draws, seed)}
                                      for g in range(route.shape[1])]
        shuffled = shuffled_targets(Path(cfg["targets"]), runs / f"targets-shuffled-s{seed}.jsonl", seed)
        name = f"layermoe-shuffled-s{seed}"
        res = finetune.main(FinetuneConfig(**(cfg | {"targets": str(shuffled), "name": name})))
        if records is not None:  # committed beside the pipeline's own records of this task folder
            (records / f"{name}.json").write_text(dumps_record(res))
        base = json.loads((runs / f"lora-moe-s{seed}" / "results.json").read_text())
        row["lora-moe"] = base["test"]["accuracy"]
        for arm, r in (("exhaustive", json.loads((exh / "results.json").read_text())), ("shuffled", res)):
            row[arm] = {"accuracy": r["test"]["accuracy"], **_paired(r, base)}
        out["seeds"][str(seed)] = row
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(out, indent=1) + "\n")
    output.with_suffix(".md").write_text(render(out))
    return out


def render(out: dict) -> str:
    lines = ["| seed | lora-moe % | exhaustive % | Δ (pts), McNemar p | shuffled-route null % | Δ (pts), McNemar p | "
             "tag agreement of the searched route, per group (null mean / p95) |", "| --- " * 7 + "|"]
    for s, r in sorted(out["seeds"].items()):
        ag = "; ".join(f"{a['agreement']:.2f} ({a['null']['mean']:.2f} / {a['null']['p95']:.2f})"
                       for a in r["agreement"].get("exhaustive", []))
        lines.append(f"| {s} | {100 * r['lora-moe']:.1f} | {100 * r['exhaustive']['accuracy']:.1f} | "
                     f"{r['exhaustive']['delta_pts']:+.1f}, {r['exhaustive']['mcnemar_p']:.2g} | "
                     f"{100 * r['shuffled']['accuracy']:.1f} | {r['shuffled']['delta_pts']:+.1f}, "
                     f"{r['shuffled']['mcnemar_p']:.2g} | {ag} |")
    return "\n".join(lines) + "\n"


#: the control table's rows: (label, record name pattern under results/runs/<folder>/, {s} = seed)
ARMS = (("lora-moe", "lora-moe-s{s}"),
        ("layermoe-exhaustive (searched routes)", "layermoe-exhaustive-s{s}"),
        ("null: the same targets re-paired across questions", "layermoe-shuffled-s{s}"),
        ("layermoe-random (uniform targets)", "layermoe-random-s{s}"),
        ("layermoe-router (its own near-uniform targets)", "layermoe-router-s{s}"),
        ("layermoe-known-route (the designed route)", "layermoe-known-route-s{s}"),
        ("known route, teacher-forced, beta 0", "layermoe-known-route-c2ef6add-s{s}"),
        ("known route, teacher-forced, beta 1", "layermoe-known-route-830c4d91-s{s}"),
        ("known route, teacher-forced, --route-loss-grad router", "layermoe-known-route-96e3520a-s{s}"),
        ("searched routes, teacher-forced, --route-loss-grad router", "layermoe-exhaustive-96e3520a-s{s}"))


def table(records: Path, seeds: list[int]) -> str:
    """The control's Markdown table from committed records: test accuracy, paired Δ over the same
    seed's lora-moe with its per-seed McNemar p, and the last epoch's router-target agreement."""
    def load(pattern: str, s: int) -> dict | None:
        f = records / f"{pattern.format(s=s)}.json"
        return json.loads(f.read_text()) if f.is_file() else None

    lines = ["| arm | seeds | test accuracy % | paired Δ vs lora-moe (pts) | McNemar p per seed | router-target agreement, last epoch |",
             "| --- | --- | --- | --- | --- | --- |"]
    bases = {s: load("lora-moe-s{s}", s) for s in seeds}  # every arm is paired with these
    for label, pattern in ARMS:
        acc, delta, ps, agree = [], [], [], []
        for s in seeds:
            r, base = load(pattern, s), bases[s]
            if r is None or base is None:
                continue
            acc.append(100 * r["test"]["accuracy"])
            if pattern != "lora-moe-s{s}":
                d = _paired(r, base)
                delta.append(d["delta_pts"])
                ps.append(f"s{s} {d['mcnemar_p']:.2g}")
            train = r["history"][-1].get("train", {})
            if "route_agreement" in train:
                agree.append(train["route_agreement"])
        if not acc:
            continue
        def ms(x: list[float], sign: str = "") -> str:
            return f"{np.mean(x):{sign}.1f}" + (f" ± {np.std(x, ddof=1):.1f}" if len(x) > 1 else "")
        lines.append(f"| {label} | {len(acc)} | {ms(acc)} | {ms(delta, '+') if delta else ''} | {', '.join(ps)} | "
                     f"{f'{np.mean(agree):.2f}' if agree else 'n/a'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True, help="the pipeline's task folder of the control (runs/pipeline/<folder>)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--agreement-draws", type=int, default=200, help="tag shuffles of the agreement null")
    ap.add_argument("--output", default="results/control/routing-control-nulls.json")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--records", default=None, help="the pipeline's committed records of the control "
                    "(results/runs/<folder>): the shuffled runs' records go there, and the control table is built from it")
    ap.add_argument("--table-only", action="store_true", help="only rebuild the control table from --records")
    a = ap.parse_args()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    seeds = [int(s) for s in a.seeds.split(",")]
    records = Path(a.records) if a.records else None
    if not a.table_only:
        run(Path(a.runs), seeds, Path(a.output), a.agreement_draws, records)
        print(Path(a.output).with_suffix(".md").read_text())
    if records is not None:
        out = Path(a.output).with_name("routing-control.md")
        out.write_text(table(records, seeds))
        print(out.read_text())


if __name__ == "__main__":
    main()
