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
read. Rows are written to ``--output`` as they finish; a rerun skips finished rows computed with the
same settings (each row stores them under ``"settings"``; a row without them, or with others, is redone).

**Nulls** (``--nulls``): ``oracle - router`` is a selection knowing the answer, and choosing the best of
many equally small *uninformative* perturbations also "finds" accuracy. With ``--nulls`` every route of
every question is scored (``routing_env.search.gate.route_table``; the oracle is then read off that table:
the route of max log p(correct), as the exhaustive agent at balance weight 0) and the row gets:

* ``best_of``: the selection the nulls mirror, "some route makes the correct choice the argmax",
  and its gain over the router's route (>= oracle - router: the oracle maximises log p(correct));
* ``shuffled_null``: the same best-of-all-routes selection over answer-agnostic perturbations
  (``gate.shuffled_null``: another question's route perturbations, choices shuffled), mean ± std
  over ``--null-draws``; ``real_minus_null`` = best-of gain - null gain. The null centres the
  perturbations on the router's route; where route effects are independent noise, the real selection
  also undoes the router route's own noise, so real - null has a small positive bias (about +3 points
  on a synthetic table whose per-route noise is 0.3 of the choices' spread, 0 at 0.1): a small
  positive real - null is not by itself evidence of structure;
* ``dropout_null``: the router's route kept, and instead of other routes ``R - 1`` random dropout
  masks on the experts' outputs (plus the unmasked route: ``R`` candidates, ``R`` = ``--masks``,
  default the number of routes). A mask zeroes output features of each expert of every LoRA-MoE
  layer independently, ``B_e <- B_e * m_e / (1 - rate)`` with ``m_e ~ Bernoulli(1 - rate)`` per
  output feature (``masked_experts``), the same mask for every token and choice of a question, as a
  route is. **Calibration**: on the first ``--calibration-examples`` questions, ``rate`` is set so that
  the median over (question, mask, choice) of ``|log p_masked - log p_router|`` equals the median over
  (question, other route, choice) of ``|log p_route - log p_router|`` (secant search in log-log space
  over the dropout odds, 8 masks per step, to within 10%); both medians are then re-measured on all
  the row's questions and reported. Best-of-R knowing the answer, gain over the router's route;
