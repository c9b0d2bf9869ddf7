"""The routing-structure gate: is there anything for searched routes to teach on this model and task?

LayerMoE supervises the router with routes found knowing the answer. That can only help where the
route that helps a question is predictable from the question. Three measurements on dev (answers
used for this analysis only), on a warm-up checkpoint, with every primary path of every question
(``E^G`` paths: the exact oracle's tree):

* **router vs random**: accuracy of the learned router's greedy route minus the mean accuracy over
  all routes (a uniformly random route, exactly), per question, with a question-bootstrap interval.
  If the router routes no better than chance, the router has learned nothing about the route.
* **hindsight gain minus its null**: the best-of-all-routes accuracy knowing the answer, minus the
  router's, against the same best-of selection over perturbations that carry no information: each
  question gets another question's route perturbations (``logp(route) - logp(router's route)`` per
  choice), its choices shuffled, added to its own router-route log-probabilities. A selection over
  ``E^G`` equally large random perturbations also "finds" accuracy; only the excess is structure.
* **expert swap effect**: how much log p(correct) moves when one group's expert is swapped (mean
  ``|Δ|`` over groups and alternatives), against the router route's margin between its top two
  choices: a swap that moves log p far less than the margin cannot change an answer.

``structure`` is true when router - random is at least 2 points with an interval above 0 and the
hindsight gain exceeds its null's 95th percentile; otherwise the result carries a plain warning.

    python -m routing_env.search.gate --checkpoint runs/x/checkpoints/epoch_1 --task arc-easy --examples 200
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["MIN_ROUTER_GAIN", "WARMUP_KEYS", "GateConfig", "gate", "route_table", "run", "shuffled_null", "summary_line",
           "table", "verdict", "warmup_settings", "main"]

#: router - random accuracy (share) the gate asks for, with a bootstrap interval above 0
MIN_ROUTER_GAIN = 0.02


def route_table(env: Any, example_ids: Sequence[int], chunk: int = 8) -> tuple[list[np.ndarray], np.ndarray, list[tuple]]:
    """Every valid primary path of every question: ``logp`` (per question ``[P, C]``), ``answer [Q]`` and the paths ``[P]``.

    One ``evaluate_paths`` call per ``chunk`` questions, so the cached prefixes of a question's paths
    are shared. Refuses trees over 4096 paths (use a smaller model or MCTS).
    """
    from agents.base import action_widths

    paths = list(itertools.product(*[range(w) for w in action_widths(env)]))
    if len(paths) > 4096:
        raise ValueError(f"{len(paths)} paths per question: the gate enumerates them all; use fewer groups or experts")
    logp: list[np.ndarray] = []
    answer = np.zeros(len(example_ids), dtype=int)
    for s in range(0, len(example_ids), chunk):
        ids = [int(i) for i in example_ids[s : s + chunk]]
        res = env.evaluate_paths([i for i in ids for _ in paths], [list(p) for _ in ids for p in paths])
        for n in range(len(ids)):
            logp.append(np.stack(res["logp"][n * len(paths) : (n + 1) * len(paths)]))  # [P, C]
            answer[s + n] = res["answer"][n * len(paths)]
    return logp, answer, paths


def _best_of(logp: list[np.ndarray], answer: np.ndarray) -> np.ndarray:
    """``[Q]`` 1 where some route makes the correct choice the argmax (selection knowing the answer)."""
    return np.array([float((lp.argmax(1) == a).any()) for lp, a in zip(logp, answer)])


def shuffled_null(logp: list[np.ndarray], answer: np.ndarray, router: np.ndarray, draws: int = 20,
                  seed: int = 0) -> np.ndarray:
    """``[draws]`` best-of-routes accuracy over answer-agnostic perturbations of the routes' size.

    Question ``q`` keeps its router route's log-probabilities and gets the route perturbations of a
    random other question with as many choices, its choice order shuffled: the same number of
    perturbations, of the same sizes, carrying no information about ``q``'s answer.
    """
    rng = np.random.default_rng([seed, 0x6A7E])
    by_c: dict[int, list[int]] = {}
    for q, lp in enumerate(logp):
        by_c.setdefault(lp.shape[1], []).append(q)
    out = np.zeros(draws)
    for d in range(draws):
        hits = 0.0
        for qs in by_c.values():
            partner = rng.permutation(qs) if len(qs) > 1 else np.array(qs)
            for q, o in zip(qs, partner):
                delta = logp[o] - logp[o][router[o]]  # [P, C] the partner's route perturbations
                delta = delta[:, rng.permutation(delta.shape[1])]  # answer-agnostic: choices shuffled
                hits += float(((logp[q][router[q]] + delta).argmax(1) == answer[q]).any())
        out[d] = hits / len(logp)
    return out


def gate(env: Any, example_ids: Sequence[int], null_draws: int = 20, seed: int = 0) -> dict:
    """The three measurements (module docstring) on ``example_ids`` of ``env``'s split, as a JSON-ready dict."""
    import agents

    logp, answer, paths = route_table(env, example_ids)
    index = {p: n for n, p in enumerate(paths)}
    router_paths = [tuple(int(a) for a in r.path) for r in agents.run_agent(agents.make("router"), env, list(example_ids))]
    router = np.array([index[p] for p in router_paths])
    correct = [lp.argmax(1) == a for lp, a in zip(logp, answer)]  # [Q] of [P]
    acc_router = np.array([float(c[r]) for c, r in zip(correct, router)])
    acc_random = np.array([float(c.mean()) for c in correct])  # the expectation over a uniform route
    diff, lo, hi = _bootstrap(acc_router - acc_random, seed)
    best = _best_of(logp, answer)
    null = shuffled_null(logp, answer, router, null_draws, seed)
    # Swap effect: one group's expert changed on the router's route, every alternative.
    swaps, margins = [], []
    widths = [max(p[g] for p in paths) + 1 for g in range(len(paths[0]))]  # actions of each group
    for lp, a, r in zip(logp, answer, router):
        base = paths[r]
        for g in range(len(base)):
            for alt in range(widths[g]):
                other = base[:g] + (alt,) + base[g + 1 :]
                if alt != base[g] and other in index:
                    swaps.append(abs(lp[index[other], a] - lp[r, a]))
        top = np.sort(lp[r])[::-1]
        margins.append(top[0] - top[1] if len(top) > 1 else np.inf)
    hindsight = float(best.mean() - acc_router.mean())
    null_gain = null - acc_router.mean()
    result = {
        "examples": len(example_ids), "paths_per_question": len(paths),
        "router_accuracy": float(acc_router.mean()), "random_route_accuracy": float(acc_random.mean()),
        "router_minus_random": {"mean": diff, "ci95": [lo, hi]},
        "hindsight_gain": hindsight,
        "shuffled_null_gain": {"mean": float(null_gain.mean()), "std": float(null_gain.std(ddof=1)) if null_draws > 1 else 0.0,
                               "p95": float(np.percentile(null_gain, 95))},
        "hindsight_minus_null": float(hindsight - null_gain.mean()),
        "swap_effect": {"median_abs_dlogp": float(np.median(swaps)), "median_top2_margin": float(np.median(margins))},
    }
    result.update(verdict(result))
    return result


