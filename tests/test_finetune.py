"""finetune.py end to end on the real MiniLM and ARC files, at a tiny size: outputs, resume, CLI errors."""

from __future__ import annotations

import json

import pytest

from routing_env.training import finetune
from routing_env.data import DataError
from routing_env.common.utils import parse_config


def _cfg(tmp_path, data_dir, **kw) -> finetune.Config:
    base = dict(task="arc-easy", method="lora-moe", epochs=1, train_limit=24, eval_limit=16, batch_size=8,
                data_dir=str(data_dir), logdir=str(tmp_path), name="tiny", log_every=1)
    return finetune.Config(**(base | kw))


@pytest.mark.slow
def test_finetune_writes_results_logs_heatmaps_and_resumes(tmp_path, data_dir):
    res1 = finetune.main(_cfg(tmp_path, data_dir))
    run = tmp_path / "tiny"
    assert (run / "checkpoints" / "epoch_1" / "adapter.safetensors").is_file()
    assert (run / "expert_load_dev_epoch1.png").stat().st_size > 1000
    assert (run / "expert_load_test.png").is_file()
    assert list(run.glob("events.out.tfevents.*"))
    saved = json.loads((run / "results.json").read_text())
    assert saved["test"]["n"] == 16 and 0.0 <= saved["test"]["accuracy"] <= 1.0
    assert set(saved["test"]["layers"]) == {str(i) for i in range(6)}
    for layer in saved["test"]["layers"].values():
        assert abs(sum(layer["loads"]) - 1.0) < 1e-9 and layer["cv"] >= 0.0
    assert saved["config"]["method"] == "lora-moe" and saved["wall_time_s"] > 0

    # The same command again resumes after epoch 1 (nothing left to train) instead of starting over.
    res2 = finetune.main(_cfg(tmp_path, data_dir, resume=True))
    assert res2["history"] == res1["history"] and res2["test"] == res1["test"]
    # More epochs are another run (another learning-rate schedule), not a continuation: refused.
    with pytest.raises(ValueError, match=r"other settings \(epochs: 1 there, 2 here\)"):
        finetune.main(_cfg(tmp_path, data_dir, epochs=2, resume=True))
    assert not (run / "checkpoints" / "epoch_2").exists()


def test_same_seed_same_result(tmp_path, data_dir):
    a = finetune.main(_cfg(tmp_path, data_dir, method="lora", name="a", train_limit=16, eval_limit=8))
    b = finetune.main(_cfg(tmp_path, data_dir, method="lora", name="b", train_limit=16, eval_limit=8))
    assert a["test"]["loss"] == b["test"]["loss"]


def test_unknown_task_lists_the_valid_ones(tmp_path, data_dir):
    with pytest.raises(DataError, match="arc-easy"):
        finetune.main(_cfg(tmp_path, data_dir, task="arc-medium"))


def test_cli_rejects_unknown_method_with_choices(capsys):
    with pytest.raises(SystemExit):
        parse_config(finetune.Config, ["--method", "moe"])
    err = capsys.readouterr().err
    assert "invalid choice: 'moe'" in err and "lora" in err and "lora-moe" in err  # quoting varies by Python


def test_cli_parses_lists_and_optionals():
    cfg = parse_config(finetune.Config, ["--num-experts", "2,4,6,8", "--group-sizes", "1,2,3", "--train-limit", "none",
                                         "--resume"])
    assert cfg.num_experts == [2, 4, 6, 8] and cfg.group_sizes == [1, 2, 3] and cfg.train_limit is None and cfg.resume


def test_cli_booleans_take_no_flags_and_config_files_under_flags(tmp_path, capsys):
    assert parse_config(finetune.Config, ["--no-resume"]).resume is False
    assert parse_config(finetune.Config, ["--eval-test", "false"]).eval_test is False
    (tmp_path / "c.yaml").write_text("epochs: 5\nnum_experts: [2, 4]\ntrain_limit: null\nresume: false\nlr: 0.01\n")
    cfg = parse_config(finetune.Config, ["--config", str(tmp_path / "c.yaml"), "--epochs", "3"])
    assert (cfg.epochs, cfg.num_experts, cfg.train_limit, cfg.resume, cfg.lr) == (3, [2, 4], None, False, 0.01)
    saved = tmp_path / "run"
    from routing_env.common.utils import save_config

    save_config(saved, cfg)  # what every run writes: read back, the same config
    assert parse_config(finetune.Config, ["--config", str(saved / "config.json")]) == cfg
    (tmp_path / "bad.json").write_text('{"epoch": 3}')
    with pytest.raises(SystemExit):
        parse_config(finetune.Config, ["--config", str(tmp_path / "bad.json")])
    err = capsys.readouterr().err
    assert "unknown setting(s) epoch" in err and "epochs" in err
