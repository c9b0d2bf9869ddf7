"""Paired tests on per-question outcomes: is one arm of a paired comparison better than the other?

The pipeline's paired arms (a layermoe run and the lora-moe run it continues) answer the very same
test questions, so beside the spread over seeds each seed gives a *within-seed* paired comparison:
per question, right/wrong for each arm. Only the questions the arms answer differently (discordant)
carry evidence about which is better, which is what McNemar's test and a question bootstrap use.
The detectable-effect functions say how small a difference this design could have found at all, so
that "no significant difference" can be read as "smaller than X", not as "none".

Everything here is exact integer arithmetic or numpy; ``scipy`` is used when installed (the
noncentral t for the across-seed power), with a documented approximation otherwise.
"""

from __future__ import annotations

import math
from fractions import Fraction
from statistics import NormalDist
from typing import Any, Mapping, Sequence

import numpy as np

try:  # optional: not a declared dependency of the project
    from scipy import stats as _scipy_stats
except ImportError:  # pragma: no cover - depends on the environment
    _scipy_stats = None

__all__ = ["HAVE_SCIPY", "correct_by_id", "detectable_across_seeds", "detectable_within_seed", "mcnemar_exact",
           "paired_bootstrap", "paired_outcomes", "pooled_paired_bootstrap"]

#: Whether ``detectable_across_seeds`` uses the exact noncentral t (scipy) or its normal approximation.
HAVE_SCIPY = _scipy_stats is not None


def correct_by_id(questions: Mapping[str, Sequence[Any]]) -> dict[str, bool]:
    """An evaluation's per-question block (``EvalResult.questions()``: ids, label, pred) -> {id: correct}.

    Refuses a block whose columns differ in length or that names a question twice: a join on ids
    must not silently drop or double-count a question.
    """
    ids, label, pred = questions["ids"], questions["label"], questions["pred"]
    if not len(ids) == len(label) == len(pred):
        raise ValueError(f"per-question block with {len(ids)} ids, {len(label)} labels and {len(pred)} predictions; "
                         "its columns must be aligned")
    out = {str(i): p == y for i, y, p in zip(ids, label, pred)}
    if len(out) != len(ids):
        raise ValueError(f"per-question block names {len(ids) - len(out)} question id(s) more than once")
    return out


def paired_outcomes(a: Mapping[str, Sequence[Any]], b: Mapping[str, Sequence[Any]]) -> tuple[list[str], list[bool], list[bool]]:
    """Two arms' per-question blocks joined on question id (not position): ``(ids, a_correct, b_correct)``.

    The paired tests compare the arms question by question, so both must have answered exactly the
    same questions, with the same correct answer: a different set (another ``--eval-limit``, another
    split, another task) or a different label for an id is refused with a ``ValueError`` naming it.
    The order is ``a``'s, so a shuffled ``b`` gives the same result.
    """
    ca, cb = correct_by_id(a), correct_by_id(b)
    if ca.keys() != cb.keys():
        only_a, only_b = sorted(ca.keys() - cb.keys()), sorted(cb.keys() - ca.keys())
        raise ValueError(f"the two arms answered different questions ({len(ca)} and {len(cb)}; {len(only_a)} only in the "
                         f"first, e.g. {only_a[:3]}; {len(only_b)} only in the second, e.g. {only_b[:3]}); a paired test "
                         "needs the same question set")
    la = dict(zip(map(str, a["ids"]), a["label"]))
    lb = dict(zip(map(str, b["ids"]), b["label"]))
    differ = [i for i in la if la[i] != lb[i]]
    if differ:
        raise ValueError(f"{len(differ)} question(s) have different correct answers in the two arms (e.g. {differ[:3]}); "
                         "they were not evaluated on the same data")
    ids = list(ca)
    return ids, [ca[i] for i in ids], [cb[i] for i in ids]


def _discordant(a_correct: Sequence[Any], b_correct: Sequence[Any]) -> tuple[int, int, int]:
    a, b = [bool(v) for v in a_correct], [bool(v) for v in b_correct]
    if len(a) != len(b):
        raise ValueError(f"paired outcomes of different lengths ({len(a)} and {len(b)}); join the arms on question id "
                         "first (paired_outcomes)")
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    return len(a), only_a, only_b


def mcnemar_exact(a_correct: Sequence[Any], b_correct: Sequence[Any]) -> dict[str, Any]:
    """McNemar's exact test of two paired arms: ``{"n", "b", "c", "p"}``.

    ``b``: questions arm a answers right and arm b wrong; ``c``: the reverse. Under "the arms are
    equally good" each discordant question is a fair coin, so ``b ~ Bin(b + c, 1/2)`` and the
    two-sided p is ``min(1, 2 P(X <= min(b, c)))``, computed exactly (integers, no approximation:
    the discordant counts here are often a handful, where the chi-square form is wrong). ``p = 1``
    when no question is discordant. Outcomes are aligned by position: join on ids first
    (``paired_outcomes``).
    """
    n, b, c = _discordant(a_correct, b_correct)
    m = b + c
    if m == 0:
        return {"n": n, "b": b, "c": c, "p": 1.0}
    tail = Fraction(sum(math.comb(m, k) for k in range(min(b, c) + 1)), 2**m)
    return {"n": n, "b": b, "c": c, "p": float(min(Fraction(1), 2 * tail))}


