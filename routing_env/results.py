"""The pipeline's results table: per method, mean and spread over seeds of accuracy, balance and time.

Balance metrics are those of the test evaluation, per transformer layer, averaged over layers:
coefficient of variation of the expert loads (0 = balanced), max/mean load (1 = balanced) and
normalised entropy (1 = balanced). Plain LoRA has no experts, so no balance figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from routing_env.safefiles import atomic_write_text

__all__ = ["run_metrics", "aggregate", "check_replace", "write_table"]

METRICS = ("accuracy", "cv", "max_over_mean", "norm_entropy")


def run_metrics(results: dict) -> dict[str, float | None]:
    """One fine-tune's ``results.json`` -> test accuracy and layer-averaged balance metrics."""
    layers = results["test"].get("layers") or {}
    out: dict[str, float | None] = {"accuracy": results["test"]["accuracy"]}
    for k in METRICS[1:]:
        out[k] = float(np.mean([s[k] for s in layers.values()])) if layers else None
    return out


def _stat(values: Sequence[float | None]) -> dict[str, Any]:
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None, "values": []}
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "values": v}


def aggregate(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """``{method: [per-seed {"metrics": run_metrics, "seconds": {stage: s}, "seed": n}]}`` -> summary."""
    table = {}
    for method, per_seed in runs.items():
        row = {k: _stat([r["metrics"][k] for r in per_seed]) for k in METRICS}
        stages = list(dict.fromkeys(s for r in per_seed for s in r["seconds"]))  # in pipeline order
        row["seconds"] = {s: _stat([r["seconds"].get(s) for r in per_seed]) for s in stages}
        row["seeds"] = [r["seed"] for r in per_seed]
        if per_seed and all("paired_with" in r for r in per_seed):
            # Same seed, same lora-moe run up to the warm-up: the per-seed difference is the effect.
            row["paired_diff"] = {k: _stat([None if r["metrics"][k] is None else r["metrics"][k] - r["paired_with"][k]
                                            for r in per_seed]) for k in ("accuracy", "cv")}
        table[method] = row
    return table


def _fmt(s: dict, scale: float = 1.0, digits: int = 3, signed: bool = False) -> str:
    if s["mean"] is None:
        return "n/a"
    sign = "+" if signed else ""
    if len(s["values"]) < 2:  # one seed has no spread; "± 0" would claim one
        return f"{s['mean'] * scale:{sign}.{digits}f}"
    return f"{s['mean'] * scale:{sign}.{digits}f} ± {s['std'] * scale:.{digits}f}"


def _pairs(table: dict[str, dict]) -> set[tuple[str, int]]:
    return {(method, seed) for method, row in table.items() for seed in row.get("seeds", [])}


def check_replace(path: Path, table: dict[str, dict]) -> None:
    """Refuse to replace the table at ``path`` with one that lacks any of its (method, seed) runs.

    A table grows as seeds and methods finish; a run with fewer methods or seeds (``--methods aux
    --table-only``) must not silently replace the full table with its subset.
    """
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())["methods"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # not a table of ours: nothing to lose
    lost = sorted(_pairs(old) - _pairs(table))
    if lost:
        names = ", ".join(f"{m} s{s}" for m, s in lost[:8]) + (f" and {len(lost) - 8} more" if len(lost) > 8 else "")
        raise ValueError(f"{path} already holds runs this table lacks ({names}); a table is never replaced by a subset "
                         "of itself. Give the full --methods and --seeds, or write it elsewhere with --results-dir")


def write_table(task: str, table: dict[str, dict], out_dir: str | Path, budget: dict, writer: Any = None,
                provenance: dict | None = None) -> Path:
    """``<out_dir>/<task>.md`` + ``.json`` and ``<task>_accuracy_vs_balance.png`` (and TensorBoard).

    ``budget`` is every setting the table's runs share; ``provenance`` the command, commit and date
    that made the table (``routing_env.identity.provenance``). Both are written under the table.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    check_replace(out / f"{task}.json", table)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {task}: test accuracy and expert balance (mean ± sample std over seeds; one seed: no spread)", "",
             "Paired Δ: layermoe minus the same seed's lora-moe run, which it continues from the warm-up "
             "checkpoint (only the routing loss differs).", "",
             "| method | seeds | test accuracy (%) | paired Δ accuracy (pts) | load CV | paired Δ CV | max/mean | "
             "norm. entropy | wall time per stage (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method, row in table.items():
        times = ", ".join(f"{s} {row['seconds'][s]['mean']:.0f}" for s in row["seconds"] if row["seconds"][s]["mean"] is not None)
        diff = row.get("paired_diff")
        d_acc = _fmt(diff["accuracy"], 100, 2, signed=True) if diff else ""
        d_cv = _fmt(diff["cv"], signed=True) if diff else ""
        lines.append(f"| {method} | {len(row['seeds'])} | {_fmt(row['accuracy'], 100, 2)} | {d_acc} | {_fmt(row['cv'])} | "
                     f"{d_cv} | {_fmt(row['max_over_mean'])} | {_fmt(row['norm_entropy'])} | {times} |")
    lines += ["", "Budget (the same for every method): " + ", ".join(f"{k} {v}" for k, v in budget.items()), ""]
    if provenance:
        lines += [f"Made by `{provenance.get('command')}` at commit {provenance.get('commit')}, {provenance.get('date')}.",
                  ""]
    atomic_write_text(out / f"{task}.md", "\n".join(lines))
    atomic_write_text(out / f"{task}.json", json.dumps({"task": task, "budget": budget, "provenance": provenance,
                                                        "methods": table}, indent=2))

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method, row in table.items():
        if row["cv"]["mean"] is None:
            ax.axhline(row["accuracy"]["mean"] * 100, ls="--", lw=1, color="grey", label=f"{method} (no experts)")
            continue
        xs, ys = row["cv"]["values"], [a * 100 for a in row["accuracy"]["values"]]
        pts = ax.scatter(xs, ys, alpha=0.35, s=18)
        ax.errorbar(row["cv"]["mean"], row["accuracy"]["mean"] * 100, xerr=row["cv"]["std"],
                    yerr=row["accuracy"]["std"] * 100, fmt="o", color=pts.get_facecolor()[0][:3], capsize=3, label=method)
    ax.set_xlabel("expert-load CV on test (lower = more balanced)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{task}: accuracy vs imbalance", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{task}_accuracy_vs_balance.png", dpi=110)
    if writer is not None:
        writer.add_figure(f"results/{task}_accuracy_vs_balance", fig, 0)
        writer.add_text(f"results/{task}", "\n".join(lines))
    plt.close(fig)
    return out / f"{task}.md"