* ``label_swap``: on the questions the router gets wrong (with at least 3 choices; on the ones it gets
  right the correct label *is* its top choice, so there is no wrong label at an equal gap), whether
  some route makes the correct label the argmax, against the same for the wrong label (not the
  router's top choice) whose log-prob gap to the router's top choice is nearest the correct label's;
  the two rates and McNemar's exact p (``routing_env.common.stats.mcnemar_exact``). Routes that carry
  answer information flip the correct label more often than an equally distant wrong one;
* ``cv_fixed_route``: the single route (same for every question) with the best accuracy on one half
  of the questions (seeded permutation; ties by mean log p(correct)) scored on the other half minus the
  router's route there, both halves swapped and averaged, over ``--cv-splits`` splits (mean ± std).

To measure a checkpoint outside the table's run folders: ``--checkpoint PATH --task arc-easy``
(repeatable ``--checkpoint``), e.g.

    python experiments/routing_sensitivity.py --checkpoint runs/gate/gate-w500/final --task arc-easy \
        --examples 150 --nulls --output results/routing_sensitivity_nulls.json --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import gymnasium as gym
import numpy as np
from tqdm import tqdm

import agents
from routing_env import pipeline
from routing_env.search import gate
from routing_env.studies.compare import LAYERMOE
from routing_env.common.stats import mcnemar_exact

#: the tasks of the results table (the pipeline maps each to its registered env id)
TASKS = ("arc-easy", "arc-challenge", "obqa")
#: the table's stage-3 runs are named by the pipeline's tag of its settings (`make reproduce`, compare's LAYERMOE)
_TAG = pipeline.settings_tag(pipeline.PipelineConfig(**LAYERMOE), pipeline.SEARCH_FIELDS + pipeline.STAGE3_FIELDS)
#: checkpoint kind -> run folder under runs/pipeline/<task>/ ({s} = seed)
RUNS = {"lora-moe": "lora-moe-s{s}", "layermoe": f"layermoe-exhaustive{_TAG}-s{{s}}"}
#: dropout masks per calibration step, and the tolerance of the matched median (a ratio)
CALIBRATION_MASKS, CALIBRATION_TOL = 8, 1.1


def _score(results: list) -> dict:
    return {"accuracy": float(np.mean([r.correct for r in results])),
            "logp": float(np.mean([r.outcome for r in results]))}


# ---- the nulls, on a route table (pure functions of arrays) -------------------------------------------
def label_argmax_reachable(logp: Sequence[np.ndarray], label: Sequence[int]) -> np.ndarray:
    """``[Q]`` bool: some route (row of ``logp[q]``, ``[P, C]``) makes choice ``label[q]`` the argmax."""
    return np.array([bool((lp.argmax(1) == c).any()) for lp, c in zip(logp, label)])


def route_accuracy(logp: Sequence[np.ndarray], answer: np.ndarray, routes: Sequence[int]) -> np.ndarray:
    """``[Q]`` 1.0 where route ``routes[q]`` of question q makes its answer the argmax."""
    return np.array([float(lp[r].argmax() == a) for lp, a, r in zip(logp, answer, routes)])


def median_abs_shift(logp: Sequence[np.ndarray], base: Sequence[np.ndarray]) -> float:
    """Median over questions, rows and choices of ``|logp[q] - base[q]|`` (``logp[q] [K, C]``, ``base[q] [C]``)."""
    return float(np.median(np.concatenate([np.abs(lp - b[None, :]).ravel() for lp, b in zip(logp, base)])))


def route_shift(logp: Sequence[np.ndarray], router: np.ndarray) -> float:
    """The routes' perturbation size: ``median_abs_shift`` of every route but the router's, against the router's."""
    return median_abs_shift([np.delete(lp, r, axis=0) for lp, r in zip(logp, router)], [lp[r] for lp, r in zip(logp, router)])


def null_summary(best: np.ndarray, router_acc: float, null_acc: np.ndarray) -> dict:
    """Best-of gain over the router, the null's gains (mean, std, p95 over draws) and real minus null, as shares."""
    gain, null_gain = float(best.mean() - router_acc), np.asarray(null_acc, dtype=float) - router_acc
    return {"draws": len(null_gain), "gain_mean": float(null_gain.mean()),
            "gain_std": float(null_gain.std(ddof=1)) if len(null_gain) > 1 else 0.0,
            "gain_p95": float(np.percentile(null_gain, 95)), "real_minus_null": float(gain - null_gain.mean())}


def label_swap(logp: Sequence[np.ndarray], answer: np.ndarray, router: np.ndarray) -> dict:
    """Does some route flip the router's wrong answer to the correct label more often than to an equally far wrong one?

    On the questions the router's route gets wrong with at least 3 choices: ``gap(c)`` = log p(router's
    top) - log p(c) on the router's route; the matched wrong label is the non-top wrong label whose gap
    is nearest the correct label's (ties: the lower index). Returns both "some route makes it the
    argmax" rates, the mean gaps of both labels (to show the matching) and McNemar's exact test
    (``b``: only the correct label reachable; ``c``: only the wrong one).
    """
    hit_c, hit_w, gap_c, gap_w, qs = [], [], [], [], []
    for q, (lp, a, r) in enumerate(zip(logp, answer, router)):
        row = lp[r]
        top = int(row.argmax())
        if top == a or row.shape[0] < 3:
            continue
        gaps = row[top] - row
        others = [c for c in range(row.shape[0]) if c not in (a, top)]
        w = min(others, key=lambda c: (abs(gaps[c] - gaps[a]), c))
        reach = lp.argmax(1)
        hit_c.append(bool((reach == a).any()))
        hit_w.append(bool((reach == w).any()))
        gap_c.append(float(gaps[a]))
        gap_w.append(float(gaps[w]))
        qs.append(q)
    n = len(qs)
    return {"questions": n, "correct_rate": float(np.mean(hit_c)) if n else float("nan"),
            "wrong_rate": float(np.mean(hit_w)) if n else float("nan"),
            "mean_gap_correct": float(np.mean(gap_c)) if n else float("nan"),
            "mean_gap_wrong": float(np.mean(gap_w)) if n else float("nan"),
            "mcnemar": mcnemar_exact(hit_c, hit_w)}


def cv_fixed_route(logp: Sequence[np.ndarray], answer: np.ndarray, router: np.ndarray, splits: int = 10,
                   seed: int = 0) -> dict:
    """Held-out accuracy of the best single fixed route minus the router's route (shares), over seeded half splits.

    Per split: a seeded permutation halves the questions; the route (same for every question) with the
    best accuracy on one half (ties: higher mean log p(correct), then the lower index) is scored on
    the other half against the router's routes there; then the halves swap, and the two held-out
    differences are averaged. ``diff_mean`` / ``diff_std`` over splits; ``routes``: the chosen routes.
    """
    if len(logp) < 2:
        raise ValueError("cross-validating a fixed route needs at least 2 questions")
    correct = np.stack([(lp.argmax(1) == a).astype(float) for lp, a in zip(logp, answer)])  # [Q, P]
    lpc = np.stack([lp[:, a] for lp, a in zip(logp, answer)])  # [Q, P] log p(correct)
    mine = route_accuracy(logp, answer, router)  # [Q]
    rng = np.random.default_rng([seed, 0xC5F1])
    diffs, fixed, routes = [], [], []
    for _ in range(splits):
        perm = rng.permutation(len(logp))
        halves = (perm[: len(perm) // 2], perm[len(perm) // 2 :])
        d, f = [], []
        for fit, held in (halves, halves[::-1]):
            acc, tie = correct[fit].mean(0), lpc[fit].mean(0)
            best = int(np.lexsort((np.arange(len(acc)), -tie, -acc))[0])
            routes.append(best)
            f.append(correct[held, best].mean())
            d.append(correct[held, best].mean() - mine[held].mean())
        diffs.append(float(np.mean(d)))
        fixed.append(float(np.mean(f)))
    return {"splits": splits, "diff_mean": float(np.mean(diffs)),
            "diff_std": float(np.std(diffs, ddof=1)) if splits > 1 else 0.0,
            "fixed_accuracy": float(np.mean(fixed)), "router_accuracy": float(mine.mean()), "routes": routes}


def calibrate_rate(effect: Callable[[float], float], target: float, start: float = 0.01, tol: float = CALIBRATION_TOL,
                   steps: int = 8, low: float = 1e-6, high: float = 0.95) -> tuple[float, list[list[float]]]:
    """The rate in ``[low, high]`` whose ``effect(rate)`` is ``target`` within a factor ``tol``; and the trace.

    Secant steps on ``log effect`` against the log odds ``log(rate / (1 - rate))`` (dropout's effect is
    close to a power of the odds), the first step assuming a slope of 1/2; returns the tried rate
    closest to the target (in log ratio) when ``steps`` run out. ``trace``: ``[rate, effect]`` per step.
    """
    if not target > 0:
        raise ValueError(f"the target perturbation size must be positive, got {target}")

    def odds(r: float) -> float:
        return float(np.log(r / (1 - r)))

    def rate(x: float) -> float:
        return float(np.clip(1 / (1 + np.exp(-x)), low, high))

    trace: list[list[float]] = []
    x, y_prev, x_prev = odds(start), None, None
    for _ in range(steps):
        r = rate(x)
        y = effect(r)
        trace.append([r, float(y)])
        if y > 0 and abs(np.log(y / target)) <= np.log(tol):
            break
        ly = np.log(max(y, 1e-30))
        slope = 0.5
        if y_prev is not None and y_prev > 0 and y > 0 and x != x_prev:
            slope = (ly - np.log(y_prev)) / (x - x_prev)
            slope = slope if slope > 0.05 else 0.5  # a flat or falling step: fall back to the square root
        x_prev, y_prev = x, y
        x = odds(rate(x + (np.log(target) - ly) / slope))
        if rate(x) == r:
            break  # pinned at a bound
    best = min(trace, key=lambda t: abs(np.log(max(t[1], 1e-30) / target)))
    return best[0], trace


# ---- the dropout null on the model -------------------------------------------------------------------
@contextlib.contextmanager
def masked_experts(model: Any, rate: float, seed: int) -> Iterator[None]:
    """Inside: every LoRA-MoE expert's output features dropped at ``rate`` by one fixed mask, ``B_e * m_e / (1 - rate)``.

    ``m_e [d_out]`` ~ Bernoulli(1 - rate) per expert and layer, drawn from ``seed`` (uniforms thresholded
    at ``rate``, so one seed's masks are nested across rates). The weights are restored exactly on exit.
    The caller clears any cache of activations (the env's prefix cache) on both sides.
    """
    import torch

    from routing_env.moe import moe_layers

    layers = moe_layers(model)
    saved = [m.lora_B.detach().clone() for m in layers]
    g = torch.Generator().manual_seed(int(seed))
    try:
        with torch.no_grad():
            for m in layers:
                E, d_out, _ = m.lora_B.shape
                keep = (torch.rand(E, d_out, generator=g) >= rate).to(m.lora_B.dtype) / (1.0 - rate)
                m.lora_B.mul_(keep.to(m.lora_B.device)[:, :, None])
        yield
    finally:
        with torch.no_grad():
            for m, b in zip(layers, saved):
                m.lora_B.copy_(b)


def masked_logp(env: Any, ids: Sequence[int], paths: Sequence[tuple], rate: float, seeds: Sequence[int],
                chunk: int = 32) -> list[np.ndarray]:
    """Per question ``[len(seeds), C]`` choice log-probs of its path ``paths[q]`` under each seed's expert mask."""
    out: list[list[np.ndarray]] = [[] for _ in ids]
    for s in seeds:
        env.cache.clear()
        with masked_experts(env.model, rate, s):
            for start in range(0, len(ids), chunk):
                res = env.evaluate_paths(list(ids[start : start + chunk]), [list(p) for p in paths[start : start + chunk]])
                for n, lp in enumerate(res["logp"]):
                    out[start + n].append(np.asarray(lp))
        env.cache.clear()  # no masked activation survives the mask
    return [np.stack(o) for o in out]


def _mask_seed(seed: int, j: int) -> int:
    return int(np.random.default_rng([seed, 0xD20F, j]).integers(2**62))


def nulls(env: Any, ids: Sequence[int], draws: int = 20, masks: int = 0, calibration_examples: int = 32,
          cv_splits: int = 10, seed: int = 0) -> tuple[dict, dict]:
    """Every route of every question, then the four nulls (module docstring). Returns ``(oracle score, nulls)``."""
    logp, answer, paths = gate.route_table(env, ids)
    index = {p: n for n, p in enumerate(paths)}
    router_paths = [tuple(int(a) for a in r.path) for r in agents.run_agent(agents.make("router"), env, list(ids))]
    router = np.array([index[p] for p in router_paths])
    router_acc = route_accuracy(logp, answer, router)
    oracle = np.array([int(lp[:, a].argmax()) for lp, a in zip(logp, answer)])  # max log p(correct), as exhaustive
    oracle_score = {"accuracy": float(route_accuracy(logp, answer, oracle).mean()),
                    "logp": float(np.mean([lp[o, a] for lp, o, a in zip(logp, oracle, answer)]))}
    best = label_argmax_reachable(logp, answer).astype(float)
    out: dict[str, Any] = {"routes": len(paths), "router_accuracy": float(router_acc.mean()),
                           "best_of": {"accuracy": float(best.mean()), "gain": float(best.mean() - router_acc.mean())}}
    out["shuffled_null"] = null_summary(best, router_acc.mean(), gate.shuffled_null(logp, answer, router, draws, seed))
    # Dropout null: rate calibrated on the first questions, then R - 1 masks (and the unmasked route) on all.
    R = masks or len(paths)
    cal = list(range(min(calibration_examples, len(ids))))
    target = route_shift([logp[q] for q in cal], router[cal])
    cal_ids, cal_paths = [ids[q] for q in cal], [router_paths[q] for q in cal]
    cal_base = [logp[q][router[q]] for q in cal]
    cal_seeds = [_mask_seed(seed, j) for j in range(1, CALIBRATION_MASKS + 1)]
    rate, trace = calibrate_rate(lambda r: median_abs_shift(masked_logp(env, cal_ids, cal_paths, r, cal_seeds), cal_base),
                                 target)
    masked = masked_logp(env, ids, router_paths, rate, [_mask_seed(seed, j) for j in range(1, R)])
    base = [lp[r] for lp, r in zip(logp, router)]
    cand = [np.vstack([b[None, :], m]) for b, m in zip(base, masked)]  # [R, C]: the unmasked route first
    best_mask = label_argmax_reachable(cand, answer).astype(float)
    out["dropout_null"] = {
        "rate": rate, "masks": R, "calibration_examples": len(cal), "calibration": trace,
        "median_abs_dlogp_routes": route_shift(logp, router), "median_abs_dlogp_masks": median_abs_shift(masked, base),
        "best_of_accuracy": float(best_mask.mean()), "gain": float(best_mask.mean() - router_acc.mean()),
        "real_minus_null": float(best.mean() - best_mask.mean())}
    out["label_swap"] = label_swap(logp, answer, router)
    out["cv_fixed_route"] = cv_fixed_route(logp, answer, router, cv_splits, seed)
    return oracle_score, out


def measure(checkpoint: str, env_id: str, n: int, draws: int, data_dir: str | None, oracle: bool = True,
            null_args: dict | None = None) -> dict:
    """Accuracy and mean log p(correct) of the router's, random and (``oracle``) the oracle's routes on dev.

    ``null_args`` (``nulls``' keyword arguments): also the nulls, and the oracle read off the route table.
    """
    env = gym.make(env_id, checkpoint=checkpoint, split="dev", data_dir=data_dir, balance_weight=0.0).unwrapped
    ids = list(range(min(n, len(env.examples))))
    row = {"checkpoint": checkpoint, "examples": len(ids),
           "router": _score(agents.run_agent(agents.make("router"), env, ids))}
    rnd = [_score(agents.run_agent(agents.make("random", seed=d), env, ids)) for d in range(draws)]
    row["random"] = {k: float(np.mean([r[k] for r in rnd])) for k in ("accuracy", "logp")}
    if null_args is not None:
        row["oracle"], row["nulls"] = nulls(env, ids, **null_args)
    elif oracle:  # 84 group forwards per question (4 experts, 3 groups) against 3 per route above
        found = []
        for start in tqdm(range(0, len(ids), 16), desc=f"oracle {Path(checkpoint).parent.name}", leave=False):
            found += agents.run_agent(agents.make("exhaustive"), env, ids[start : start + 16])
        row["oracle"] = _score(found)
    env.close()
    return row


NULL_COLUMNS = ("best-of - router (pts)", "shuffled null gain (pts, mean ± std over draws)", "best-of - shuffled null",
                "dropout null gain (pts) [rate]", "best-of - dropout null", "label swap: correct / wrong reachable % (p)",
                "CV best fixed route - router (pts)")


def _null_cells(rs: list[dict]) -> list[str]:
    """The null columns of one table line: per row, or mean ± std over the rows (seeds) of each row's number."""
    if not all("nulls" in r for r in rs):
        return ["n/a"] * len(NULL_COLUMNS)
    nl = [r["nulls"] for r in rs]

    def ms(x: list[float], scale: float = 100.0) -> str:
        a = scale * np.asarray(x, dtype=float)
        return f"{a.mean():+.2f}" + (f" ± {a.std(ddof=1):.2f}" if len(a) > 1 else "")

    if len(nl) == 1:
        sh = nl[0]["shuffled_null"]
        shuffled = f"{100 * sh['gain_mean']:+.2f} ± {100 * sh['gain_std']:.2f}"
    else:
        shuffled = ms([x["shuffled_null"]["gain_mean"] for x in nl])
    ls = [x["label_swap"] for x in nl]
    swap = "; ".join(f"{100 * s['correct_rate']:.1f} / {100 * s['wrong_rate']:.1f} (p {s['mcnemar']['p']:.2g}, "
                     f"{s['questions']} q)" for s in ls)
    rates = "/".join(f"{x['dropout_null']['rate']:.3g}" for x in nl)
    return [ms([x["best_of"]["gain"] for x in nl]), shuffled, ms([x["shuffled_null"]["real_minus_null"] for x in nl]),
            f"{ms([x['dropout_null']['gain'] for x in nl])} [{rates}]",
            ms([x["dropout_null"]["real_minus_null"] for x in nl]), swap,
            ms([x["cv_fixed_route"]["diff_mean"] for x in nl])]


def summarize(rows: dict) -> str:
    """Markdown: per task and checkpoint kind (or checkpoint), mean ± std over seeds of the routes, their gaps and nulls."""
    n = sorted({r["examples"] for r in rows.values() if "examples" in r})
    lines = ["# What the route decides: dev accuracy of the router's, random and the oracle's routes\n",
             f"First {'/'.join(map(str, n))} dev questions per task; the env's routing (one primary expert per layer "
             "group and question), balance weight 0; oracle = the exhaustive search's route chosen knowing the "
             "answer; mean ± sample std over seeds. Null columns (`--nulls`, module docstring): best-of = some route "
             "makes the correct choice the argmax; the shuffled and dropout nulls are the same best-of selection over "
             "uninformative perturbations of the routes' size; label swap on the questions the router gets wrong; "
             "n/a where not measured. `python experiments/routing_sensitivity.py`\n",
             "| task | checkpoint | seeds | router acc % | random acc % | oracle acc % | router - random (pts) "
             "| oracle - router (pts) | log p: router / random / oracle | " + " | ".join(NULL_COLUMNS) + " |",
             "| --- " * (9 + len(NULL_COLUMNS)) + "|"]
    groups: list[tuple[str, str, list[dict]]] = []
    for task in TASKS:
        for kind in RUNS:
            rs = [r for k, r in sorted(rows.items()) if k.startswith(f"{task}/{kind}/")]
            if rs:
                groups.append((task, kind, rs))
    for key, r in sorted(rows.items()):  # rows of --checkpoint: one line each
        if "/checkpoint:" in key:
            task, ckpt = key.split("/checkpoint:", 1)
            groups.append((task, f"`{ckpt}`", [r]))
    for task, kind, rs in groups:
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
                     + " | " + " | ".join(_null_cells(rs)) + " |")
    return "\n".join(lines) + "\n"


def settings(args: argparse.Namespace, env_id: str, oracle: bool) -> dict:
    """What a row is computed with; a finished row is reused only when these match."""
    out: dict[str, Any] = {"env": env_id, "examples": args.examples, "random_draws": args.random_draws,
                           "oracle": bool(oracle or args.nulls), "nulls": bool(args.nulls)}
    if args.nulls:
        out.update(null_args(args))
    return out


def null_args(args: argparse.Namespace) -> dict:
    return {"draws": args.null_draws, "masks": args.masks, "calibration_examples": args.calibration_examples,
            "cv_splits": args.cv_splits, "seed": args.seed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/pipeline", help="the pipeline's --logdir")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--kinds", default=",".join(RUNS))
    ap.add_argument("--checkpoint", action="append", default=None,
                    help="instead of the table's runs: this checkpoint (repeatable), on --task's dev questions")
    ap.add_argument("--task", default=None, help=f"with --checkpoint: its task ({', '.join(pipeline.TASK_ENV)})")
    ap.add_argument("--examples", type=int, default=300)
    ap.add_argument("--random-draws", type=int, default=4)
    ap.add_argument("--oracle-kinds", default="lora-moe", help="checkpoint kinds that also get the (costly) oracle")
    ap.add_argument("--nulls", action="store_true", help="every route of every question, then the four nulls")
    ap.add_argument("--null-draws", type=int, default=20, help="draws of the shuffled-route null")
    ap.add_argument("--masks", type=int, default=0, help="dropout-null candidates R (the unmasked route and R-1 masks; "
                    "0: as many as routes)")
    ap.add_argument("--calibration-examples", type=int, default=32, help="questions the dropout rate is calibrated on")
    ap.add_argument("--cv-splits", type=int, default=10, help="seeded half splits of the fixed-route cross-validation")
    ap.add_argument("--seed", type=int, default=0, help="seed of the nulls' draws, masks and splits")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--output", default=None,
                    help="JSON of rows (default results/routing_sensitivity.json; with --checkpoint, *_nulls.json)")
    args = ap.parse_args()
    if args.checkpoint and not args.task:
        ap.error("--checkpoint needs --task")
    if args.task and args.task not in pipeline.TASK_ENV:
        ap.error(f"unknown --task {args.task!r}; valid: {', '.join(pipeline.TASK_ENV)}")
    if args.threads is not None:
        from routing_env.common.cli import set_threads

        set_threads(args.threads)
    out = Path(args.output or ("results/routing_sensitivity_nulls.json" if args.checkpoint
                               else "results/routing_sensitivity.json"))
    rows: dict = json.loads(out.read_text()) if out.exists() else {}
    jobs: list[tuple[str, Path, str, bool]] = []  # (key, checkpoint, env id, oracle)
    if args.checkpoint:
        for ckpt in args.checkpoint:
            jobs.append((f"{args.task}/checkpoint:{ckpt}", Path(ckpt), pipeline.TASK_ENV[args.task], True))
    else:
        for task in args.tasks.split(","):
            for seed in [int(s) for s in args.seeds.split(",")]:
                for kind in args.kinds.split(","):
                    jobs.append((f"{task}/{kind}/s{seed}", Path(args.runs) / task / RUNS[kind].format(s=seed) / "final",
                                 pipeline.TASK_ENV[task], kind in args.oracle_kinds.split(",")))
    for key, ckpt, env_id, oracle in jobs:
        want = settings(args, env_id, oracle)
        if key in rows and rows[key].get("settings") == want:
            continue
        if not ckpt.exists():
            raise SystemExit(f"error: no checkpoint {ckpt}; run the pipeline (or the warm-up) first")
        row = measure(str(ckpt), env_id, args.examples, args.random_draws, args.data_dir, oracle=oracle,
                      null_args=null_args(args) if args.nulls else None)
        rows[key] = {**row, "settings": want}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2) + "\n")  # each finished row survives a crash
        print(key, json.dumps({w: v for w, v in rows[key].items() if w in ("router", "random", "oracle")}), flush=True)
    out.with_suffix(".md").write_text(summarize(rows))
    print(summarize(rows))


if __name__ == "__main__":
    main()
