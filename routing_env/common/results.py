"""The pipeline's results table: per method, mean and spread over seeds of accuracy, balance and time.

Balance metrics are those of the test evaluation, per transformer layer, averaged over layers:
coefficient of variation of the expert loads (0 = balanced), max/mean load (1 = balanced) and
normalised entropy (1 = balanced). Plain LoRA has no experts, so no balance figures.

Paired rows (layermoe, each seed continuing that seed's lora-moe run) also get a within-seed test
from the per-question records of both arms' test evaluations (``routing_env.common.stats``): per seed the
exact McNemar p, a question-bootstrap interval of the paired difference pooled over seeds, and the
smallest difference the design can detect within a seed and across the seeds. Records made before
evaluations kept per-question evidence say so (``n/a (no per-question records)``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from routing_env.common.safefiles import atomic_write_text
from routing_env.common.stats import (HAVE_SCIPY, detectable_across_seeds, detectable_within_seed, mcnemar_exact,
                               paired_outcomes, pooled_paired_bootstrap)

__all__ = ["dumps_record", "run_metrics", "run_questions", "aggregate", "check_replace", "write_table", "report"]

METRICS = ("accuracy", "cv", "max_over_mean", "norm_entropy")
#: The paired tests' settings, written into the table's JSON beside their results.
ALPHA, POWER, LEVEL, RESAMPLES, BOOTSTRAP_SEED = 0.05, 0.8, 0.95, 10000, 0
NO_RECORDS = "n/a (no per-question records)"


def dumps_record(obj: Any, indent: int = 2) -> str:
    """JSON of a results record, indented, with every list of plain values on one line.

    A record's per-question block (thousands of ids, labels and log-probability rows) written one
    value per line would be ~150 bytes a question; on one line per list it is ~60, and the record
    stays readable and diffable by key.
    """

    def flat(x: Any) -> bool:  # a list of scalars, or of lists of scalars (logp rows)
        return isinstance(x, list) and all(not isinstance(v, (dict, list)) or
                                           (isinstance(v, list) and all(not isinstance(u, (dict, list)) for u in v))
                                           for v in x)

    def fmt(x: Any, depth: int) -> str:
        pad, inner = " " * (indent * depth), " " * (indent * (depth + 1))
        if isinstance(x, dict) and x:
            items = [f"{inner}{json.dumps(str(k))}: {fmt(v, depth + 1)}" for k, v in x.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(x, list) and x and not flat(x):
            return "[\n" + ",\n".join(inner + fmt(v, depth + 1) for v in x) + "\n" + pad + "]"
        return json.dumps(x, separators=(", ", ": ") if isinstance(x, list) else None)

    return fmt(obj, 0) + "\n"


def run_metrics(results: dict) -> dict[str, float | None]:
    """One fine-tune's ``results.json`` -> test accuracy and layer-averaged balance metrics."""
    layers = results["test"].get("layers") or {}
    out: dict[str, float | None] = {"accuracy": results["test"]["accuracy"]}
    for k in METRICS[1:]:
        out[k] = float(np.mean([s[k] for s in layers.values()])) if layers else None
    return out


def run_questions(results: dict) -> dict | None:
    """One fine-tune's ``results.json`` -> its test evaluation's per-question block (ids, label, pred,
    logp; ``EvalResult.questions``), or None for a record made before evaluations kept one."""
    return (results.get("test") or {}).get("questions")


def _stat(values: Sequence[float | None]) -> dict[str, Any]:
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None, "values": []}
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "values": v}