def pooled_paired_bootstrap(pairs: Sequence[tuple[Sequence[Any], Sequence[Any]]], n_resamples: int = 10000, seed: int = 0,
                            level: float = 0.95) -> tuple[float, float, float]:
    """Percentile bootstrap of the paired accuracy difference (b minus a) averaged over seeds.

    ``pairs``: per seed, ``(a_correct, b_correct)`` aligned by question. Each resample draws every
    seed's questions with replacement, *within that seed*, takes each seed's mean difference and
    averages them over seeds; so the estimate is the table's mean paired difference and the interval
    its question-sampling uncertainty (which questions happened to be in the test set), given these
    trained models. Seed-to-seed training variation is the seed spread's job, not this interval's.

    A resample of n questions only matters through how many of them fall in each outcome class
    (b better, a better, tied), so it is drawn as a multinomial over those classes: the same
    distribution as drawing question indices, in O(1) per resample instead of O(n). Returns
    ``(mean_diff, lo, hi)`` as fractions (x100 for points); deterministic given ``seed``.
    """
    if not pairs:
        raise ValueError("no paired outcomes to bootstrap")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    means, draws = [], np.zeros(n_resamples)
    for a_correct, b_correct in pairs:
        n, only_a, only_b = _discordant(a_correct, b_correct)
        if n == 0:
            raise ValueError("a seed with no questions cannot be bootstrapped")
        means.append((only_b - only_a) / n)
        counts = rng.multinomial(n, [only_b / n, only_a / n, (n - only_a - only_b) / n], size=n_resamples)
        draws += (counts[:, 0] - counts[:, 1]) / n
    draws /= len(pairs)
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(np.mean(means)), float(lo), float(hi)


def paired_bootstrap(a_correct: Sequence[Any], b_correct: Sequence[Any], n_resamples: int = 10000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """Percentile bootstrap over questions of one seed's paired accuracy difference, ``mean(b) - mean(a)``:
    ``(mean_diff, lo, hi)``. See ``pooled_paired_bootstrap`` (this is its one-seed case)."""
    return pooled_paired_bootstrap([(a_correct, b_correct)], n_resamples, seed, level)


def _z(q: float) -> float:
    return NormalDist().inv_cdf(q)


def detectable_within_seed(n: int, discordant: int, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """The smallest accuracy difference (fraction) a two-sided McNemar test at ``alpha`` detects with
    ``power`` on ``n`` paired questions of which ``discordant`` (= b + c) are answered differently.

    Normal approximation: with discordance rate ``d = (b + c) / n`` the per-question difference has
    variance ``d - delta^2 ~= d`` for small effects, so ``delta = (z_{1-alpha/2} + z_power) sqrt(d / n)``
    (at 0.05 / 80%: 2.80 sqrt(d / n)). It is floored at what the exact test can resolve at all: even
    with every discordant question on one side it needs ``m`` of them, ``2 * 0.5^m <= alpha`` (6 at
    0.05), so no difference below ``m / n`` is detectable whatever ``d`` is (this also covers ``d = 0``,
    where the formula would claim 0). ``None`` without questions.
    """
    if n <= 0:
        return None
    if not 0 <= discordant <= n:
        raise ValueError(f"discordant must be between 0 and n = {n}, got {discordant}")
    d = discordant / n
    m = math.ceil(math.log2(2 / alpha))  # the fewest discordant questions that can reach p <= alpha
    return max((_z(1 - alpha / 2) + _z(power)) * math.sqrt(d / n), m / n)


def _t_cdf(x: float, df: int) -> float:
    """Student's t CDF by Simpson integration of its density (the scipy-free fallback's quantile)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    steps, h = 4000, abs(x) / 4000
    f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(steps + 1)]
    area = h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))
    return 0.5 + math.copysign(area, x)


def _t_quantile(q: float, df: int) -> float:
    lo, hi = 0.0, 1000.0  # q > 0.5 here; df 1 at 0.975 is 12.7
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def detectable_across_seeds(std: float, seeds: int, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """The smallest mean paired difference a two-sided one-sample t-test over ``seeds`` per-seed paired
    differences detects at ``alpha`` with ``power``, given their observed sample ``std``.

    With scipy: exact, the noncentrality ``lambda`` at which the noncentral t with ``seeds - 1``
    degrees of freedom exceeds the critical value ``t_{1-alpha/2}`` (either side) with probability
    ``power``; the effect is ``lambda * std / sqrt(seeds)``. Without scipy: the usual approximation
    ``(t_{1-alpha/2, seeds-1} + z_power) * std / sqrt(seeds)`` (t quantile by integration), which is
    a little optimistic at very few seeds. ``None`` for fewer than 2 seeds (no spread, no test).
    """
    if seeds < 2 or std is None:
        return None
    if std < 0 or not math.isfinite(std):
        raise ValueError(f"std must be a finite number >= 0, got {std}")
    if std == 0:  # identical per-seed differences: the t-test is undefined, not infinitely sensitive
        return None
    df = seeds - 1
    if _scipy_stats is None:
        return (_t_quantile(1 - alpha / 2, df) + _z(power)) * std / math.sqrt(seeds)
    from scipy.optimize import brentq

    t_crit = float(_scipy_stats.t.ppf(1 - alpha / 2, df))

    def shortfall(nc: float) -> float:
        nct = _scipy_stats.nct
        return float(nct.sf(t_crit, df, nc) + nct.cdf(-t_crit, df, nc)) - power

    approx = (_t_quantile(1 - alpha / 2, df) + _z(power)) * std / math.sqrt(seeds)
    try:
        hi = 1.0
        while shortfall(hi) < 0:
            hi *= 2
            if hi > 1e6:  # power never reached: scipy's noncentral t lost precision
                return approx
        return brentq(shortfall, 0.0, hi, xtol=1e-10) * std / math.sqrt(seeds)
    except ValueError:  # NaN from scipy's noncentral t at very few degrees of freedom (2 seeds): the approximation
        return approx
