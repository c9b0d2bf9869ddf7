"""routing_env.studies.compare: strategies alone and with LayerMoE on top, paired, in one table; resumable."""

from __future__ import annotations

import json

import pytest

from routing_env import pipeline

from routing_env.studies import compare
from routing_env.moe import read_checkpoint_config


@pytest.mark.slow
def test_compare_runs_each_strategy_with_and_without_layermoe(data_dir, tmp_path):
    cfg = compare.CompareConfig(task="arc-easy", methods=["loss-free", "top-p"], seeds=[0], epochs=2, train_limit=12,
                                eval_limit=8, data_dir=str(data_dir), device="cpu", logdir=str(tmp_path / "runs"),
                                results_dir=str(tmp_path / "results"))
    table = compare.main(cfg)
    assert list(table) == ["loss-free", "loss-free + LayerMoE", "top-p", "top-p + LayerMoE"]
    for name in ("loss-free", "top-p"):
        # The lora-moe run really trained with the strategy, and LayerMoE continued that run.
        folder = pipeline.task_folder(compare._pipeline_config(cfg, name))  # the budget's own folder
        assert folder.startswith("arc-easy-")
        ck = tmp_path / "runs" / name / folder / "lora-moe-s0" / "checkpoints" / "epoch_1"
        assert read_checkpoint_config(ck)["moe"]["balance"] == name
        row = table[f"{name} + LayerMoE"]
        assert row["paired_diff"]["accuracy"]["mean"] == pytest.approx(row["accuracy"]["mean"] - table[name]["accuracy"]["mean"])
    out = compare.table_name(cfg)
    assert out.startswith("arc-easy-strategies-")  # not the default budget's table
    md = (tmp_path / "results" / f"{out}.md").read_text()
    assert "| loss-free + LayerMoE | 1 |" in md and "| top-p | 1 |" in md
    assert (tmp_path / "results" / f"{out}_accuracy_vs_balance.png").is_file()
    saved = json.loads((tmp_path / "results" / f"{out}.json").read_text())
    assert set(saved["methods"]) == set(table)
    again = compare.main(compare.CompareConfig(**{**cfg.__dict__, "table_only": True}))  # resumes: nothing reruns
    assert again["top-p"]["accuracy"] == table["top-p"]["accuracy"]


def test_unknown_strategy_is_refused_listing_the_valid_ones():
    with pytest.raises(ValueError, match="valid: aux, z-loss, loss-free, top-p, sinkhorn"):
        compare.strategies(["aux", "switch"])
    assert compare.strategies(["all"])[:2] == ["aux", "z-loss"]
