"""Routing-targets files: round trip, validation with file and line, resume after a torn write."""

from __future__ import annotations

import json

import numpy as np
import pytest

from routing_env.targets import TargetsError, TargetsWriter, check_compatible, load_targets

HEADER = {"env_id": "layermoe-arc", "task": "arc-easy", "split": "train", "fingerprint": "abc", "num_groups": 2,
          "num_experts": 3, "num_actions": 3, "action_mode": "primary", "agent": "mcts", "agent_config": {}}


def _rec(i: int) -> dict:
    return {"example": i, "id": f"q{i}", "targets": np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]),
            "values": np.array([[-0.1, -0.2, np.nan], [np.nan, np.nan, -0.3]]), "path": np.array([0, 2]),
            "outcome": -0.3, "correct": True, "loads": np.ones((2, 3)), "balance": 0.0}


def test_round_trip_keeps_arrays_and_nan(tmp_path):
    w = TargetsWriter(tmp_path / "t.jsonl", HEADER)
    w.write([_rec(0), _rec(1)])
    t = load_targets(tmp_path / "t.jsonl")
    assert t.header["version"] == 1 and len(t) == 2
    r = t.records["q1"]
    assert np.array_equal(r["targets"], _rec(1)["targets"]) and np.array_equal(r["path"], [0, 2])
    assert np.isnan(r["values"][0, 2]) and r["values"][1, 2] == -0.3


def test_resume_drops_a_torn_line_and_appends(tmp_path):
    path = tmp_path / "t.jsonl"
    TargetsWriter(path, HEADER).write([_rec(0), _rec(1)])
    with open(path, "a") as f:
        f.write(json.dumps({"example": 2, "id": "q2"})[:15])  # interrupted mid-record
    w = TargetsWriter(path, HEADER)
    assert sorted(w.done) == ["q0", "q1"]
    w.write([_rec(2)])
    assert sorted(load_targets(path).records) == ["q0", "q1", "q2"]


def test_resume_refuses_another_agent_or_model(tmp_path):
    path = tmp_path / "t.jsonl"
    TargetsWriter(path, HEADER)
    with pytest.raises(TargetsError, match="agent='mcts'.*'ppo'.*--overwrite"):
        TargetsWriter(path, HEADER | {"agent": "ppo"})
    with pytest.raises(TargetsError, match="fingerprint: file has 'abc', this run has 'zzz'"):
        TargetsWriter(path, HEADER | {"fingerprint": "zzz"})
    TargetsWriter(path, HEADER | {"agent": "ppo"}, overwrite=True)  # explicit restart is allowed


def test_check_compatible_names_every_difference():
    with pytest.raises(TargetsError, match="num_groups: file has 2, this model has 3; num_experts: file has 3, this model has 4"):
        check_compatible(HEADER, {"num_groups": 3, "num_experts": 4, "task": "arc-easy"})
    check_compatible(HEADER, {"num_groups": 2, "task": "arc-easy"})


@pytest.mark.parametrize("bad,msg", [
    ('{"id": "q", "targets": [[1, 0, 0]], "path": [0, 0]}', r"t.jsonl:2: targets of example 'q' are \[1, 3\]"),
    ('{"id": "q", "targets": [[0.5, 0, 0], [1, 0, 0]], "path": [0, 0]}', "t.jsonl:2: .*not distributions"),
    ('{"id": "q", "targets": [[1, 0, 0], [1, 0, 0]], "path": [0, 7]}', r"t.jsonl:2: path .* in \[0, 3\)"),
    ('{"id": "q", "targets": [[1, 0, 0], [1, 0, 0]]}', "t.jsonl:2: record lacks path"),
    ('{"id": "q", oops', "t.jsonl:2: malformed JSON"),
])
def test_malformed_records_name_file_and_line(tmp_path, bad, msg):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"format": "routing-targets", "version": 1, **HEADER}) + "\n" + bad + "\n")
    with pytest.raises(TargetsError, match=msg):
        load_targets(path)


def test_not_a_targets_file(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"question": "?"}\n')
    with pytest.raises(TargetsError, match="not a routing-targets file"):
        load_targets(tmp_path / "x.jsonl")
    with pytest.raises(TargetsError, match="no routing-targets file"):
        load_targets(tmp_path / "missing.jsonl")
