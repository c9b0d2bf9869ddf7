"""train_rl.py end to end on the real env: targets + TensorBoard + summary, resume, plug-ins, bad input."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from routing_env.search import run as train_rl
from routing_env.targets import TargetsError, load_targets


@pytest.fixture()
def cfg(warm_checkpoint, data_dir, tmp_path):
    def _cfg(**kw) -> train_rl.Config:
        base = dict(checkpoint=str(warm_checkpoint), data_dir=str(data_dir), num_examples=6, num_simulations=4,
                    batch_size=3, logdir=str(tmp_path), name="run")
        return train_rl.Config(**(base | kw))
    return _cfg


def test_mcts_run_writes_targets_logs_and_summary_and_resumes(cfg, tmp_path):
    summary = train_rl.main(cfg())
    run = tmp_path / "run"
    t = load_targets(run / "targets.jsonl")
    assert len(t) == 6 and t.header["agent"] == "mcts" and t.header["agent_config"]["num_simulations"] == 4
    assert t.header["num_groups"] == 3 and t.header["num_experts"] == 4
    for r in t.records.values():
        assert np.allclose(r["targets"].sum(1), 1.0)
        # visit counts of 4 simulations (temperature 1): multiples of 1/4
        assert np.allclose(r["targets"] * 4, np.round(r["targets"] * 4))
    assert list(run.glob("events.out.tfevents.*")) and (run / "loads_agent.png").is_file()
    assert summary["agent"]["examples"] == 6 and "router" in summary
    assert json.loads((run / "summary.json").read_text())["agent"]["cv_mean"] == summary["agent"]["cv_mean"]

    # Resume: the 6 finished examples are kept byte for byte, only the 2 new ones are searched.
    before = (run / "targets.jsonl").read_text()
    train_rl.main(cfg(num_examples=8))
    after = (run / "targets.jsonl").read_text()
    assert after.startswith(before) and len(after.splitlines()) == 1 + 8


def test_plugin_agent_through_train_rl(cfg, tmp_path, monkeypatch):
    (tmp_path / "user_agent.py").write_text(textwrap.dedent("""
        class Second:
            def act(self, obs, env):
                return 1
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    summary = train_rl.main(cfg(agent="user_agent:Second", name="plug", compare_router=False))
    t = load_targets(tmp_path / "plug" / "targets.jsonl")
    assert all(np.array_equal(r["path"], [1, 1, 1]) for r in t.records.values())
    assert summary["agent"]["examples"] == 6


def test_bad_input(cfg, tmp_path):
    with pytest.raises(ValueError, match="unknown agent 'nope'; valid: exhaustive, known-route, mcts"):
        train_rl.main(cfg(agent="nope"))
    with pytest.raises(ValueError, match="--agent-kwargs must be a JSON object"):
        train_rl.main(cfg(agent_kwargs="[1]"))
    # A targets file from another model (different groups and fingerprint) is refused, not appended to.
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"format": "routing-targets", "version": 1, "task": "arc-easy", "fingerprint": "0",
                                 "num_groups": 2, "num_experts": 4, "num_actions": 4, "action_mode": "primary"}) + "\n")
    with pytest.raises(TargetsError, match="fingerprint: file has '0'.*num_groups: file has 2, this run has 3"):
        train_rl.main(cfg(output=str(other)))
