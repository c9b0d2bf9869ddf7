"""Agents, the env and the search driver under interruption and bad input.

Each test fails on the code before this review: a resumed search equals an uninterrupted one for
stochastic agents too; a class without ``act`` or an unimportable module is a one-line user error;
an agent can be given as a file path; every numeric env argument is checked before a model loads;
the search's summary says it is hindsight and where its outputs are; every bench script answers
``--help`` without running.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import agents
import routing_env  # noqa: F401  (registers the ids)
from agents.mcts import MCTSConfig, mcts_search
from routing_env.search import run as search
from routing_env.env.synthetic import SyntheticRoutingEnv

ROOT = Path(__file__).resolve().parents[1]

USER_AGENTS = textwrap.dedent("""
    class Second:
        def act(self, obs, env):
            return 1

    class NoAct:
        def choose(self, obs):
            return 0
""")


@pytest.fixture()
def no_model(monkeypatch):
    """Any attempt to load (or train, for want of a checkpoint) a model fails the test."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the bad input was refused")
    monkeypatch.setattr("routing_env.env.model.load_checkpoint", boom)
    monkeypatch.setattr("routing_env.training.warmup.default_checkpoint", boom)


@pytest.fixture()
def user_file(tmp_path) -> Path:
    """A user's agents in a .py file outside the repository, on no import path."""
    path = tmp_path / "elsewhere" / "user_agents_file.py"
    path.parent.mkdir()
    path.write_text(USER_AGENTS)
    return path


# ---- 1. resume equals no interruption, for stochastic agents too -----------------------------------

@pytest.mark.parametrize("agent, agent_kwargs", [
    ("random", "{}"),
    ("round-robin", "{}"),
    ("mcts", '{"dirichlet_fraction": 0.25}'),
])
def test_search_resumed_after_a_kill_equals_the_uninterrupted_run(warm_checkpoint, data_dir, tmp_path, agent,
                                                                 agent_kwargs):
    def cfg(name: str) -> search.Config:
        # balance_weight > 0: resumed records feed the running loads, so their order shows in later rewards.
        return search.Config(agent=agent, agent_kwargs=agent_kwargs, checkpoint=str(warm_checkpoint),
                             data_dir=str(data_dir), num_examples=6, batch_size=2, num_simulations=6,
                             balance_weight=0.1, compare_router=False, logdir=str(tmp_path), name=name)

    full = search.main(cfg("full"))
    search.main(cfg("cut"))
    # A kill between batches leaves the header and the first k batches (the writer appends a batch at a time).
    cut = tmp_path / "cut" / "targets.jsonl"
    lines = cut.read_bytes().splitlines(keepends=True)
    assert len(lines) == 1 + 6
    cut.write_bytes(b"".join(lines[: 1 + 2]))  # killed after the first batch
    (tmp_path / "cut" / "summary.json").unlink()
    resumed = search.main(cfg("cut"))
    assert cut.read_bytes() == (tmp_path / "full" / "targets.jsonl").read_bytes()
    assert resumed["agent"] == full["agent"]


def test_random_and_round_robin_choices_are_functions_of_the_example():
    """Running a later part of the examples alone gives the same paths as running all of them."""
    for name, kw in (("random", {"seed": 3}), ("round-robin", {})):
        whole = agents.run_agent(agents.make(name, **kw), SyntheticRoutingEnv(num_examples=8), range(8))
        part = agents.run_agent(agents.make(name, **kw), SyntheticRoutingEnv(num_examples=8), range(5, 8))
        assert [r.path.tolist() for r in whole[5:]] == [r.path.tolist() for r in part], name
    # round-robin: group g of example n takes (n + g) mod A, whatever ran before.
    res = agents.run_agent(agents.make("round-robin"), SyntheticRoutingEnv(num_examples=8), [6, 1])
    assert [r.path.tolist() for r in res] == [[2, 3, 0], [1, 2, 3]]
    # Seeds still matter.
    a = agents.run_agent(agents.make("random", seed=0), SyntheticRoutingEnv(num_examples=8), range(8))
    b = agents.run_agent(agents.make("random", seed=1), SyntheticRoutingEnv(num_examples=8), range(8))
    assert [r.path.tolist() for r in a] != [r.path.tolist() for r in b]


