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
    out.write_text(json.dumps({"obqa/lora-moe/s0": done}))
    runs = tmp_path / "runs"
    (runs / "obqa" / "layermoe-exhaustive-c3a0a54b-s0" / "final").mkdir(parents=True)
    calls = []

    def fake_measure(ckpt, env_id, n, draws, data_dir, oracle=True):
        calls.append((Path(ckpt).parent.name, oracle))
        return {w: {"accuracy": 0.25, "logp": -1.2} for w in ("router", "random")}

    monkeypatch.setattr(rs, "measure", fake_measure)
    monkeypatch.setattr("sys.argv", ["rs", "--tasks", "obqa", "--seeds", "0", "--runs", str(runs), "--output", str(out)])
    rs.main()
    # the finished lora-moe row is not recomputed; the layermoe one runs without the oracle (default kinds)
    assert calls == [("layermoe-exhaustive-c3a0a54b-s0", False)]
    assert set(json.loads(out.read_text())) == {"obqa/lora-moe/s0", "obqa/layermoe/s0"}
    assert out.with_suffix(".md").read_text().count("| obqa |") == 2
