"""RoutingVectorEnv: batched stepping equals stepping each episode alone; autoreset follows Gymnasium."""

from __future__ import annotations

import numpy as np
import pytest

from routing_env.env import RoutingEnv
from routing_env.env.vector import RoutingVectorEnv
from tests.tolerances import LOGP_ATOL


def test_vector_env_matches_single_env_and_autoresets(distinct_checkpoint, data_dir):
    # No balance term: finished sub-envs update the shared running loads in slot order, so their
    # balance rewards legitimately differ from isolated episodes; the outcome must not.
    kw = dict(checkpoint=distinct_checkpoint, max_examples=12, data_dir=data_dir, balance_weight=0.0)
    venv = RoutingVectorEnv(num_envs=5, **kw)
    examples = [0, 3, 3, 7, 11]
    actions = np.array([[0, 1, 2, 3, 0], [1, 1, 2, 0, 3], [2, 0, 2, 1, 1]])
    obs, _ = venv.reset(seed=0, options={"examples": examples})
    assert obs.shape == (5, venv.single_observation_space.shape[0])
    for t in range(3):
        obs, rewards, term, trunc, info = venv.step(actions[t])
    assert term.all() and not trunc.any()

    single = RoutingEnv(**kw)
    for j, i in enumerate(examples):
        single.reset(options={"example": i})
        for t in range(3):
            _, r, _, _, sinfo = single.step(int(actions[t, j]))
        # Tolerance: the vector env steps five questions' rows in one batch, the single env one's.
        assert r == pytest.approx(rewards[j], abs=LOGP_ATOL)
        assert info["outcome"][j] == pytest.approx(sinfo["outcome"], abs=LOGP_ATOL)
    # All five episodes' loads went into the shared running statistics.
    assert venv.env.load_stats.sum() == pytest.approx(info["group_loads"].sum())

    # Next step: every sub-env resets (its action is ignored) and starts at group 0.
    obs, rewards, term, _, _ = venv.step(actions[0])
    assert not term.any() and np.all(rewards == 0) and np.all(obs[:, 0] == 1.0)


def test_same_step_autoreset_returns_the_final_observation(warm_checkpoint, data_dir):
    from gymnasium.vector import AutoresetMode

    venv = RoutingVectorEnv(num_envs=2, autoreset_mode=AutoresetMode.SAME_STEP, checkpoint=warm_checkpoint,
                            max_examples=6, data_dir=data_dir)
    venv.reset(seed=1)
    for _ in range(3):
        obs, _, term, _, info = venv.step(np.array([1, 2]))
    assert term.all() and info["_final_obs"].all()
    assert (obs[:, 0] == 1.0).all()  # already the next episode's first observation
    assert (np.stack(info["final_obs"])[:, :3] == 0).all()  # object array, as Gymnasium's own vector envs give
    assert list(info["final_info"]["path"][0]) == [1, 1, 1] and list(info["final_info"]["path"][1]) == [2, 2, 2]


def test_make_vec_builds_one_batched_env(warm_checkpoint, data_dir):
    """``gym.make_vec`` goes to the batched env: one model for every sub-env, not num_envs copies."""
    import gymnasium as gym

    venv = gym.make_vec("layermoe-arc", 3, checkpoint=warm_checkpoint, max_examples=6, data_dir=data_dir)
    assert isinstance(venv, RoutingVectorEnv) and venv.num_envs == 3 and venv.env.task == "arc-easy"
    obs, _ = venv.reset(seed=0)
    assert obs.shape == (3, *venv.single_observation_space.shape)
    venv.close()