def verdict(result: dict) -> dict:
    """``{"structure": bool}`` plus, when it fails, a ``"warning"`` that says which part failed and by how much."""
    d, n = result["router_minus_random"], result["shuffled_null_gain"]
    router_ok = d["mean"] >= MIN_ROUTER_GAIN and d["ci95"][0] > 0
    hindsight_ok = result["hindsight_gain"] > n["p95"]
    out: dict = {"structure": bool(router_ok and hindsight_ok)}
    if out["structure"]:
        return out
    parts = [f"the router's route scores {100 * d['mean']:+.1f} points over a random route (95% CI "
             f"{100 * d['ci95'][0]:+.1f} to {100 * d['ci95'][1]:+.1f}; the gate asks for {100 * MIN_ROUTER_GAIN:.0f} "
             "with the interval above 0)" + ("" if router_ok else ": the router has not learned which route helps")]
    if hindsight_ok:
        parts.append(f"the route chosen knowing the answer gains {100 * result['hindsight_gain']:.1f} points, above "
                     f"the {100 * n['mean']:.1f} (95th percentile {100 * n['p95']:.1f}) the same choice among "
                     "uninformative perturbations gives: hindsight routes carry something the router does not use")
    else:
        parts.append(f"the route chosen knowing the answer gains {100 * result['hindsight_gain']:.1f} points, no more "
                     f"than the {100 * n['mean']:.1f} (95th percentile {100 * n['p95']:.1f}) the same choice among "
                     "uninformative perturbations gives: a selection effect, nothing for searched routes to teach")
    out["warning"] = "no routing structure shown here: " + "; ".join(parts) + "."
    return out


