"""The routing-structure gate: invariants on a real checkpoint and known answers of its null."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import agents
import routing_env  # noqa: F401 -- registers the env ids
from routing_env.search.gate import gate, route_table, shuffled_null
from tests.tolerances import LOGP_ATOL


def test_the_null_of_unperturbed_routes_is_the_router_itself():
    """Routes that change nothing: best-of selection over them finds nothing beyond the router's route."""
    rng = np.random.default_rng(0)
    logp = [np.tile(rng.normal(size=4), (8, 1)) for _ in range(30)]  # [P=8, C=4], every route the same
    answer = rng.integers(0, 4, size=30)
    router = np.zeros(30, dtype=int)
    acc = np.mean([lp[0].argmax() == a for lp, a in zip(logp, answer)])
    assert np.allclose(shuffled_null(logp, answer, router, draws=5), acc)


def test_the_null_of_large_perturbations_approaches_any_route_right():
    """Perturbations far larger than the margins: some of 64 routes makes almost any choice the argmax."""
    rng = np.random.default_rng(1)
    logp = [rng.normal(scale=10.0, size=(64, 4)) for _ in range(40)]
    for lp in logp:
        lp[0] = rng.normal(scale=0.01, size=4)  # the router's route: near-uniform choices
    answer = rng.integers(0, 4, size=40)
    assert shuffled_null(logp, answer, np.zeros(40, dtype=int), draws=3).mean() > 0.95


@pytest.mark.slow
def test_gate_on_a_real_checkpoint(distinct_checkpoint, data_dir):
    env = gym.make("layermoe-arc", checkpoint=str(distinct_checkpoint), split="dev", data_dir=str(data_dir),
                   balance_weight=0.0, max_examples=6).unwrapped
    ids = list(range(6))
    logp, answer, paths = route_table(env, ids, chunk=4)
    assert len(paths) == env.E ** env.G and all(lp.shape[0] == len(paths) for lp in logp)
    router = agents.run_agent(agents.make("router"), env, ids)
    for r, lp, a in zip(router, logp, answer):  # the table's router row is the router's own episode
        row = lp[paths.index(tuple(int(x) for x in r.path))]
        # Tolerance: the table batches 64 paths of 4 questions, the episode steps one (tests/tolerances.py).
        assert (row.argmax() == a) == r.correct and abs(row[a] - r.outcome) < LOGP_ATOL
    res = gate(env, ids, null_draws=4)
    assert 0 <= res["random_route_accuracy"] <= 1 and res["hindsight_gain"] >= 0  # best-of bounds the router
    lo, hi = res["router_minus_random"]["ci95"]
    assert lo <= res["router_minus_random"]["mean"] <= hi
    assert res["structure"] is False and "no routing structure shown" in res["warning"]  # 6 questions cannot pass


@pytest.mark.slow
def test_gate_command_writes_its_result_with_its_settings(distinct_checkpoint, data_dir, tmp_path):
    from routing_env.search.gate import GateConfig, main

    out = tmp_path / "g.json"
    res = main(["--checkpoint", str(distinct_checkpoint), "--examples", "2", "--null-draws", "2",
                "--data-dir", str(data_dir), "--output", str(out)])  # default device: auto
    import json

    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(res)) and saved["examples"] == 2
    assert saved["config"] == {**GateConfig(checkpoint=str(distinct_checkpoint)).__dict__, "examples": 2,
                               "null_draws": 2, "data_dir": str(data_dir)}


def test_gate_table_renders_every_result_with_its_warmup_settings(tmp_path):
    import json

    from routing_env.search.gate import table

    res = {"examples": 150, "paths_per_question": 64, "router_accuracy": 0.44, "random_route_accuracy": 0.43,
           "router_minus_random": {"mean": 0.01, "ci95": [-0.012, 0.034]}, "hindsight_gain": 0.047,
           "shuffled_null_gain": {"mean": 0.073, "std": 0.014, "p95": 0.093}, "hindsight_minus_null": -0.026,
           "swap_effect": {"median_abs_dlogp": 0.0006, "median_top2_margin": 0.0102}, "structure": False,
           "config": {"checkpoint": "runs/x/checkpoints/epoch_1"}, "warmup": {"task": "arc-easy", "top_k": 1}}
    (tmp_path / "a.json").write_text(json.dumps(res))
    md = table(tmp_path)
    assert "| a | task arc-easy, top_k 1 | 150 x 64 | 44.0 | 43.0 | +1.0 (-1.2, +3.4) | +4.7 | +7.3 (+9.3) |" in md
    assert md.strip().endswith("| no |")
