"""The exhaustive oracle: exact Q* against brute force over every path, on the synthetic and the real env."""

from __future__ import annotations

import itertools

import gymnasium as gym
import numpy as np
import pytest

import agents
import routing_env  # noqa: F401  (registers the ids)
from agents.exhaustive import exhaustive_q
from routing_env.targets import q_targets
from agents.mcts import MCTSConfig, mcts_search
from routing_env.env.synthetic import SyntheticRoutingEnv
from tests.conftest import assert_exhaustive_is_brute_force
from tests.tolerances import LOGP_ATOL


def _brute_force(env, i: int) -> dict[tuple, float]:
    """Return (outcome + balance) of every complete path of example ``i``, scored one path at a time."""
    paths = list(itertools.product(range(int(env.action_space.n)), repeat=env.G))
    out = {}
    for p in paths:
        res = env.evaluate_paths([i], [list(p)])
        out[p] = float(res["outcome"][0] + res["balance"][0])
    return out


def test_q_star_is_the_best_return_below_each_choice_on_the_synthetic_env():
    env = SyntheticRoutingEnv(num_examples=5, balance_weight=0.3)
    env.load_stats[:] = np.arange(env.G * env.E).reshape(env.G, env.E) + 1.0  # balance terms that matter
    qs = exhaustive_q(env, range(5))
    for i, q in enumerate(qs):
        ret = _brute_force(env, i)
        for prefix, qa in q.items():
            # Q* counts the rewards from the node on; the return also holds the prefix's own steps.
            before = sum(env.balance_reward(g, env.step_loads(a)) for g, a in enumerate(prefix))
            for a in range(env.E):
                below = [r for p, r in ret.items() if p[: len(prefix) + 1] == prefix + (a,)]
                assert qa[a] + before == pytest.approx(max(below), abs=1e-12)


def test_exhaustive_agent_finds_the_best_path_and_updates_running_loads():
    env = SyntheticRoutingEnv(num_examples=12, router_accuracy=0.2)
    res = agents.make("exhaustive", batch_size=5).search(env, list(range(12)))
    assert all(np.array_equal(r.path, env.best[r.example]) and r.correct for r in res)
    assert all(r.targets[g].argmax() == r.path[g] and r.targets[g].max() == 1.0 for r in res for g in range(env.G))
    assert env.load_stats.sum() == pytest.approx(sum(r.loads.sum() for r in res))
    # Plain stepping with act() follows the same optimal path.
    steps = agents.rollout(agents.make("exhaustive"), SyntheticRoutingEnv(num_examples=12, router_accuracy=0.2), range(4))
    assert all(np.array_equal(r.path, env.best[r.example]) for r in steps)


def test_q_targets_forms():
    q = np.array([-1.0, -0.2, -0.2 - np.log(3), -5.0])
    assert q_targets(q, 0.0).tolist() == [0, 1, 0, 0]
    t = q_targets(q, 1.0)
    assert t.sum() == pytest.approx(1.0) and t[1] / t[2] == pytest.approx(3.0)  # log-p units at temperature 1
    assert np.ptp(q_targets(q, 1e6)) < 1e-5  # hot: uniform


def test_mcts_never_beats_the_oracle_and_reaches_it_with_enough_simulations():
    env = SyntheticRoutingEnv(num_examples=16, router_accuracy=0.3, balance_weight=0.1)
    oracle = agents.make("exhaustive").search(env, list(range(16)))
    for sims, exact in ((2, False), (24, True)):
        found = mcts_search(SyntheticRoutingEnv(num_examples=16, router_accuracy=0.3, balance_weight=0.1),
                            list(range(16)), MCTSConfig(num_simulations=sims), np.random.default_rng(0))
        regret = np.array([o.outcome - f.outcome for o, f in zip(oracle, found)])
        assert (regret >= -1e-12).all()
        assert (regret.max() < 1e-12) == exact


def test_big_trees_are_refused_naming_mcts():
    env = SyntheticRoutingEnv(num_groups=6, num_experts=8, num_examples=2)
    with pytest.raises(ValueError, match="262144 paths.*--agent mcts"):
        agents.make("exhaustive").search(env, [0])
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        agents.make("exhaustive", temperature=-1)


def test_exhaustive_on_the_real_env_is_the_max_over_all_64_paths(distinct_checkpoint, data_dir):
    env = gym.make("layermoe-arc", checkpoint=distinct_checkpoint, max_examples=4, data_dir=data_dir,
                   balance_weight=0.5).unwrapped
    env.load_stats[:] = np.arange(env.G * env.E).reshape(env.G, env.E) + 1.0
    q = assert_exhaustive_is_brute_force(env, [1, 2])
    for n in range(2):
        assert np.ptp(q[n][()]) > 10 * LOGP_ATOL  # the first group's choice matters on this checkpoint
