"""The one-command pipeline: every stage runs once, finished stages are skipped, a lost one resumes."""

from __future__ import annotations

import json
from pathlib import Path

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


# ---- settings groups: the run names follow the groups, and today's names stay -----------------------

def test_stage_tags_are_the_groups_fields_and_the_same_names_as_before():
    from routing_env.common.configs import (DataLimits, LayerGroups, MoEShape, PipelineSearch, Schedule,
                                            SearchSettings, Stage3Settings, field_names)
    assert pipeline.STAGE3_FIELDS == field_names(Stage3Settings)
    assert pipeline.SEARCH_FIELDS == field_names(PipelineSearch) and set(field_names(SearchSettings)) < set(pipeline.SEARCH_FIELDS)
    assert pipeline.BUDGET_FIELDS == field_names(DataLimits, Schedule, MoEShape, LayerGroups)
    # the very names of the tuples the pipeline listed by hand before (committed results are found by them),
    # and the layer groups, a budget setting since decoders came (default: not in any tag, so no name changed)
    assert sorted(pipeline.BUDGET_FIELDS) == sorted(("epochs", "backbone", "balance", "num_experts", "top_k", "rank",
                                                     "aux_loss_coef", "lr", "train_limit", "eval_limit",
                                                     "num_groups", "group_sizes"))
    grouped = pipeline.PipelineConfig(group_sizes=[6, 5, 5])
    assert pipeline.task_folder(grouped) != "arc-easy"  # another model: its own folder, never the default's
    assert pipeline._finetune_config(grouped, Path("x"), "lora-moe-s0", 0, method="lora-moe").group_sizes == [6, 5, 5]
    assert sorted(pipeline.SEARCH_FIELDS) == sorted(("search_examples", "num_simulations", "agent_kwargs",
                                                     "balance_weight", "warmup_epochs", "search_batch_size"))
    assert sorted(pipeline.STAGE3_FIELDS) == sorted(("beta", "route_weighting", "target_balance", "target_form",
                                                     "target_temperature", "teacher_forcing", "route_granularity",
                                                     "route_loss_grad"))


@pytest.mark.parametrize("change, folder, table, gate", [
    # (settings, task folder, table name, gate stage name), computed by the code before the settings groups
    ({}, "arc-easy", "arc-easy", "gate-s0"),
    ({"num_simulations": 16}, "arc-easy", "arc-easy-41e62a57", "gate-s0"),
    ({"beta": 3.0}, "arc-easy", "arc-easy-79ab2a46", "gate-s0"),
    ({"target_form": "softmax", "target_temperature": 0.05, "target_balance": "sinkhorn"}, "arc-easy",
     "arc-easy-c3a0a54b", "gate-s0"),
    ({"route_loss_grad": "router", "teacher_forcing": 0.5, "route_granularity": "token", "route_weighting": "value-gap"},
     "arc-easy", "arc-easy-d3fc9c19", "gate-s0"),
    ({"search_examples": 32, "agent_kwargs": '{"c_puct": 2.0}', "warmup_epochs": 1, "search_batch_size": 8},
     "arc-easy", "arc-easy-ac326513", "gate-s0"),
    ({"balance_weight": 0.0}, "arc-easy", "arc-easy-a6e61416", "gate-s0"),
    ({"epochs": 3, "train_limit": 64}, "arc-easy-5c3330df", "arc-easy-5c3330df", "gate-s0"),
    ({"num_experts": [2, 2, 4, 4, 6, 6]}, "arc-easy-e4f9fc8f", "arc-easy-e4f9fc8f", "gate-s0"),
    ({"balance": "loss-free", "lr": 2e-3}, "arc-easy-0c53cd61", "arc-easy-0c53cd61", "gate-s0"),
    ({"top_k": 1, "rank": 4, "aux_loss_coef": 0.0, "eval_limit": 20}, "arc-easy-999767f4", "arc-easy-999767f4", "gate-s0"),
    ({"gate_examples": 0}, "arc-easy", "arc-easy", "gate-aee0ec91-s0"),
    ({"device": "cpu", "logdir": "x", "seeds": [0], "methods": ["lora"]}, "arc-easy", "arc-easy", "gate-s0"),
])
def test_todays_settings_keep_their_run_names(change, folder, table, gate):
    cfg = pipeline.PipelineConfig(**change)
    assert (pipeline.task_folder(cfg), pipeline.table_name(cfg), pipeline._gate_name(cfg, 0)) == (folder, table, gate)
    stage_tag = table.removeprefix(folder) if folder == "arc-easy" else ""
    assert pipeline._run_name("layermoe-mcts", 0, pipeline._stage_tag(cfg)) == f"layermoe-mcts{stage_tag}-s0"