def test_mcts_dirichlet_noise_is_drawn_per_root_from_its_example():
    cfg = MCTSConfig(num_simulations=12, dirichlet_fraction=0.25)
    env = SyntheticRoutingEnv(num_examples=8, router_accuracy=0.3)  # balance weight 0: trees are independent
    whole = mcts_search(env, list(range(8)), cfg, seed=5)
    part = mcts_search(env, [6, 2], cfg, seed=5)
    for r, p in zip([whole[6], whole[2]], part):
        assert np.array_equal(r.targets, p.targets) and np.array_equal(r.path, p.path)
    other = mcts_search(env, list(range(8)), cfg, seed=6)
    assert any(not np.array_equal(r.targets, o.targets) for r, o in zip(whole, other))
    # The agent: its batches and a resumed tail draw the same noise.
    a = agents.make("mcts", num_simulations=12, dirichlet_fraction=0.25, batch_size=3, seed=5)
    tail = a.search(SyntheticRoutingEnv(num_examples=8, router_accuracy=0.3), [6, 7])
    for r, t in zip(whole[6:], tail):
        assert np.array_equal(r.targets, t.targets)


# ---- 2. an object that is not an agent: a ValueError (one CLI line), caught before the model -------

def test_agent_without_act_is_a_value_error_naming_the_protocol(user_file):
    with pytest.raises(ValueError, match=r"does not implement the agent protocol.*act\(obs, env\)") as e:
        agents.make(f"{user_file}:NoAct")
    assert isinstance(e.value, TypeError) and isinstance(e.value, agents.AgentError)  # old `except TypeError` still works
    with pytest.raises(agents.AgentError, match="config must be a method"):
        agents.check_agent(type("Odd", (), {"act": lambda self, o, e: 0, "config": 3})())


