"""The analysis scripts under experiments/: their numbers obey the invariants the README leans on."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from tests.tolerances import LOGP_ATOL

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_routing_sensitivity_oracle_bounds_every_route(distinct_checkpoint, data_dir):
    """The oracle maximises log p over all paths, so it is at least the router's and the random routes' mean."""
    rs = _load("routing_sensitivity")
    row = rs.measure(str(distinct_checkpoint), "layermoe-arc", n=8, draws=2, data_dir=str(data_dir))
    assert row["examples"] == 8
    assert row["oracle"]["logp"] >= row["router"]["logp"] - LOGP_ATOL
    assert row["oracle"]["logp"] >= row["random"]["logp"] - LOGP_ATOL
    # the distinct checkpoint's experts differ, so a random route is worse than the best one
    assert row["oracle"]["logp"] > row["random"]["logp"] + 1e-3
    for route in ("router", "random", "oracle"):
        assert 0.0 <= row[route]["accuracy"] <= 1.0


def test_routing_sensitivity_summary_known_answer():
    rs = _load("routing_sensitivity")
    rows = {f"obqa/lora-moe/s{s}": {w: {"accuracy": a, "logp": -1.0} for w, a in zip(("router", "random", "oracle"), accs)}
            for s, accs in enumerate([(0.50, 0.52, 0.60), (0.54, 0.52, 0.70)])}
    line = [ln for ln in rs.summarize(rows).splitlines() if ln.startswith("| obqa")][0]
    cells = [c.strip() for c in line.strip("|").split("|")]
    # router - random per seed: -2, +2 -> mean 0, std 2.83; oracle - router: +10, +16 -> 13 ± 4.24
    assert cells[:3] == ["obqa", "lora-moe", "2"]
    assert cells[6] == "+0.00 ± 2.83"
    assert cells[7] == "+13.00 ± 4.24"
    assert float(cells[3].split(" ± ")[0]) == pytest.approx(100 * np.mean([0.50, 0.54]))
    # a checkpoint kind searched without the oracle: its oracle cells say so instead of failing
    rows["obqa/layermoe/s0"] = {w: {"accuracy": 0.5, "logp": -1.0} for w in ("router", "random")}
    line = [ln for ln in rs.summarize(rows).splitlines() if ln.startswith("| obqa | layermoe")][0]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert (cells[5], cells[6], cells[7]) == ("n/a", "+0.00", "n/a")


def test_routing_sensitivity_resumes_finished_rows(tmp_path, monkeypatch):
    rs = _load("routing_sensitivity")
    out = tmp_path / "rs.json"
    done = {w: {"accuracy": 0.5, "logp": -1.0} for w in ("router", "random", "oracle")}
    done["settings"] = {"env": "layermoe-obqa", "examples": 300, "random_draws": 4, "oracle": True, "nulls": False}
    # the same layermoe row with other settings (fewer questions) must be redone, not reused
    stale = {**done, "settings": {**done["settings"], "examples": 100, "oracle": False}}
    out.write_text(json.dumps({"obqa/lora-moe/s0": done, "obqa/layermoe/s0": stale}))
    runs = tmp_path / "runs"
    (runs / "obqa" / "layermoe-exhaustive-c3a0a54b-s0" / "final").mkdir(parents=True)
    calls = []

    def fake_measure(ckpt, env_id, n, draws, data_dir, oracle=True, null_args=None):
        calls.append((Path(ckpt).parent.name, oracle))
        return {w: {"accuracy": 0.25, "logp": -1.2} for w in ("router", "random")}

    monkeypatch.setattr(rs, "measure", fake_measure)
    monkeypatch.setattr("sys.argv", ["rs", "--tasks", "obqa", "--seeds", "0", "--runs", str(runs), "--output", str(out)])
    rs.main()
    # the finished lora-moe row is not recomputed; the layermoe one runs without the oracle (default kinds)
    assert calls == [("layermoe-exhaustive-c3a0a54b-s0", False)]
    saved = json.loads(out.read_text())
    assert set(saved) == {"obqa/lora-moe/s0", "obqa/layermoe/s0"}
    assert saved["obqa/layermoe/s0"]["settings"]["examples"] == 300 and saved["obqa/layermoe/s0"]["router"]["accuracy"] == 0.25
    assert out.with_suffix(".md").read_text().count("| obqa |") == 2
    rs.main()  # a rerun with the same settings reuses every row
    assert len(calls) == 1


def test_routing_sensitivity_checkpoint_option_keys_rows_by_checkpoint_and_null_settings(tmp_path, monkeypatch):
    rs = _load("routing_sensitivity")
    ckpt = tmp_path / "w" / "final"
    ckpt.mkdir(parents=True)
    out = tmp_path / "nulls.json"
    calls = []

    def fake_measure(ck, env_id, n, draws, data_dir, oracle=True, null_args=None):
        calls.append((ck, env_id, n, null_args))
        return {w: {"accuracy": 0.25, "logp": -1.2} for w in ("router", "random", "oracle")}

    monkeypatch.setattr(rs, "measure", fake_measure)
    argv = ["rs", "--checkpoint", str(ckpt), "--task", "arc-easy", "--examples", "7", "--nulls", "--output", str(out)]
    monkeypatch.setattr("sys.argv", argv)
    rs.main()
    assert calls == [(str(ckpt), "layermoe-arc", 7, {"draws": 20, "masks": 0, "calibration_examples": 32,
                                                      "cv_splits": 10, "seed": 0})]
    assert list(json.loads(out.read_text())) == [f"arc-easy/checkpoint:{ckpt}"]
    rs.main()  # finished with these settings: skipped
    assert len(calls) == 1
    monkeypatch.setattr("sys.argv", argv + ["--null-draws", "5"])
    rs.main()  # other null settings: recomputed
    assert len(calls) == 2 and calls[-1][3]["draws"] == 5
    assert f"| arc-easy | `{ckpt}` | 1 |" in out.with_suffix(".md").read_text()


# ---- the nulls beside the hindsight numbers: known answers on hand-made route tables ------------------
def _table(rng, Q=300, P=64, C=4, noise=0.3, bonus=0.0):
    """Route tables ``[P, C]``: a question's base log-probs plus per-route noise; ``bonus`` raises the answer
    on a random quarter of the routes (information about the answer), 0 for answer-agnostic routes."""
    logp, answer = [], rng.integers(0, C, size=Q)
    for a in answer:
        lp = rng.normal(size=C)[None, :] + rng.normal(scale=noise, size=(P, C))
        lp[rng.random(P) < 0.25, a] += bonus
        logp.append(lp)
    return logp, answer


def test_cv_best_fixed_route_finds_the_route_that_is_always_right():
    rs = _load("routing_sensitivity")
    rng = np.random.default_rng(0)
    logp, answer = _table(rng, Q=40, P=16)
    for lp, a in zip(logp, answer):
        lp[5, a] += 20.0  # route 5 always makes the answer the argmax
    router = rng.choice([r for r in range(16) if r != 5], size=40)
    res = rs.cv_fixed_route(logp, answer, router, splits=4, seed=1)
    mine = rs.route_accuracy(logp, answer, router).mean()
    assert set(res["routes"]) == {5} and res["fixed_accuracy"] == 1.0
    assert 0.2 < mine < 0.6  # the router's routes are near chance, so the test has something to find
    assert res["diff_mean"] == pytest.approx(1.0 - mine)  # equal halves: both held-out halves average to the whole
    # the router's own route everywhere: a fixed route can do no better than ties on held-out questions
    same = rs.cv_fixed_route(logp, answer, np.full(40, 5), splits=2)
    assert same["diff_mean"] == 0.0 and same["diff_std"] == 0.0


def test_shuffled_null_accounts_for_best_of_selection_over_uninformative_routes():
    rs = _load("routing_sensitivity")
    from routing_env.search.gate import shuffled_null

    rng = np.random.default_rng(2)
    # (route noise, answer bonus, bounds on real - null): without information about 0 (the null centres
    # perturbations on the router's route, so larger independent noise biases it up a little: see the
    # module docstring); with it, far above
    for noise, bonus, lo, hi in ((0.1, 0.0, -0.03, 0.03), (0.05, 1.0, 0.10, 1.0)):
        logp, answer = _table(rng, noise=noise, bonus=bonus)
        router = np.zeros(len(logp), dtype=int)
        best = rs.label_argmax_reachable(logp, answer).astype(float)
        acc = rs.route_accuracy(logp, answer, router).mean()
        s = rs.null_summary(best, acc, shuffled_null(logp, answer, router, draws=10))
        assert best.mean() - acc > 0.05  # the selection "finds" accuracy either way
        # no information: real minus null about 0; information on the answer: well above the null
        assert lo < s["real_minus_null"] < hi, (bonus, s)
        assert s["draws"] == 10 and s["gain_std"] >= 0


def test_label_swap_known_answer():
    rs = _load("routing_sensitivity")
    C = 4
    router = np.zeros(6, dtype=int)
    base = np.array([0.0, -1.0, -1.1, -3.0])  # router's top: choice 0
    logp, answer = [], []
    # 3 questions where a route makes the correct label (2, gap 1.1) the argmax; its matched wrong label is
    # 1 (gap 1.0, nearer than 3's 3.0), which no route reaches
    for _ in range(3):
        up = base.copy()
        up[2] = 1.0
        logp.append(np.stack([base, up, base]))
        answer.append(2)
    # 1 question where only the matched wrong label is reachable
    up = base.copy()
    up[1] = 1.0
    logp.append(np.stack([base, up]))
    answer.append(2)
    logp.append(np.stack([base, base]))  # router right (answer 0): not a label-swap question
    answer.append(0)
    logp.append(np.array([[0.0, -1.0], [-2.0, 0.0]]))  # 2 choices: no matched wrong label
    answer.append(1)
    res = rs.label_swap(logp, np.array(answer), router)
    assert res["questions"] == 4
    assert res["correct_rate"] == 0.75 and res["wrong_rate"] == 0.25
    assert res["mean_gap_correct"] == pytest.approx(1.1) and res["mean_gap_wrong"] == pytest.approx(1.0)
    assert (res["mcnemar"]["b"], res["mcnemar"]["c"]) == (3, 1)
    assert res["mcnemar"]["p"] == pytest.approx(0.625)  # 2 * P(Bin(4, 1/2) <= 1) = 2 * 5/16
    # routes informative about the answer flip the correct label far more often than an equally far wrong one
    rng = np.random.default_rng(3)
    logp, answer = _table(rng, Q=400, noise=0.05, bonus=1.0)
    res = rs.label_swap(logp, answer, np.zeros(400, dtype=int))
    assert res["correct_rate"] > res["wrong_rate"] + 0.2 and res["mcnemar"]["p"] < 1e-6
    # answer-agnostic routes: the correct label is no easier to reach than a wrong one at the same gap
    logp, answer = _table(rng, Q=400, noise=0.3)
    res = rs.label_swap(logp, answer, np.zeros(400, dtype=int))
    assert res["questions"] > 250 and abs(res["correct_rate"] - res["wrong_rate"]) < 0.1


def test_dropout_rate_calibration_matches_the_target_size():
    rs = _load("routing_sensitivity")
    calls = []

    def effect(r):  # a dropout-like effect: a power of the odds
        calls.append(r)
        return 2e-3 * (r / (1 - r)) ** 0.7

    rate, trace = rs.calibrate_rate(effect, target=1.3e-3)
    assert abs(np.log(effect(rate) / 1.3e-3)) <= np.log(rs.CALIBRATION_TOL)
    assert len(trace) <= 4 and trace[-1][0] == rate
    # a target beyond any rate: the closest rate, at the bound
    rate, _ = rs.calibrate_rate(lambda r: 1e-3 * r, target=1.0, high=0.9)
    assert rate == pytest.approx(0.9)
    # the perturbation sizes: routes against the router's route, masks against a base row
    lp = [np.array([[0.0, 0.0], [1.0, -1.0], [3.0, 3.0]])]
    assert rs.route_shift(lp, np.array([0])) == 2.0  # |dlogp| of routes 1 and 2: 1, 1, 3, 3
    assert rs.median_abs_shift([lp[0][1:]], [lp[0][0]]) == 2.0


@pytest.mark.slow
def test_routing_sensitivity_nulls_end_to_end(distinct_checkpoint, data_dir, monkeypatch):
    """The null path on the fixture checkpoint: the table's oracle is the exhaustive agent's; masks restore the model."""
    import gymnasium as gym

    import agents
    from routing_env.moe import model_fingerprint

    rs = _load("routing_sensitivity")
    monkeypatch.setattr(rs, "CALIBRATION_MASKS", 2)
    env = gym.make("layermoe-arc", checkpoint=str(distinct_checkpoint), split="dev", data_dir=str(data_dir),
                   balance_weight=0.0, max_examples=4).unwrapped
    ids = [0, 1, 2, 3]
    exhaustive = agents.run_agent(agents.make("exhaustive"), env, ids)  # first: the route table reuses its cache
    router = agents.run_agent(agents.make("router"), env, ids)
    before = model_fingerprint(env.model)
    oracle, nl = rs.nulls(env, ids, draws=3, masks=4, calibration_examples=2, cv_splits=2)
    # the oracle read off the route table is the exhaustive search's (balance weight 0)
    assert oracle["logp"] == pytest.approx(np.mean([r.outcome for r in exhaustive]), abs=LOGP_ATOL)
    assert oracle["accuracy"] == np.mean([r.correct for r in exhaustive])
    assert nl["router_accuracy"] == np.mean([r.correct for r in router])
    assert nl["routes"] == 64 and nl["best_of"]["accuracy"] >= oracle["accuracy"] >= nl["router_accuracy"]
    d = nl["dropout_null"]
    assert 0 < d["rate"] < 1 and d["masks"] == 4 and d["gain"] >= 0  # the unmasked route is a candidate
    assert d["median_abs_dlogp_masks"] > 0 and d["median_abs_dlogp_routes"] > 0
    assert nl["shuffled_null"]["draws"] == 3 and nl["cv_fixed_route"]["splits"] == 2
    assert 0 <= nl["label_swap"]["questions"] <= len(ids)
    # masks: rate 0 changes nothing; a real rate changes log p; afterwards the model is exactly the same again
    assert model_fingerprint(env.model) == before
    paths = [(0, 1, 2), (3, 0, 1)]
    ref = env.evaluate_paths([0, 1], [list(p) for p in paths])["logp"]
    none = rs.masked_logp(env, [0, 1], paths, 0.0, [7])
    half = rs.masked_logp(env, [0, 1], paths, 0.5, [7, 8])
    assert all(np.array_equal(m[0], r) for m, r in zip(none, ref))
    assert all(np.abs(m - r[None]).max() > 1e-4 for m, r in zip(half, ref))
    assert model_fingerprint(env.model) == before
    again = env.evaluate_paths([0, 1], [list(p) for p in paths])["logp"]
    assert all(np.array_equal(a, r) for a, r in zip(again, ref))


def test_routing_sensitivity_summary_null_columns_known_answer():
    rs = _load("routing_sensitivity")
    nl = {"best_of": {"accuracy": 0.5, "gain": 0.06},
          "shuffled_null": {"gain_mean": 0.08, "gain_std": 0.014, "real_minus_null": -0.02},
          "dropout_null": {"rate": 0.25, "gain": 0.05, "real_minus_null": 0.01},
          "label_swap": {"questions": 80, "correct_rate": 0.1, "wrong_rate": 0.125, "mcnemar": {"p": 0.5}},
          "cv_fixed_route": {"diff_mean": -0.015}}
    row = {w: {"accuracy": a, "logp": -1.0} for w, a in zip(("router", "random", "oracle"), (0.44, 0.43, 0.48))}
    md = rs.summarize({"arc-easy/checkpoint:runs/w/final": {**row, "examples": 150, "nulls": nl},
                       "obqa/lora-moe/s0": row})
    cells = [c.strip() for c in [ln for ln in md.splitlines() if ln.startswith("| arc-easy")][0].strip("|").split("|")]
    assert cells[:3] == ["arc-easy", "`runs/w/final`", "1"] and cells[7] == "+4.00"
    assert cells[9:] == ["+6.00", "+8.00 ± 1.40", "-2.00", "+5.00 [0.25]", "+1.00", "10.0 / 12.5 (p 0.5, 80 q)", "-1.50"]
    plain = [c.strip() for c in [ln for ln in md.splitlines() if ln.startswith("| obqa")][0].strip("|").split("|")]
    assert plain[9:] == ["n/a"] * 7  # a row measured without the nulls says so


# ---- routing_control: the positive control's agreement and shuffled null ---------------------------

def test_routing_control_tag_agreement_known_answers():
    rc = _load("routing_control")
    tags = np.repeat(np.arange(4), 25)  # [100]
    perm = np.array([2, 0, 3, 1])
    assert rc.tag_agreement(tags, perm[tags], 4) == 1.0  # experts are exchangeable: any one-to-one map is the route
    assert rc.tag_agreement(tags, np.zeros(100, int), 4) == 0.25  # one expert for everyone: one tag's share
    noisy = perm[tags].copy()
    noisy[::4] = (noisy[::4] + 1) % 4  # every 4th question (a quarter of each tag) sent elsewhere
    assert rc.tag_agreement(tags, noisy, 4) == 0.75
    null = rc.agreement_null(tags, perm[tags], 4, draws=50, seed=0)
    assert null["mean"] < null["p95"] < 0.5  # shuffled tags: near chance, far below the real 1.0


def test_routing_control_shuffled_targets_re_pair_routes_and_keep_questions(tmp_path):
    rc = _load("routing_control")
    header = json.dumps({"format": "routing-targets", "agent": "exhaustive"})
    recs = [{"example": i, "id": f"train-0-alpha-w{i}", "targets": np.eye(4)[[i % 4, (i + 1) % 4]].tolist(),
             "path": [i % 4, (i + 1) % 4], "outcome": -float(i)} for i in range(12)]
    src = tmp_path / "t.jsonl"
    src.write_text("\n".join([header] + [json.dumps(r) for r in recs]) + "\n")
    out = [json.loads(x) for x in rc.shuffled_targets(src, tmp_path / "s.jsonl", seed=0).read_text().splitlines()]
    assert json.dumps(out[0]) == header and [r["id"] for r in out[1:]] == [r["id"] for r in recs]
    # Each record keeps its own target, path and outcome together; the set of routes is unchanged.
    assert all(r["path"] == np.argmax(r["targets"], 1).tolist() for r in out[1:])
    assert sorted(r["outcome"] for r in out[1:]) == sorted(r["outcome"] for r in recs)
    moved = sum(r["outcome"] != -float(i) for i, r in enumerate(out[1:]))
    assert moved >= 6  # re-paired, not copied
