"""The benchmarks that guard issue 13's goals run in CI: the op-count proxy, and the GPU script's dry mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, tmp_path: Path, data_dir: Path) -> dict:
    out = tmp_path / "out.json"
    env = os.environ | {"ROUTING_ENV_DATA": str(data_dir), "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, "--out", str(out)], check=True, cwd=ROOT,
                   env=env, capture_output=True, timeout=600)
    return json.loads(out.read_text())


def test_eval_batch_ops_within_goal_of_peft_lora_and_no_sync(tmp_path, data_dir):
    # Op counts do not depend on the batch size, so 4 questions measure what 64 would.
    res = _run("ops.py", "--questions", "4", tmp_path=tmp_path, data_dir=data_dir)
    assert res["methods"]["lora-moe"]["sync_ops"] == {}
    assert max(res["ratio_lora_moe_over_lora"].values()) <= 1.5, res["ratio_lora_moe_over_lora"]
    assert res["met"]


@pytest.mark.slow
def test_gpu_benchmark_dry_mode_runs_every_part(tmp_path, data_dir):
    res = _run("gpu.py", "--dry", tmp_path=tmp_path, data_dir=data_dir)
    assert res["dry"] and not res["skipped"] and res["copy_bandwidth_GBps"] > 0
    for kernels in (res["kernels_bf16"], res["kernels_fp32"]):
        row = kernels[0]
        assert {"triton", "reference", "loop", "dense", "compile_dense"} <= row.keys()
        assert all(row[m]["fwd_us"] > 0 and row[m]["fwd_bwd_us"] > 0 for m in ("triton", "reference", "loop"))
    for label in ("fp32", "bf16", "bf16_grouped_rank32_kernel_on", "bf16_grouped_rank32_kernel_off"):
        row = res["minilm"][label]
        assert row["eval_sequences_per_s"] > 0 and row["train_sequences_per_s"] > 0
        assert row["search_mcts_questions_per_s"] > 0 and row["search_exhaustive_questions_per_s"] > 0
