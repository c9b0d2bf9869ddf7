"""MoLA (more experts in higher layers) under the env, its agents and stage 3: groups with 2, 4 and 6 experts."""

from __future__ import annotations

import itertools
import json

import gymnasium as gym
import numpy as np
import pytest

import routing_env  # noqa: F401  (registers the ids)
from agents.exhaustive import ExhaustiveAgent
from agents.mcts import MCTSConfig, mcts_search
from routing_env.studies import compare
from routing_env.targets import TargetsError, load_targets
from tests.tolerances import LOGP_ATOL

WIDTHS = [2, 4, 6]  # experts per layer group of MiniLM's 6 layers, 2,2,4,4,6,6 per layer


@pytest.fixture(scope="module")
def mola_checkpoint(tmp_path_factory, data_dir):
    """A real, tiny MoLA warm-up on ARC-Easy (48 questions, 1 epoch)."""
    from routing_env.training import finetune
    out = tmp_path_factory.mktemp("mola")
    finetune.main(finetune.Config(task="arc-easy", method="lora-moe", epochs=1, train_limit=48, eval_limit=8,
                                  batch_size=8, data_dir=str(data_dir), logdir=str(out), name="w", lr=3e-3,
                                  num_experts=[2, 2, 4, 4, 6, 6]))
    return out / "w" / "final"


@pytest.fixture()
def env(mola_checkpoint, data_dir):
    return gym.make("layermoe-arc", checkpoint=mola_checkpoint, max_examples=12, data_dir=data_dir).unwrapped


def test_each_group_offers_its_own_experts_and_refuses_the_others(env, mola_checkpoint, data_dir):
    # Not Gymnasium's check_env: it steps random actions of the whole space, and a group's missing
    # experts are refused (ValueError), not silently remapped. Its invariants are checked here.
    assert env.group_experts == WIDTHS and env.action_space.n == 6
    obs, _ = env.reset(options={"example": 3})
    G, E = env.G, env.E
    for g, w in enumerate(WIDTHS):
        assert env.observation_space.contains(obs)
        assert env.action_masks().tolist() == [True] * w + [False] * (E - w)
        probs = obs[G : G + E]
        assert probs[:w].sum() == pytest.approx(1.0, abs=1e-5) and not probs[w:].any()
        obs, reward, done, _, info = env.step(w - 1)  # the group's last expert
        loads = info["group_loads"][g]
        assert loads[w - 1] == loads.sum() / env.k and not loads[w:].any()  # forced into every token's top-k
    assert done and env.observation_space.contains(obs)
    env.reset(options={"example": 0})
    with pytest.raises(ValueError, match=r"group 0 has 2 experts .*\[0, 2\), got 2"):
        env.step(2)
    with pytest.raises(ValueError, match=r"group 1 has 4 experts"):
        env.evaluate_prefixes([0], [(1, 5)])
    with pytest.raises(ValueError, match="needs the same expert count in every group.*action_mode='primary'"):
        gym.make("layermoe-arc", checkpoint=mola_checkpoint, max_examples=4, data_dir=data_dir, action_mode="combo")


def test_exhaustive_oracle_finds_the_best_of_every_valid_path(env):
    """Brute force over all 2 * 4 * 6 = 48 valid paths against the oracle's Q* and path."""
    ids = [1, 5]
    paths = list(itertools.product(*(range(w) for w in WIDTHS)))
    best = []
    for i in ids:  # before the search: its batch is valued against the running loads at its start
        res = env.evaluate_paths([i] * len(paths), [list(p) for p in paths])
        ret = res["outcome"] + res["balance"]
        best.append((paths[int(np.argmax(ret))], float(ret.max())))
    results = ExhaustiveAgent(temperature=0.05).search(env, ids)
    for r, (path, ret) in zip(results, best):
        assert tuple(r.path) == path
        # Tolerance: the brute force batches 48 paths' rows, the oracle its tree's levels.
        assert np.nanmax(r.values[0]) == pytest.approx(ret, abs=LOGP_ATOL)
        assert r.extra["nodes"] == 2 + 8 + 48
        for g, w in enumerate(WIDTHS):
            assert np.isnan(r.values[g, w:]).all() and np.isfinite(r.values[g, :w]).all()
            assert not r.targets[g, w:].any() and r.targets[g].sum() == pytest.approx(1.0)


def test_mcts_only_visits_experts_a_group_has(env):
    results = mcts_search(env, [0, 2, 4], MCTSConfig(num_simulations=24, dirichlet_fraction=0.25),
                          rng=np.random.default_rng(0))
    for r in results:
        assert all(a < w for a, w in zip(r.path, WIDTHS))
        for g, w in enumerate(WIDTHS):
            assert not r.targets[g, w:].any() and np.isnan(r.values[g, w:]).all()
        assert not r.loads[0, 2:].any() and not r.loads[1, 4:].any()


def test_search_and_stage_3_on_a_mola_model(mola_checkpoint, data_dir, tmp_path):
    from routing_env.training import finetune
    from routing_env.search import run as search
    summary = search.main(search.Config(env="layermoe-arc", agent="exhaustive", checkpoint=str(mola_checkpoint),
                                        num_examples=8, batch_size=4, data_dir=str(data_dir), device="cpu",
                                        logdir=str(tmp_path), name="s"))
    targets = load_targets(tmp_path / "s" / "targets.jsonl")
    assert targets.header["group_experts"] == WIDTHS and len(targets) == 8
    lines = (tmp_path / "s" / "targets.jsonl").read_text().splitlines()
    bad = json.loads(lines[1])
    bad["path"][0] = 3  # group 0 has experts 0 and 1 only
    (tmp_path / "bad.jsonl").write_text("\n".join([lines[0], json.dumps(bad)]) + "\n")
    with pytest.raises(TargetsError, match=r"bad.jsonl:2: group 0 has 2 experts .* at index 2 or above"):
        load_targets(tmp_path / "bad.jsonl")
    # Balance per group over its own experts (group 0's empty columns 2-5 would read as imbalance).
    assert [len(share) for share in summary["agent"]["load_share"]] == WIDTHS
    res = finetune.main(finetune.Config(task="arc-easy", method="layermoe", epochs=1, train_limit=8, eval_limit=8,
                                        batch_size=4, data_dir=str(data_dir), logdir=str(tmp_path), name="l",
                                        init_checkpoint=str(mola_checkpoint), targets=str(tmp_path / "s" / "targets.jsonl"),
                                        target_form="softmax", target_temperature=0.05, target_balance="sinkhorn",
                                        teacher_forcing=0.5))
    assert np.isfinite(res["test"]["loss"])
    hist = np.array(res["targets_histogram"])  # [G, E]: Sinkhorn-balanced over each group's own experts
    for g, w in enumerate(WIDTHS):
        np.testing.assert_allclose(hist[g, :w], 1.0 / w, atol=1e-6)
        assert not hist[g, w:].any()
    saved = json.loads((tmp_path / "l" / "results.json").read_text())
    assert saved["test"]["layers"]["0"]["loads"].__len__() == 2  # layer 0 reports its own 2 experts


def test_compare_accepts_mola_alone_and_under_a_strategy():
    assert compare.strategies(["mola", "mola+loss-free"]) == ["mola", "mola+loss-free"]
    assert compare.strategies(["all"])[-2:] == ["rmoe", "mola"]
    with pytest.raises(ValueError, match="valid: aux.*; or mola"):
        compare.strategies(["mola+bogus"])