def test_committed_tables_keep_their_names():
    """Every committed pipeline table is found again by the settings stored under it, as is its runs folder."""
    import dataclasses

    root = Path(__file__).resolve().parents[1] / "results"
    names = {f.name for f in dataclasses.fields(pipeline.PipelineConfig)} - {"task", "train_file", "dev_file", "test_file"}
    folders, seen = set(), 0
    for path in root.rglob("*.json"):
        try:
            budget = json.loads(path.read_text()).get("budget")
        except (ValueError, AttributeError):
            continue
        if not isinstance(budget, dict) or "beta" not in budget:
            continue
        cfg = pipeline.PipelineConfig(**{k: v for k, v in budget.items() if k in names})
        tag = pipeline.settings_tag(cfg, pipeline.BUDGET_FIELDS + pipeline.SEARCH_FIELDS + pipeline.STAGE3_FIELDS)
        assert path.stem.endswith(tag), (path, tag)
        folders.add(path.stem.removesuffix(tag) + pipeline.settings_tag(cfg, pipeline.BUDGET_FIELDS))
        seen += 1
    assert seen >= 10 and "routing-control-6d91bd24-4b996727" in folders
    assert {p.name for p in (root / "runs").iterdir() if p.is_dir()} <= folders


def test_a_new_stage3_setting_names_its_own_runs_and_reaches_stage_3(monkeypatch):
    """A field added to the stage-3 group is a stage-3 setting everywhere: the run name and the table
    name change when it is set (and not when it is at its default), and stage 3 gets it."""
    from dataclasses import make_dataclass

    from routing_env.common.cli import cfg_field
    from routing_env.common.configs import FinetuneConfig, Stage3Settings, field_names

    stage3 = make_dataclass("Stage3Plus", [("route_noise", float, cfg_field(0.0, "a new stage-3 option"))],
                            bases=(Stage3Settings,))
    config = make_dataclass("PipelinePlus", [], bases=(stage3, pipeline.PipelineConfig))
    monkeypatch.setattr(pipeline, "STAGE3_FIELDS", field_names(stage3))  # as the module derives it from the group
    monkeypatch.setattr(finetune, "Config", make_dataclass("FinetunePlus", [], bases=(stage3, FinetuneConfig)))
    assert "route_noise" in pipeline.STAGE3_FIELDS
    default, noisy = config(), config(route_noise=0.5)
    assert pipeline._stage_tag(default) == "" and pipeline.table_name(default) == "arc-easy"  # today's names stay
    assert pipeline._stage_tag(config(beta=3.0)) == "-79ab2a46"
    tag = pipeline._stage_tag(noisy)
    assert tag not in ("", "-79ab2a46") and pipeline.table_name(noisy) == f"arc-easy{tag}"
    assert pipeline._run_name("layermoe-mcts", 0, tag) != pipeline._run_name("layermoe-mcts", 0, "")
    for agent in ("mcts", "router"):  # passed to stage 3 whatever the agent
        ft = pipeline._finetune_config(noisy, Path("r"), "x", 0, method="layermoe",
                                       **pipeline._stage3_settings(noisy, agent))
        assert ft.route_noise == 0.5


def test_every_stage3_and_search_setting_is_passed_on():
    from routing_env.common.configs import SearchSettings, field_names

    cfg = pipeline.PipelineConfig(beta=0.5, target_temperature=0.3, teacher_forcing=0.2, route_loss_grad="router",
                                  route_granularity="token", target_balance="sinkhorn", target_form="onehot",
                                  route_weighting="value-gap", num_simulations=5, balance_weight=0.2,
                                  agent_kwargs='{"c_puct": 2.0}')
    stage3 = pipeline._stage3_settings(cfg, "mcts")
    assert set(stage3) == set(pipeline.STAGE3_FIELDS) and all(stage3[k] == getattr(cfg, k) for k in stage3)
    ft = pipeline._finetune_config(cfg, Path("r"), "x", 0, method="layermoe", **stage3)
    assert all(getattr(ft, k) == getattr(cfg, k) for k in pipeline.STAGE3_FIELDS + pipeline.BUDGET_FIELDS)
    rl = pipeline._search_config(cfg, Path("r"), "mcts", 0, Path("c"), "s")
    assert all(getattr(rl, k) == getattr(cfg, k) for k in field_names(SearchSettings))
    assert (rl.batch_size, rl.num_examples) == (cfg.search_batch_size, 10**9)