def aggregate(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """``{method: [per-seed {"metrics": run_metrics, "seconds": {stage: s}, "seed": n}]}`` -> summary.

    A paired row's per-seed entries also carry ``"paired_with"`` (the base run's metrics) and, for the
    within-seed tests, ``"questions"`` and ``"paired_questions"`` (``run_questions`` of the run and of
    its base; None or absent for older records).
    """
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
            row["paired_test"] = _paired_test(per_seed, row["paired_diff"]["accuracy"])
        table[method] = row
    return table


def _paired_test(per_seed: list[dict], diff: dict) -> dict[str, Any]:
    """Within-seed evidence for a paired row: per seed McNemar (base = a, this method = b), the pooled
    question bootstrap of the paired difference and the smallest detectable effects.

    The bootstrap resamples the test questions within each seed and averages the per-seed paired
    differences, so its centre is the table's mean paired Δ and its width the question-sampling
    uncertainty alone (the seed spread is beside it). Across seeds the detectable effect needs only
    the per-seed differences, so older records get it too.
    """
    out: dict[str, Any] = {
        "alpha": ALPHA, "power": POWER,
        "detectable_across_seeds": detectable_across_seeds(diff["std"], len(diff["values"]), ALPHA, POWER),
        "across_seeds_method": "noncentral t" if HAVE_SCIPY else "normal approximation with a t critical value",
        "per_seed": None, "bootstrap": None}
    if not all(r.get("questions") and r.get("paired_questions") for r in per_seed):
        out["note"] = NO_RECORDS
        return out
    pairs, rows = [], []
    for r in per_seed:
        _, base_ok, run_ok = paired_outcomes(r["paired_questions"], r["questions"])  # joined on question id
        test = mcnemar_exact(base_ok, run_ok)  # b: base right, run wrong; c: the reverse
        rows.append({"seed": r["seed"], **test, "diff": (test["c"] - test["b"]) / test["n"],
                     "discordance": (test["b"] + test["c"]) / test["n"],
                     "detectable": detectable_within_seed(test["n"], test["b"] + test["c"], ALPHA, POWER)})
        pairs.append((base_ok, run_ok))
    mean, lo, hi = pooled_paired_bootstrap(pairs, RESAMPLES, BOOTSTRAP_SEED, LEVEL)
    out["per_seed"] = rows
    out["bootstrap"] = {"mean": mean, "lo": lo, "hi": hi, "level": LEVEL, "n_resamples": RESAMPLES,
                        "seed": BOOTSTRAP_SEED, "pooling": "questions resampled within each seed, per-seed differences averaged"}
    return out


def _fmt(s: dict, scale: float = 1.0, digits: int = 3, signed: bool = False) -> str:
    if s["mean"] is None:
        return "n/a"
    sign = "+" if signed else ""
    if len(s["values"]) < 2:  # one seed has no spread; "± 0" would claim one
        return f"{s['mean'] * scale:{sign}.{digits}f}"
    return f"{s['mean'] * scale:{sign}.{digits}f} ± {s['std'] * scale:.{digits}f}"


def _p(p: float) -> str:
    return f"{p:.2g}" if p < 0.01 else f"{p:.2f}"


def _paired_cells(row: dict) -> tuple[str, str]:
    """The table's McNemar-p and bootstrap-interval cells of a row ("" for a row that is not paired)."""
    test = row.get("paired_test")
    if test is None:
        return "", ""
    if test["per_seed"] is None:
        return NO_RECORDS, NO_RECORDS
    ps = ", ".join(f"s{t['seed']} {_p(t['p'])}" for t in test["per_seed"])
    b = test["bootstrap"]
    return ps, f"{b['mean'] * 100:+.2f} [{b['lo'] * 100:+.2f}, {b['hi'] * 100:+.2f}]"


def _detectable_lines(table: dict[str, dict]) -> list[str]:
    """Under the table, per paired method: the smallest paired accuracy difference the design detects."""
    paired = {m: row["paired_test"] for m, row in table.items() if row.get("paired_test") is not None}
    if not paired:
        return []
    lines = [f"Smallest paired accuracy difference detectable (two-sided α {ALPHA}, {POWER:.0%} power). Within a "
             "seed: McNemar on its test questions, ≈ (z(0.975) + z(0.8))·√(d/n), d = share of the n questions the two "
             "arms answer differently (at least the 6/n the exact test needs). Across the seeds: a one-sample t-test "
             f"of the per-seed paired Δ given their sample std ({next(iter(paired.values()))['across_seeds_method']}).",
             ""]
    for method, test in paired.items():
        if test["per_seed"] is None:
            within = f"within a seed {NO_RECORDS}"
        else:
            within = ("within a seed " + " / ".join(f"{t['detectable'] * 100:.2f}" for t in test["per_seed"]) + " pts ("
                      + " / ".join(f"s{t['seed']}" for t in test["per_seed"]) + "; d = "
                      + " / ".join(f"{t['discordance']:.3f}" for t in test["per_seed"]) + ")")
        seeds = len(table[method]["paired_diff"]["accuracy"]["values"])
        det = test["detectable_across_seeds"]
        across = (f"across the {seeds} seeds {det * 100:.2f} pts (std of the paired Δ "
                  f"{table[method]['paired_diff']['accuracy']['std'] * 100:.2f} pts)" if det is not None
                  else f"across the seeds n/a ({seeds} seed{'s' if seeds != 1 else ''})")
        lines.append(f"- {method}: {within}; {across}")
    return lines + [""]


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


def _table_lines(task: str, table: dict[str, dict], budget: dict, provenance: dict | None) -> list[str]:
    """The Markdown table: one row per method, the detectable effects, the budget and where it came from."""
    lines = [f"# {task}: test accuracy and expert balance (mean ± sample std over seeds; one seed: no spread)", "",
             "Paired Δ: layermoe minus the same seed's lora-moe run, which it continues from the warm-up "
             "checkpoint (only the routing loss differs).", "",
             "McNemar p: exact two-sided test of each seed's pair on the test questions both runs answered (joined on "
             f"question id). {LEVEL:.0%} CI: percentile bootstrap of the paired Δ over test questions, resampled "
             "within each seed and the per-seed Δ averaged (question sampling only; the ± is the seed spread).", "",
             "| method | seeds | test accuracy (%) | paired Δ accuracy (pts) | McNemar p per seed | "
             f"paired Δ {LEVEL:.0%} CI (pts, question bootstrap) | load CV | paired Δ CV | max/mean | "
             "norm. entropy | wall time per stage (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method, row in table.items():
        times = ", ".join(f"{s} {row['seconds'][s]['mean']:.0f}" for s in row["seconds"] if row["seconds"][s]["mean"] is not None)
        diff = row.get("paired_diff")
        d_acc = _fmt(diff["accuracy"], 100, 2, signed=True) if diff else ""
        d_cv = _fmt(diff["cv"], signed=True) if diff else ""
        p_cell, ci_cell = _paired_cells(row)
        lines.append(f"| {method} | {len(row['seeds'])} | {_fmt(row['accuracy'], 100, 2)} | {d_acc} | {p_cell} | {ci_cell} | "
                     f"{_fmt(row['cv'])} | {d_cv} | {_fmt(row['max_over_mean'])} | {_fmt(row['norm_entropy'])} | {times} |")
    lines += [""] + _detectable_lines(table)
    lines += ["Budget (the same for every method): " + ", ".join(f"{k} {v}" for k, v in budget.items()), ""]
    if provenance:
        lines += [f"Made by `{provenance.get('command')}` at commit {provenance.get('commit')}, {provenance.get('date')}.",
                  ""]
    return lines


def _plot_accuracy_vs_balance(task: str, table: dict[str, dict]) -> Any:
    """Test accuracy against expert-load CV, each seed a dot and each method's mean ± std a cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    return fig


def write_table(task: str, table: dict[str, dict], out_dir: str | Path, budget: dict, writer: Any = None,
                provenance: dict | None = None) -> Path:
    """``<out_dir>/<task>.md`` + ``.json`` and ``<task>_accuracy_vs_balance.png`` (and TensorBoard).

    ``budget`` is every setting the table's runs share; ``provenance`` the command, commit and date
    that made the table (``routing_env.common.identity.provenance``). Both are written under the table.
    """
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    check_replace(out / f"{task}.json", table)
    out.mkdir(parents=True, exist_ok=True)
    lines = _table_lines(task, table, budget, provenance)
    atomic_write_text(out / f"{task}.md", "\n".join(lines))
    atomic_write_text(out / f"{task}.json", json.dumps({"task": task, "budget": budget, "provenance": provenance,
                                                        "methods": table}, indent=2))
    fig = _plot_accuracy_vs_balance(task, table)
    fig.savefig(out / f"{task}_accuracy_vs_balance.png", dpi=110)
    if writer is not None:
        writer.add_figure(f"results/{task}_accuracy_vs_balance", fig, 0)
        writer.add_text(f"results/{task}", "\n".join(lines))
    plt.close(fig)
    return out / f"{task}.md"


def report(result: dict, out: str | None, indent: int = 2) -> None:
    """How a benchmark reports (``bench/``): ``result`` as JSON on stdout and, with ``out``, in that file
    (written atomically, its folder made)."""
    text = json.dumps(result, indent=indent)
    print(text)
    if out:
        atomic_write_text(out, text + "\n")