def _bootstrap(x: np.ndarray, seed: int, n: int = 10000) -> tuple[float, float, float]:
    """Mean of per-question differences ``x`` and its 95% percentile interval over resampled questions."""
    rng = np.random.default_rng([seed, 0xB007])
    means = x[rng.integers(0, len(x), size=(n, len(x)))].mean(1)
    return float(x.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


@dataclass
class GateConfig:
    """What a gate measurement is made on (its identity, as a run's config)."""

    checkpoint: str
    env: str = "layermoe-arc"
    task: str | None = None  # your own task (folder or file) instead of the env id's
    train_file: str | None = None
    dev_file: str | None = None
    test_file: str | None = None
    examples: int = 200
    null_draws: int = 20
    seed: int = 0
    data_dir: str | None = None
    device: str = "auto"


def run(cfg: GateConfig, output: str | Path | None = None) -> dict:
    """The gate on ``cfg.checkpoint``'s first ``cfg.examples`` dev questions, with ``"config"``; written to ``output``."""
    import gymnasium as gym

    import routing_env  # noqa: F401 -- registers the env ids
    from routing_env.data import resolve_task
    from routing_env.common.safefiles import atomic_write_text
    from routing_env.common.utils import pick_device

    if cfg.examples < 1:
        raise ValueError(f"gate examples must be at least 1, got {cfg.examples}")
    custom = cfg.task or cfg.train_file
    source = resolve_task(cfg.task or "", cfg.train_file, cfg.dev_file, cfg.test_file) if custom else None
    env = gym.make(cfg.env, checkpoint=cfg.checkpoint, split="dev", data_dir=cfg.data_dir, balance_weight=0.0,
                   device=str(pick_device(cfg.device)), **({"task": source} if source else {})).unwrapped
    ids = list(range(min(cfg.examples, len(env.examples))))
    result = {"task": env.task, **gate(env, ids, cfg.null_draws, cfg.seed), "config": asdict(cfg),
              "warmup": warmup_settings(cfg.checkpoint)}
    if output is not None:
        atomic_write_text(Path(output), json.dumps(result, indent=2) + "\n")
    return result


def summary_line(res: dict) -> str:
    """One line for a results table: router - random with its interval, hindsight minus null, the verdict."""
    d = res["router_minus_random"]
    return (f"router - random {100 * d['mean']:+.1f} pts [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}], "
            f"hindsight - null {100 * res['hindsight_minus_null']:+.1f} pts, "
            f"{'structure' if res['structure'] else 'NO structure to learn'} ({res['examples']} dev questions)")


#: the warm-up's settings a gate result carries (from the run's config.json beside its checkpoints)
WARMUP_KEYS = ("task", "epochs", "train_limit", "num_experts", "top_k", "rank", "aux_loss_coef", "balance", "lr", "seed")


def warmup_settings(checkpoint: str | Path) -> dict:
    """The settings of the run whose ``checkpoints/epoch_<n>`` (or ``final``) ``checkpoint`` is, if its config is there."""
    cfg = Path(checkpoint).parent.parent / "config.json"
    if not cfg.is_file():
        cfg = Path(checkpoint).parent / "config.json"  # a final/ folder
    made = json.loads(cfg.read_text()) if cfg.is_file() else {}
    return {k: made[k] for k in WARMUP_KEYS if k in made}


def table(folder: str | Path) -> str:
    """Markdown table of every gate result (``*.json``) in ``folder``, one row per setting, with the warm-up's settings."""
    rows = ["| setting | warm-up | dev questions x routes | router % | random % | router - random (95% CI) | "
            "hindsight gain | shuffled null (p95) | swap median abs dlogp / top-2 margin | structure |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for path in sorted(Path(folder).glob("*.json")):
        r = json.loads(path.read_text())
        made = r.get("warmup") or warmup_settings(r["config"]["checkpoint"])
        setting = ", ".join(f"{k} {v}" for k, v in made.items()) or r["config"]["checkpoint"]
        d, n = r["router_minus_random"], r["shuffled_null_gain"]
        rows.append(f"| {path.stem} | {setting} | {r['examples']} x {r['paths_per_question']} | "
                    f"{100 * r['router_accuracy']:.1f} | {100 * r['random_route_accuracy']:.1f} | "
                    f"{100 * d['mean']:+.1f} ({100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}) | "
                    f"{100 * r['hindsight_gain']:+.1f} | {100 * n['mean']:+.1f} ({100 * n['p95']:+.1f}) | "
                    f"{r['swap_effect']['median_abs_dlogp']:.4f} / {r['swap_effect']['median_top2_margin']:.4f} | "
                    f"{'yes' if r['structure'] else 'no'} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--checkpoint", help="a lora-moe checkpoint (the warm-up)")
    ap.add_argument("--table", metavar="FOLDER", help="instead: print the Markdown table of the gate results in FOLDER")
    ap.add_argument("--env", default="layermoe-arc", help="registered env id (the task)")
    ap.add_argument("--task", default=None, help="your own task folder or file instead of the env id's")
    ap.add_argument("--examples", type=int, default=200, help="first N dev questions")
    ap.add_argument("--null-draws", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--output", default=None, help="JSON file for the result")
    a = ap.parse_args(argv)
    if a.table:
        print(table(a.table), end="")
        return {}
    if not a.checkpoint:
        ap.error("--checkpoint is required (or --table FOLDER)")
    if a.examples < 1:
        ap.error(f"--examples must be at least 1, got {a.examples}")
    result = run(GateConfig(checkpoint=a.checkpoint, env=a.env, task=a.task, examples=a.examples,
                            null_draws=a.null_draws, seed=a.seed, data_dir=a.data_dir), a.output)
    print(json.dumps(result, indent=2))
    if "warning" in result:
        print(f"warning: {result['warning']}")
    return result


if __name__ == "__main__":
    main()
