"""``bench/llm_shape.py`` (issue 25): ``--help`` runs nothing, ``--dry`` runs every part on a tiny Qwen2 shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "llm_shape.py"


def _env(data_dir: Path | None = None) -> dict:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return env | {"ROUTING_ENV_DATA": str(data_dir)} if data_dir else env


def test_help_prints_usage_and_runs_nothing(tmp_path):
    out = tmp_path / "out.json"
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, str(SCRIPT), "--help", "--out", str(out)], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "usage:" in res.stdout and "--dry" in res.stdout
    assert not out.exists()  # nothing ran, nothing was written
    assert time.perf_counter() - t0 < 30  # argparse before torch: no model is built


def test_dry_run_gives_every_key_with_positive_numbers(tmp_path, data_dir):
    out = tmp_path / "out.json"
    subprocess.run([sys.executable, str(SCRIPT), "--dry", "--threads", "1", "--out", str(out)], cwd=ROOT,
                   env=_env(data_dir), check=True, capture_output=True, timeout=120)
    res = json.loads(out.read_text())
    assert res["dry"] and not res["real_qwen2_0_5b_shape"] and res["shape"]["num_hidden_layers"] == 3
    assert res["backbone_parameters"] > 0
    for method in ("lora", "lora-moe"):
        row = res["methods"][method]
        for key in ("trainable_parameters", "train_step_ms", "train_tokens_per_s", "eval_forward_ms",
                    "eval_sequences_per_s", "eval_tokens_per_s"):
            assert row[key] > 0, (method, key, row[key])
        assert row["train_peak_mb"] >= 0 and row["eval_peak_mb"] >= 0  # RSS growth: may round to nothing
    # LoRA-MoE trains more adapters than one LoRA of the same rank (4 experts + routers).
    assert res["methods"]["lora-moe"]["trainable_parameters"] > res["methods"]["lora"]["trainable_parameters"]
    ratio = res["ratio_lora_moe_over_lora"]
    assert ratio["train_step_ms"] > 0 and ratio["eval_sequences_per_s"] > 0
    assert isinstance(res["met"], bool)
    assert res["machine"]["torch"] and len(res["machine"]["load_average_before"]) == 3
    env = res["env"]  # the env runs the causal LM group by group, with and without its prefix cache
    assert env["measured"], env.get("reason")
    assert env["rows_per_question"] == [1] and env["group_forwards_needed"] == 2 + 4 + 8  # a branch-2 tree, 3 groups
    for name in ("cached", "uncached"):
        assert env[name]["group_forwards_per_s"] > 0 and env[name]["seconds"] > 0
    # The cache runs each needed transition once; without it shared prefixes are recomputed.
    assert env["cached"]["group_forwards_run"] == env["group_forwards_needed"] < env["uncached"]["group_forwards_run"]
    assert env["ratio_cached_over_uncached"] > 0 and env["max_abs_outcome_diff"] < 1e-4
