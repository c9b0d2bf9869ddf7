"""The one-command pipeline: every stage runs once, finished stages are skipped, a lost one resumes."""

from __future__ import annotations

import json

import pytest

from routing_env.training import finetune
from routing_env.search import run as train_rl
from routing_env import pipeline


@pytest.mark.slow
def test_pipeline_runs_skips_and_resumes(data_dir, tmp_path, monkeypatch):
    calls: list[str] = []
    real_ft, real_rl = finetune.main, train_rl.main
    monkeypatch.setattr(finetune, "main", lambda cfg: calls.append(cfg.name) or real_ft(cfg))
    monkeypatch.setattr(train_rl, "main", lambda cfg: calls.append(cfg.name) or real_rl(cfg))
    cfg = pipeline.PipelineConfig(task="arc-easy", methods=["lora", "lora-moe", "layermoe-mcts"], seeds=[0], epochs=2,
                                  warmup_epochs=1, train_limit=16, eval_limit=8, search_examples=4, num_simulations=2,
                                  data_dir=str(data_dir), device="cpu", logdir=str(tmp_path / "runs"),
                                  results_dir=str(tmp_path / "results"))
    table = pipeline.main(cfg)
    # A tiny search budget is a non-default setting: its runs carry the settings' tag.
    s_tag = pipeline.settings_tag(cfg, pipeline.SEARCH_FIELDS)
    tag = pipeline.settings_tag(cfg, pipeline.SEARCH_FIELDS + pipeline.STAGE3_FIELDS)
    # ... and a tiny budget its own task folder and table: they never meet the full-size ones.
    folder, table_name = pipeline.task_folder(cfg), pipeline.table_name(cfg)
    assert folder.startswith("arc-easy-") and table_name.startswith("arc-easy-") and table_name != folder
    assert calls == ["lora-s0", "lora-moe-s0", f"search-mcts{s_tag}-s0", f"layermoe-mcts{tag}-s0"]
    md = (tmp_path / "results" / f"{table_name}.md").read_text()
    assert "| layermoe-mcts | 1 |" in md and "| lora | 1 |" in md and "n/a" in md  # lora has no experts
    assert "Made by `python" in md and "at commit" in md  # where the table came from, with its settings above
    # The routing-structure gate ran on the warm-up before the search; 8 dev questions cannot pass it.
    assert "routing-structure gate on the warm-up s0: router - random" in md and "NO structure to learn" in md
    row = table["layermoe-mcts"]  # paired with the same seed's lora-moe run
    assert row["paired_diff"]["accuracy"]["mean"] == pytest.approx(row["accuracy"]["mean"] - table["lora-moe"]["accuracy"]["mean"])
    # ... and tested within the seed, on both arms' per-question test records (joined on question id)
    paired = row["paired_test"]
    assert [(t["seed"], t["n"]) for t in paired["per_seed"]] == [(0, 8)] and 0 <= paired["per_seed"][0]["p"] <= 1
    assert paired["bootstrap"]["mean"] == pytest.approx(row["paired_diff"]["accuracy"]["mean"])
    cells = [c.strip() for c in next(r for r in md.splitlines() if r.startswith("| layermoe-mcts |")).split("|")[1:-1]]
    assert cells[4].startswith("s0 ") and "[" in cells[5] and "n/a" not in cells[4] + cells[5]
    assert "- layermoe-mcts: within a seed " in md and "across the seeds n/a (1 seed)" in md
    assert (tmp_path / "results" / f"{table_name}_accuracy_vs_balance.png").is_file()
    saved = json.loads((tmp_path / "results" / f"{table_name}.json").read_text())
    assert saved["methods"]["layermoe-mcts"]["accuracy"]["mean"] == table["layermoe-mcts"]["accuracy"]["mean"]
    assert set(saved["methods"]["layermoe-mcts"]["seconds"]) == {"warm-up", "search", "stage 3"}
    # --table-only runs nothing: seed 1 has not run, so it is listed as missing and left out.
    calls.clear()
    partial = pipeline.main(pipeline.PipelineConfig(**{**cfg.__dict__, "seeds": [0, 1], "table_only": True}))
    assert calls == [] and partial["layermoe-mcts"]["seeds"] == [0] and partial["lora"]["seeds"] == [0]
    assert "lora s1, lora-moe s1, layermoe-mcts s1" in (tmp_path / "results" / f"{table_name}.md").read_text()
    stage3 = json.loads((tmp_path / "runs" / folder / f"layermoe-mcts{tag}-s0" / "results.json").read_text())
    assert stage3["config"]["init_checkpoint"].endswith("lora-moe-s0/checkpoints/epoch_1")
    assert stage3["targets_coverage"] == 0.25 and [h["epoch"] for h in stage3["history"]] == [1, 2]
    # per-question evidence: every test question, and dev of the last epoch only
    assert len(stage3["test"]["questions"]["ids"]) == 8 and len(stage3["test"]["questions"]["logp"]) == 8
    assert "questions" not in stage3["history"][0]["dev"] and len(stage3["history"][1]["dev"]["questions"]["pred"]) == 8

    # Everything finished: nothing runs again, the same table comes out.
    calls.clear()
    assert pipeline.main(cfg) == table and calls == []

    # A lost final result: only that stage runs, resuming from its last epoch checkpoint (no retraining).
    (tmp_path / "runs" / folder / f"layermoe-mcts{tag}-s0" / "results.json").unlink()
    (tmp_path / "results" / "runs" / folder / f"layermoe-mcts{tag}-s0.json").unlink()  # and its committed record
    calls.clear()
    again = pipeline.main(cfg)
    assert calls == [f"layermoe-mcts{tag}-s0"]
    assert again["layermoe-mcts"]["accuracy"]["mean"] == table["layermoe-mcts"]["accuracy"]["mean"]

    # Another machine: only the committed records (results/runs). Nothing reruns, same table.
    import shutil

    shutil.rmtree(tmp_path / "runs")
    records = tmp_path / "results" / "runs" / folder
    assert {p.stem for p in records.glob("*.json")} == {"lora-s0", "lora-moe-s0", "gate-s0", f"search-mcts{s_tag}-s0",
                                                         f"layermoe-mcts{tag}-s0"}
    calls.clear()
    assert pipeline.main(cfg) == again and calls == []
    # ... and with a stage 3 still to run there, the seed's chain is recomputed (the lora-moe run it
    # continues must be the one it is compared with), the plain LoRA run is not.
    (records / f"layermoe-mcts{tag}-s0.json").unlink()
    calls.clear()
    pipeline.main(cfg)
    assert calls == ["lora-moe-s0", f"search-mcts{s_tag}-s0", f"layermoe-mcts{tag}-s0"]


def test_pipeline_bad_config(tmp_path):
    with pytest.raises(ValueError, match="warmup_epochs must be between 1 and epochs - 1"):
        pipeline.main(pipeline.PipelineConfig(epochs=2, warmup_epochs=2, logdir=str(tmp_path)))
    with pytest.raises(ValueError, match="unknown method 'moe'; valid: lora, lora-moe, layermoe-<agent>"):
        pipeline.main(pipeline.PipelineConfig(methods=["moe"], logdir=str(tmp_path)))


def test_other_stage_settings_get_their_own_run_folders():
    base = pipeline.PipelineConfig()
    assert pipeline.settings_tag(base, pipeline.STAGE3_FIELDS) == ""
    tagged = pipeline.PipelineConfig(beta=0.3)
    tag = pipeline.settings_tag(tagged, pipeline.STAGE3_FIELDS)
    assert tag.startswith("-") and len(tag) == 9 and pipeline.settings_tag(tagged, pipeline.SEARCH_FIELDS) == ""
    assert pipeline.settings_tag(pipeline.PipelineConfig(beta=3.0), pipeline.STAGE3_FIELDS) != tag