def test_train_rl_refuses_a_class_without_act_before_the_model(tmp_path, data_dir, no_model, user_file):
    cfg = search.Config(agent=f"{user_file}:NoAct", data_dir=str(data_dir), logdir=str(tmp_path), name="run")
    with pytest.raises(ValueError, match="agent protocol"):
        search.main(cfg)
    with pytest.raises(ValueError, match="could not build agent .*Second.* unexpected.*bogus"):
        search.main(search.Config(agent=f"{user_file}:Second", agent_kwargs='{"bogus": 1}', data_dir=str(data_dir),
                                  logdir=str(tmp_path), name="run"))
    assert not (tmp_path / "run").exists()


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ROUTING_GYM_TRACEBACK", None)
    return subprocess.run([sys.executable, str(ROOT / "train_rl.py"), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_cli_agent_without_act_is_one_error_line_exit_2(tmp_path, data_dir, user_file):
    proc = _cli("--agent", f"{user_file}:NoAct", "--data-dir", str(data_dir), "--logdir", str(tmp_path))
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert err[-1].startswith("error: ") and "agent protocol" in err[-1], proc.stderr
    assert sum(line.startswith("error:") for line in err) == 1


# ---- 3. an agent given by file path ------------------------------------------------------------------

def test_agent_from_a_file_path_absolute_and_relative(tmp_path, user_file, monkeypatch):
    res = agents.run_agent(agents.make(f"{user_file}:Second"), SyntheticRoutingEnv(num_examples=2), [0, 1])
    assert all(r.path.tolist() == [1, 1, 1] for r in res)
    monkeypatch.chdir(tmp_path)
    agent = agents.make("elsewhere/user_agents_file.py:Second")
    assert agent.act(None, None) == 1
    assert "user_agents_file" not in sys.modules  # imported under its own unique name, shadowing nothing
    # Two files with the same name in different folders are two modules.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "user_agents_file.py").write_text("class Second:\n    def act(self, obs, env):\n        return 2\n")
    assert agents.make("other/user_agents_file.py:Second").act(None, None) == 2
    assert agents.make(f"{user_file}:Second").act(None, None) == 1


def test_agent_spec_errors_say_how_to_fix_them(tmp_path, user_file):
    with pytest.raises(ValueError, match=r"cannot import agent module 'no_such_module'.*"
                                         r"path/to/no_such_module\.py:Agent.*PYTHONPATH"):
        agents.make("no_such_module:Agent")
    with pytest.raises(ValueError, match=r"agent file .*missing\.py does not exist"):
        agents.make(f"{tmp_path / 'missing.py'}:Agent")
    with pytest.raises(ValueError, match=r"has no attribute 'Missing'"):
        agents.make(f"{user_file}:Missing")
    with pytest.raises(ValueError, match=r"name the class: .*user_agents_file\.py:ClassName"):
        agents.make(str(user_file))
    broken = tmp_path / "broken_agents.py"
    broken.write_text("class Broken(:\n")
    with pytest.raises(ValueError, match=r"cannot import agent file .*broken_agents\.py"):
        agents.make(f"{broken}:Broken")


def test_train_rl_runs_an_agent_given_by_file_path(warm_checkpoint, data_dir, tmp_path, user_file):
    cfg = search.Config(agent=f"{user_file}:Second", checkpoint=str(warm_checkpoint), data_dir=str(data_dir),
                        num_examples=4, batch_size=2, compare_router=False, logdir=str(tmp_path / "runs"))
    summary = search.main(cfg)
    assert summary["agent"]["examples"] == 4
    runs = list((tmp_path / "runs").iterdir())
    # The run folder is one folder directly under --logdir, not the file's path spelled out below it.
    assert len(runs) == 1 and (runs[0] / "targets.jsonl").is_file(), runs
    assert "/" not in runs[0].name and "user_agents_file.Second" in runs[0].name


# ---- 4. env arguments checked before anything loads -------------------------------------------------

@pytest.mark.parametrize("kw, needle", [
    ({"cache_mb": -5}, r"cache_mb must be a finite number >= 0, got -5"),
    ({"cache_mb": float("inf")}, r"cache_mb must be a finite number >= 0, got inf"),
    ({"balance_weight": float("nan")}, r"balance_weight must be a finite number, got nan"),
    ({"balance_weight": "0.1"}, r"balance_weight must be a finite number, got '0.1'"),
    ({"max_examples": 0}, r"max_examples must be an integer >= 1 \(or None\), got 0"),
    ({"max_examples": 2.5}, r"max_examples must be an integer >= 1 \(or None\), got 2.5"),
    ({"obs_proj_dim": -1}, r"obs_proj_dim must be an integer >= 0, got -1"),
    ({"projection_seed": -1}, r"projection_seed must be an integer >= 0, got -1"),
    ({"num_groups": 0}, r"num_groups must be an integer >= 1 \(or None\), got 0"),
    ({"num_experts": 0}, r"num_experts must be an integer >= 1 \(or None\), got 0"),
    ({"group_sizes": [2, 0, 4]}, r"group_sizes must be a list of integers >= 1 \(or None\), got \[2, 0, 4\]"),
    ({"precision": "fp16"}, r"unknown precision 'fp16'"),
])
def test_env_refuses_bad_arguments_before_any_model(data_dir, no_model, kw, needle):
    with pytest.raises(ValueError, match=needle):
        gym.make("layermoe-arc", data_dir=data_dir, **kw)  # no checkpoint: a demo warm-up would train next


def test_vector_and_synthetic_envs_check_their_arguments(data_dir, no_model):
    from routing_env.env.vector import RoutingVectorEnv

    with pytest.raises(ValueError, match=r"num_envs must be an integer >= 1, got 0"):
        RoutingVectorEnv(num_envs=0, data_dir=data_dir)
    with pytest.raises(ValueError, match=r"cache_mb must be a finite number >= 0, got -1"):
        gym.make_vec("layermoe-arc", 2, data_dir=data_dir, cache_mb=-1)
    for kw, needle in [({"balance_weight": float("nan")}, "balance_weight must be a finite number, got nan"),
                       ({"num_examples": 0}, "num_examples must be an integer >= 1, got 0"),
                       ({"router_accuracy": 1.5}, r"router_accuracy must be a finite number in \[0, 1\], got 1.5"),
                       ({"obs_proj_dim": -1}, "obs_proj_dim must be an integer >= 0, got -1"),
                       ({"num_experts": 0}, "num_experts must be an integer >= 1, got 0")]:
        with pytest.raises(ValueError, match=needle):
            SyntheticRoutingEnv(**kw)


def test_env_edge_values_that_are_valid_work(warm_checkpoint, data_dir):
    env = gym.make("layermoe-arc", checkpoint=warm_checkpoint, data_dir=data_dir, max_examples=1, obs_proj_dim=0,
                   cache_mb=0, balance_weight=0.0).unwrapped
    obs, _ = env.reset(options={"example": 0})
    assert obs.shape == (env.G + 2 * env.E,)
    for _ in range(env.G):
        obs, reward, done, _, _ = env.step(0)
    assert done and math.isfinite(reward)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_train_rl_refuses_a_non_finite_balance_weight(tmp_path, data_dir, no_model, value):
    cfg = search.Config(balance_weight=value, data_dir=str(data_dir), logdir=str(tmp_path), name="run")
    with pytest.raises(ValueError, match=f"--balance-weight must be a finite number, got {value}"):
        search.main(cfg)
    assert not (tmp_path / "run").exists()


# ---- 5. the summary says what the comparison is, and where everything went --------------------------

def test_search_summary_says_hindsight_and_where_outputs_are(warm_checkpoint, data_dir, tmp_path, capsys):
    cfg = search.Config(agent="router", checkpoint=str(warm_checkpoint), data_dir=str(data_dir), num_examples=4,
                        batch_size=2, logdir=str(tmp_path), name="run")
    summary = search.main(cfg)
    out = capsys.readouterr().out
    run = tmp_path / "run"
    assert "hindsight" in out and "not a held-out accuracy" in out
    for path in (run / "targets.jsonl", run / "summary.json", run / "loads_agent.png", run / "loads_router.png"):
        assert str(path) in out and path.is_file()
    assert f"tensorboard --logdir {run}" in out
    saved = json.loads((run / "summary.json").read_text())
    assert saved["hindsight"] is True and "answer" in saved["note"] and summary["hindsight"] is True


# ---- 6. bench scripts answer --help ------------------------------------------------------------------

@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bench").glob("*.py")))
def test_bench_script_help_prints_usage_and_runs_nothing(script, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:"), proc.stdout[:500]
    assert "{" not in proc.stdout.split("\n", 1)[0]  # no JSON result printed before the help
    assert not list(tmp_path.iterdir())  # nothing written


def test_known_route_agent_routes_each_control_question_by_its_tag(warm_checkpoint, data_dir, tmp_path):
    """The positive control's known route: tag k -> expert k mod A in every group; elsewhere a clear error."""
    import gymnasium as gym

    from agents import AgentError
    from agents.known_route import question_tag
    from routing_env.data.generated import TAGS, write_routing_control

    folder = write_routing_control(tmp_path / "control", num_tags=4, num_words=8, train_reps=1, eval_reps=1)
    env = gym.make("layermoe-arc", checkpoint=str(warm_checkpoint), task=str(folder), split="dev",
                   data_dir=str(data_dir)).unwrapped
    ids = list(range(8))
    res = agents.run_agent(agents.make("known-route"), env, ids)
    tags = [TAGS.index(env.examples[i].question.split()[0]) for i in ids]
    assert len(set(tags)) > 1  # the check below could fail for a constant route
    widths = env.action_space.n
    assert [r.path.tolist() for r in res] == [[t % widths] * env.G for t in tags]
    assert question_tag("gamma cat") == 2
    arc = gym.make("layermoe-arc", checkpoint=str(warm_checkpoint), split="dev", data_dir=str(data_dir)).unwrapped
    with pytest.raises(AgentError, match="routing-control tag"):
        agents.run_agent(agents.make("known-route"), arc, [0])
