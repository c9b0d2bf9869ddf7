"""Nothing wrong reported as success: bad input refused early, crashes and NaN survived.

Each test is one finding of the trust review (issue 12): it fails on the code before that review.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from routing_env.training import finetune
from routing_env.search import run as train_rl
from routing_env import pipeline
from routing_env.data import DataError
from routing_env.common.safefiles import atomic_write_text, is_complete
from routing_env.targets import TargetsError, TargetsWriter, load_targets

ROOT = Path(__file__).resolve().parents[1]


def _ft(tmp_path, data_dir, **kw) -> finetune.Config:
    base = dict(task="arc-easy", method="lora-moe", epochs=1, train_limit=16, eval_limit=8, batch_size=8,
                data_dir=str(data_dir), logdir=str(tmp_path), name="run")
    return finetune.Config(**(base | kw))


@pytest.fixture()
def no_model(monkeypatch):
    """Any attempt to build or load a model fails the test: bad input must be refused before."""
    def boom(*a, **k):
        raise AssertionError("a model was built before the bad input was refused")
    for name in ("build_model", "load_checkpoint"):
        monkeypatch.setattr(finetune, name, boom)
    monkeypatch.setattr("routing_env.env.model.load_checkpoint", boom)
    monkeypatch.setattr("routing_env.training.warmup.default_checkpoint", boom)


# ---- bad settings: refused before any model or run folder ------------------------------------------

@pytest.mark.parametrize("kw, needle", [
    ({"epochs": 0}, "--epochs must be at least 1"),
    ({"epochs": -1}, "--epochs must be at least 1"),
    ({"batch_size": 0}, "--batch-size must be at least 1"),
    ({"train_limit": 0}, "--train-limit must be at least 1"),
    ({"lr": float("nan")}, "--lr must be a positive number"),
    ({"method": "layermoe"}, "needs --init-checkpoint"),
    ({"train_file": "x.jsonl"}, "--dev-file, --test-file"),
])
def test_finetune_refuses_bad_settings_before_anything(tmp_path, data_dir, no_model, kw, needle):
    with pytest.raises(ValueError, match=needle):
        finetune.main(_ft(tmp_path, data_dir, **kw))
    assert not (tmp_path / "run").exists()


def test_finetune_refuses_an_empty_task_file(tmp_path, data_dir, no_model):
    empty = tmp_path / "mine.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="mine.jsonl: the file is empty"):
        finetune.main(_ft(tmp_path, data_dir, task=str(empty)))


@pytest.mark.parametrize("kw, needle", [
    ({"agent": "mtcs"}, "unknown agent 'mtcs'; valid: exhaustive, known-route, mcts"),
    ({"num_examples": 0}, "--num-examples must be at least 1"),
    ({"agent_kwargs": "{c_puct: 2}"}, "--agent-kwargs is not valid JSON"),
    ({"device": "cuda:0"} if not torch.cuda.is_available() else {"device": "tpu"}, "device"),
    ({"env": "layermoe-arcc"}, "unknown env 'layermoe-arcc'; registered: layermoe-arc"),
    ({"task": "nope/missing.jsonl"}, "unknown task 'nope/missing.jsonl'"),
])
def test_train_rl_refuses_bad_settings_before_the_model(tmp_path, data_dir, no_model, kw, needle):
    # No checkpoint: without the early checks a typo would first train the demo warm-up.
    cfg = train_rl.Config(data_dir=str(data_dir), logdir=str(tmp_path), name="run", **kw)
    with pytest.raises((ValueError, RuntimeError), match=needle):
        train_rl.main(cfg)
    assert not (tmp_path / "run").exists()


def test_pipeline_refuses_unknown_task_before_running(tmp_path, no_model):
    with pytest.raises(DataError, match="unknown task 'arc-medium'"):
        pipeline.main(pipeline.PipelineConfig(task="arc-medium", logdir=str(tmp_path)))


@pytest.mark.parametrize("script, args, needle", [
    ("finetune.py", ["--epochs", "0"], "error: --epochs must be at least 1"),
    ("train_rl.py", ["--agent-kwargs", "{oops"], "error: --agent-kwargs is not valid JSON"),
])
def test_cli_user_errors_are_one_line_not_a_traceback(tmp_path, script, args, needle):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ROUTING_GYM_TRACEBACK", None)
    proc = subprocess.run([sys.executable, str(ROOT / script), *args, "--logdir", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# ---- NaN: stopped, state saved, exit non-zero ------------------------------------------------------

def test_targets_with_infinite_values_are_refused(tmp_path):
    header = {"format": "routing-targets", "version": 1, "task": "t", "fingerprint": "f", "num_groups": 1,
              "num_experts": 2, "num_actions": 2, "action_mode": "primary"}
    rec = {"id": "q", "targets": [[0.5, 0.5]], "values": [[1.0, "Infinity"]], "path": [0]}
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(header) + "\n" + json.dumps(rec).replace('"Infinity"', "Infinity") + "\n")
    with pytest.raises(TargetsError, match=r"t.jsonl:2: values of example 'q' .*infinite"):
        load_targets(path)


def test_non_finite_loss_stops_the_run_with_its_state(tmp_path, data_dir, monkeypatch):
    real = finetune.F.cross_entropy
    calls = {"n": 0}

    def nan_on_second_step(logits, labels):
        calls["n"] += 1
        loss = real(logits, labels)
        return loss * float("nan") if calls["n"] == 2 else loss
    monkeypatch.setattr(finetune.F, "cross_entropy", nan_on_second_step)
    with pytest.raises(finetune.NonFiniteLoss, match="non-finite loss at step 2") as info:
        finetune.main(_ft(tmp_path, data_dir))
    saved = tmp_path / "run" / "nonfinite"
    report = json.loads((saved / "nonfinite.json").read_text())
    assert report["step"] == 2 and len(report["example_ids"]) == 8 and report["example_ids"][0] in str(info.value)
    assert all(torch.isfinite(t).all() for t in load_file(saved / "adapter.safetensors").values())
    assert not (tmp_path / "run" / "results.json").exists()  # no result claimed


# ---- crashes: atomic files, damaged checkpoints, one writer per folder -----------------------------

def test_atomic_write_keeps_the_old_file_when_the_writer_dies(tmp_path):
    path = atomic_write_text(tmp_path / "results.json", "old")

    def dies(tmp: Path) -> None:
        tmp.write_text("half")
        raise KeyboardInterrupt
    from routing_env.common.safefiles import atomic_write
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dies)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


@pytest.mark.slow
def test_resume_skips_a_damaged_epoch_and_matches_the_uninterrupted_run(tmp_path, data_dir):
    full = finetune.main(_ft(tmp_path, data_dir, epochs=2, name="full"))
    finetune.main(_ft(tmp_path, data_dir, epochs=2, name="crashed"))
    run = tmp_path / "crashed"
    ckpt = run / "checkpoints" / "epoch_2"
    assert is_complete(ckpt)
    data = (ckpt / "adapter.safetensors").read_bytes()
    (ckpt / "adapter.safetensors").write_bytes(data[: len(data) // 2])  # a copy cut short (old writers, disks)
    (run / "results.json").unlink()
    again = finetune.main(_ft(tmp_path, data_dir, epochs=2, name="crashed", resume=True))
    assert [h["epoch"] for h in again["history"]] == [1, 2]
    assert again["test"]["loss"] == full["test"]["loss"]  # epoch 2 retrained from epoch 1: same ops, same numbers
    a, b = load_file(tmp_path / "full" / "final" / "adapter.safetensors"), load_file(run / "final" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_targets_file_with_two_records_for_one_example_is_refused(tmp_path):
    header = {"task": "t", "fingerprint": "f", "num_groups": 1, "num_experts": 2, "num_actions": 2,
              "action_mode": "primary"}
    rec = {"id": "q", "targets": np.array([[0.5, 0.5]]), "values": np.array([[0.1, 0.2]]), "path": [1]}
    w = TargetsWriter(tmp_path / "t.jsonl", header)
    w.write([rec])
    w.write([rec])  # what two processes appending to one file produce
    with pytest.raises(TargetsError, match=r"t.jsonl:3: example 'q' already has a record \(line 2\)"):
        load_targets(tmp_path / "t.jsonl")


# ---- own data through all three stages -------------------------------------------------------------

@pytest.mark.slow
def test_own_task_folder_through_all_three_stages(tmp_path, data_dir):
    """A folder of the user's files: warm-up, search and stage 3 all name it by its content identity."""
    from routing_env.data import load_file, resolve_task

    task = tmp_path / "my_task"
    task.mkdir()
    for split, n in (("train", 12), ("dev", 6), ("test", 6)):
        src = data_dir / "arc" / f"arc-easy-{split}.jsonl.gz"
        rows = [json.loads(line) for line in __import__("gzip").open(src, "rt")][:n]
        (task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ident = resolve_task(str(task)).name
    assert ident.startswith("my_task-") and len(load_file(task / "test.jsonl")) == 6
    base = finetune.main(finetune.Config(task=str(task), epochs=2, batch_size=4, logdir=str(tmp_path / "runs")))
    assert base["name"] == f"{ident}-lora-moe-s0" and base["task"] == ident and base["test"]["n"] == 6
    warm = tmp_path / "runs" / base["name"] / "checkpoints" / "epoch_1"
    search = train_rl.main(train_rl.Config(task=str(task), agent="router", checkpoint=str(warm), num_examples=100,
                                           logdir=str(tmp_path / "runs")))
    lines = Path(search["targets"]).read_text().splitlines()
    assert search["name"] == f"{ident}-router-s0" and len(lines) == 1 + 12
    assert json.loads(lines[0])["task"] == ident  # the content identity, not a file stem
    stage3 = finetune.main(finetune.Config(task=str(task), method="layermoe", epochs=2, batch_size=4,
                                           init_checkpoint=str(warm), targets=search["targets"],
                                           logdir=str(tmp_path / "runs")))
    assert stage3["targets_coverage"] == 1.0 and stage3["test"]["n"] == 6
