"""Agent registry and plug-ins, baselines, and PPO (SB3) on the synthetic and the real env."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest

import agents
from agents.baselines import RoundRobinAgent
from agents.ppo import SB3VecEnv, make_vector_env
from routing_env.env.synthetic import SyntheticRoutingEnv


def test_unknown_agent_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown agent 'alphago'.*mcts.*ppo.*random.*round-robin.*router"):
        agents.make("alphago")


def test_plugin_by_module_path_and_protocol_check(tmp_path, monkeypatch):
    (tmp_path / "my_agents.py").write_text(textwrap.dedent("""
        class LastExpert:
            def __init__(self, offset=0):
                self.offset = offset
            def act(self, obs, env):
                return env.action_space.n - 1 - self.offset

        class NoAct:
            def choose(self, obs):
                return 0
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    agent = agents.make("my_agents:LastExpert", offset=1)
    res = agents.run_agent(agent, SyntheticRoutingEnv(num_examples=3), [0, 1, 2])
    assert all(np.array_equal(r.path, [2, 2, 2]) for r in res)
    assert all(np.array_equal(r.targets[:, 2], [1, 1, 1]) for r in res)  # one-hot targets of the taken actions
    with pytest.raises(TypeError, match="does not implement the agent protocol.*act"):
        agents.make("my_agents:NoAct")
    with pytest.raises(ValueError, match="has no attribute 'Missing'"):
        agents.make("my_agents:Missing")
    with pytest.raises(ValueError, match="cannot import agent module 'no_such_module'"):
        agents.make("no_such_module:Agent")
    with pytest.raises(ValueError, match="could not build agent"):
        agents.make("my_agents:LastExpert", bogus=1)
    sys.modules.pop("my_agents", None)


def test_round_robin_is_exactly_balanced_and_router_follows_its_priors():
    env = SyntheticRoutingEnv(num_examples=8)
    res = agents.run_agent(RoundRobinAgent(), env, range(8))
    summary = agents.summarize(res)
    assert summary["cv_mean"] == 0.0 and np.allclose(summary["load_share"], 0.25)
    router = agents.run_agent(agents.make("router"), SyntheticRoutingEnv(num_examples=8), range(8))
    for r in router:
        assert np.array_equal(r.path, env.priors[r.example].argmax(1))
        assert np.allclose(r.targets, env.priors[r.example])


def test_ppo_beats_random_on_the_synthetic_env():
    kw = dict(num_examples=64, router_accuracy=0.6)
    ppo = agents.make("ppo", total_timesteps=3072, seed=0)
    ppo.fit(SyntheticRoutingEnv(**kw))
    ppo_res = agents.run_agent(ppo, SyntheticRoutingEnv(**kw), range(64))
    rnd_res = agents.run_agent(agents.make("random", seed=0), SyntheticRoutingEnv(**kw), range(64))
    assert np.mean([r.outcome for r in ppo_res]) > np.mean([r.outcome for r in rnd_res]) + 0.3
    for r in ppo_res:  # targets are the policy's distributions
        assert np.allclose(r.targets.sum(1), 1.0) and (r.targets > 0).all()


def test_sb3_vec_env_adapter_autoresets_in_the_same_step():
    vec = SB3VecEnv(make_vector_env(SyntheticRoutingEnv(num_examples=4), 2))
    obs = vec.reset()
    assert obs.shape == (2, vec.observation_space.shape[0])
    for t in range(3):
        vec.step_async(np.zeros(2, int))
        obs, rewards, dones, infos = vec.step_wait()
    assert dones.all() and all("terminal_observation" in i and i["episode"]["l"] == 3 for i in infos)
    assert (obs[:, 0] == 1.0).all()  # the returned observation already starts the next episode at group 0
    assert (infos[0]["terminal_observation"][:3] == 0).all()


def test_ppo_runs_on_the_real_env(warm_checkpoint, data_dir):
    import gymnasium as gym

    env = gym.make("layermoe-arc", checkpoint=warm_checkpoint, data_dir=data_dir, max_examples=8).unwrapped
    ppo = agents.make("ppo", total_timesteps=48, num_envs=4, n_steps=12, batch_size=24, n_epochs=1)
    ppo.fit(env)
    assert env.load_stats.sum() == 0  # training episodes are not counted as search decisions
    res = agents.run_agent(ppo, env, [0, 1])
    assert all(r.targets.shape == (env.G, env.E) and np.allclose(r.targets.sum(1), 1) for r in res)


def test_the_readme_plugin_example_runs_and_balances(tmp_path, monkeypatch):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = readme.split("# my_agents.py")[1].split("```")[0]
    (tmp_path / "readme_agents.py").write_text(code.split("\n", 1)[1])
    monkeypatch.syspath_prepend(str(tmp_path))
    agent = agents.make("readme_agents:LeastLoaded", tie_weight=0.01)
    res = agents.run_agent(agent, SyntheticRoutingEnv(num_examples=16), range(16))
    assert agents.summarize(res)["cv_mean"] == 0.0  # 16 episodes over 4 experts, least-loaded first
    sys.modules.pop("readme_agents", None)
