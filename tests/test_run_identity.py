"""A run is exactly what its settings say (issue 22): no silent reuse, no silent resume, no silent no-op.

Each test is one finding of that review and fails on the code before it.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from routing_env import pipeline

from routing_env.studies import compare

from routing_env.training import finetune
from routing_env.common.identity import run_differences, settings_tag
from routing_env.moe import load_checkpoint
from routing_env.moe import model_fingerprint
from routing_env.common.safefiles import RunLock, RunLockedError
from routing_env.training.supervision import TargetTable
from routing_env.targets import RoutingTargets, TargetsError

ROOT = Path(__file__).resolve().parents[1]


def _ft(tmp_path, data_dir, **kw) -> finetune.Config:
    base = dict(task="arc-easy", method="lora-moe", epochs=1, train_limit=16, eval_limit=8, batch_size=8,
                data_dir=str(data_dir), logdir=str(tmp_path), name="run")
    return finetune.Config(**(base | kw))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir) -> tuple[Path, dict]:
    """A finished 2-epoch lora-moe run (16 questions): its folder and results."""
    logdir = tmp_path_factory.mktemp("identity")
    res = finetune.main(_ft(logdir, data_dir, epochs=2))
    return logdir, res


# ---- 1. a run's identity is its settings -----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("change", [{"lr": 5e-4}, {"batch_size": 4}, {"epochs": 3}, {"rank": 4}, {"seed": 1},
                                    {"train_limit": 12}, {"balance": "loss-free"}])
def test_rerun_with_other_settings_is_refused_and_the_run_is_untouched(finished_run, data_dir, change):
    logdir, res = finished_run
    run = logdir / "run"
    before = {p: p.read_bytes() for p in (run / "results.json", run / "config.json",
                                          run / "checkpoints" / "epoch_2" / "adapter.safetensors")}
    key = next(iter(change))
    with pytest.raises(ValueError, match=rf"was made with other settings \({key}: .* there, .* here\)"):
        finetune.main(_ft(logdir, data_dir, **({"epochs": 2} | change)))
    assert {p: p.read_bytes() for p in before} == before  # nothing retrained, nothing rewritten


@pytest.mark.slow
def test_rerun_with_the_same_settings_still_resumes(finished_run, data_dir):
    logdir, res = finished_run
    again = finetune.main(_ft(logdir, data_dir, epochs=2, device="cpu", log_every=5))  # place settings may differ
    assert again["history"] == res["history"] and again["test"]["accuracy"] == res["test"]["accuracy"]


def test_run_differences_treats_older_records_missing_a_field_as_its_default():
    cfg = finetune.Config(lr=2e-3)
    stored = {k: v for k, v in finetune.Config().__dict__.items() if k != "backbone_dropout"}
    assert run_differences(cfg, stored) == ["lr: 0.001 there, 0.002 here"]


# ---- 3. no silent no-op ----------------------------------------------------------------------------

@pytest.mark.slow
def test_stage3_with_nothing_left_to_train_is_refused_before_any_work(finished_run, tmp_path, data_dir):
    """Before: "continuing the run ... (paired design)", 0 steps, exit 0, the lora-moe model reported as layermoe."""
    logdir, _ = finished_run
    targets = tmp_path / "t.jsonl"
    targets.write_text("{}\n")
    with pytest.raises(ValueError, match="is after epoch 2 of the run, and --epochs is 2: stage 3 would have nothing"):
        finetune.main(_ft(tmp_path, data_dir, method="layermoe", epochs=2, targets=str(targets),
                          init_checkpoint=str(logdir / "run" / "checkpoints" / "epoch_2")))
    assert not (tmp_path / "run").exists()


def test_missing_init_checkpoint_is_refused_before_the_run_folder(tmp_path, data_dir):
    targets = tmp_path / "t.jsonl"
    targets.write_text("{}\n")
    with pytest.raises(ValueError, match="--init-checkpoint .*nope is not a checkpoint folder"):
        finetune.main(_ft(tmp_path, data_dir, method="layermoe", targets=str(targets),
                          init_checkpoint=str(tmp_path / "nope")))
    assert not (tmp_path / "run").exists()


def _targets_file(path: Path, checkpoint: Path, split: str, ids: list[str], values: bool) -> Path:
    model = load_checkpoint(checkpoint)
    G, E = model.moe_config.num_groups, 4
    header = {"format": "routing-targets", "version": 1, "env_id": "layermoe-arc", "task": "arc-easy", "split": split,
              "fingerprint": model_fingerprint(model), "num_groups": G, "num_experts": E, "num_actions": E,
              "action_mode": "primary", "agent": "exhaustive" if values else "router", "agent_config": {}}
    rng = np.random.default_rng(0)
    lines = [json.dumps(header)]
    for i in ids:
        t = rng.dirichlet(np.ones(E), size=G)
        lines.append(json.dumps({"id": i, "targets": t.tolist(), "path": t.argmax(1).tolist(),
                                 "values": (rng.normal(size=(G, E)).tolist() if values else [[None] * E] * G)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_targets_of_another_split_are_refused(tmp_path, data_dir, warm_checkpoint):
    from routing_env.data import load_task

    dev_ids = [e.id for e in load_task("arc-easy", "dev", data_dir)[:8]]
    path = _targets_file(tmp_path / "dev.jsonl", warm_checkpoint, "dev", dev_ids, values=True)
    with pytest.raises(TargetsError, match=r"dev.jsonl:1: the targets were searched on the 'dev' split"):
        finetune.main(_ft(tmp_path, data_dir, method="layermoe", init_checkpoint=str(warm_checkpoint), targets=str(path)))
    # The same questions under a 'train' header: no training question has a target, also refused.
    path = _targets_file(tmp_path / "other.jsonl", warm_checkpoint, "train", dev_ids, values=True)
    with pytest.raises(TargetsError, match="none of the 16 training questions has a target"):
        finetune.main(_ft(tmp_path, data_dir, method="layermoe", init_checkpoint=str(warm_checkpoint), targets=str(path),
                          name="run2"))


def test_value_gap_weighting_without_values_is_refused():
    header = {"task": "t", "fingerprint": "f", "num_groups": 2, "num_experts": 2, "num_actions": 2,
              "action_mode": "primary", "agent": "router"}
    nan = np.full((2, 2), np.nan)
    recs = {"q": {"id": "q", "targets": np.full((2, 2), 0.5), "values": nan, "path": np.zeros(2, int)}}
    with pytest.raises(ValueError, match="value-gap needs process values, but the targets of agent 'router' have none"):
        TargetTable(RoutingTargets(header, recs), {}, weighting="value-gap")
    TargetTable(RoutingTargets(header, recs), {}, weighting="none")  # the same file, equal weights: fine


def test_the_pipeline_weighs_targets_without_values_equally():
    """Before: ``--route-weighting value-gap`` went to every agent, so the router control's routing loss
    was identically zero (every weight 0), silently."""
    cfg = pipeline.PipelineConfig(route_weighting="value-gap", target_form="softmax")
    assert pipeline._stage3_settings(cfg, "router")["route_weighting"] == "none"
    assert pipeline._stage3_settings(cfg, "router")["target_form"] == "file"
    assert pipeline._stage3_settings(cfg, "exhaustive")["route_weighting"] == "value-gap"


@pytest.mark.slow
def test_a_nonfinite_gradient_in_the_last_step_stops_the_run(tmp_path, data_dir, monkeypatch):
    """A finite loss whose gradient is infinite: before, the step made the adapters NaN and the run
    wrote results.json with NaN dev and test losses, exit 0."""

    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("inf")

    real = finetune.F.cross_entropy
    calls = {"n": 0}

    def inf_grad_on_last_step(logits, labels, **kw):
        calls["n"] += 1
        return real(InfGrad.apply(logits) if calls["n"] == 2 else logits, labels, **kw)
    monkeypatch.setattr(finetune.F, "cross_entropy", inf_grad_on_last_step)
    with pytest.raises(finetune.NonFiniteLoss, match="non-finite loss at step 2 .*'grad_norm': (inf|nan)"):
        finetune.main(_ft(tmp_path, data_dir))  # 16 questions, batch 8: step 2 is the last
    assert not (tmp_path / "run" / "results.json").exists()
    saved = load_file(tmp_path / "run" / "nonfinite" / "adapter.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


# ---- 2. records never reused across settings, tables never silently replaced ----------------------

def test_a_small_budget_pipeline_neither_reuses_nor_replaces_the_full_size_results(tmp_path, data_dir):
    """From the repository root, a 32-question run used to print the committed full-size lora-s0
    record (51.94%) under its own budget line and overwrite ``results/arc-easy.md``."""
    cfg = pipeline.PipelineConfig(task="arc-easy", methods=["lora"], seeds=[0], epochs=2, train_limit=32, eval_limit=16,
                                  data_dir=str(data_dir), logdir=str(tmp_path / "runs"), results_dir=str(ROOT / "results"))
    folder = pipeline.task_folder(cfg)
    assert folder.startswith("arc-easy-") and folder != "arc-easy"
    assert (ROOT / "results" / "runs" / "arc-easy" / "lora-s0.json").is_file()  # the committed full-size record
    assert not (ROOT / "results" / "runs" / folder).exists()  # ... is not where this budget looks
    assert pipeline.table_name(cfg) != "arc-easy"
    # The committed record itself, offered under the small budget's name, is refused with the differences.
    rec = json.loads((ROOT / "results" / "runs" / "arc-easy" / "lora-s0.json").read_text())
    with pytest.raises(ValueError, match=r"other settings \(train_limit: None there, 32 here; eval_limit: None there, "
                                         r"16 here\)"):
        pipeline._reusable(rec, pipeline._finetune_config(cfg, tmp_path, "lora-s0", 0, method="lora", epochs=2),
                           Path("lora-s0.json"))


def test_table_only_with_no_matching_records_says_so(tmp_path):
    cfg = pipeline.PipelineConfig(task="arc-easy", methods=["lora"], seeds=[0], train_limit=32, table_only=True,
                                  logdir=str(tmp_path / "runs"), results_dir=str(tmp_path / "results"))
    with pytest.raises(ValueError, match="--table-only: no finished stage matches these settings"):
        pipeline.main(cfg)
    assert not (tmp_path / "results").exists()


def test_a_table_is_never_replaced_by_a_subset_of_itself(tmp_path):
    """``compare --methods aux --table-only`` used to replace the eleven-strategy table with one row."""
    cfg = compare.CompareConfig(task="arc-easy", methods=["aux"], seeds=[0, 1], train_limit=300, eval_limit=500,
                                table_only=True, results_dir=str(ROOT / "results" / "compare"),
                                logdir=str(tmp_path / "runs"))
    table = ROOT / "results" / "compare" / f"{compare.table_name(cfg)}.json"
    before = table.read_bytes()
    with pytest.raises(ValueError, match=r"already holds runs this table lacks \(bip s0, bip s1"):
        compare.main(cfg)
    assert table.read_bytes() == before


def test_every_budget_and_option_names_its_own_folder_and_table():
    base = pipeline.PipelineConfig()
    assert pipeline.task_folder(base) == "arc-easy" and pipeline.table_name(base) == "arc-easy"
    for change in ({"epochs": 3}, {"train_limit": 10}, {"eval_limit": 10}, {"balance": "bip"}, {"num_experts": [8]},
                   {"backbone": "x"}, {"top_k": 1}, {"rank": 16}, {"aux_loss_coef": 0.0}, {"lr": 3e-3}):
        other = pipeline.PipelineConfig(**change)
        assert pipeline.task_folder(other) != "arc-easy" and pipeline.table_name(other) != "arc-easy", change
        ft = pipeline._finetune_config(other, Path("r"), "lora-moe-s0", 0, method="lora-moe", epochs=other.epochs)
        assert all(getattr(ft, k) == v for k, v in change.items()), change  # and the runs get them
    for change in ({"warmup_epochs": 2, "epochs": 3}, {"search_batch_size": 4}, {"beta": 0.5}):
        assert settings_tag(pipeline.PipelineConfig(**change), pipeline.SEARCH_FIELDS + pipeline.STAGE3_FIELDS), change


# ---- 6. validate before any work -------------------------------------------------------------------

@pytest.mark.parametrize("kw, needle", [
    ({"methods": ["lora-moe", "layermoe-mtcs"]}, "unknown agent 'mtcs'"),
    ({"agent_kwargs": "{c_puct: 2}"}, "--agent-kwargs is not valid JSON"),
    ({"num_simulations": 0}, "--num-simulations must be at least 1"),
    ({"search_batch_size": 0}, "--search-batch-size must be at least 1"),
    ({"balance_weight": float("nan")}, "--balance-weight must be a finite number"),
    ({"target_form": "hard"}, "--target-form 'hard' is not one of file, onehot, softmax"),
])
def test_pipeline_validates_every_stage_before_the_first_one_trains(tmp_path, data_dir, monkeypatch, kw, needle):
    monkeypatch.setattr(finetune, "main", lambda cfg: pytest.fail("a stage ran before the bad setting was refused"))
    cfg = pipeline.PipelineConfig(**({"methods": ["lora-moe", "layermoe-mcts"], "seeds": [0], "data_dir": str(data_dir),
                                      "logdir": str(tmp_path), "results_dir": str(tmp_path / "r")} | kw))
    with pytest.raises(ValueError, match=needle):
        pipeline.main(cfg)


def test_run_names_stay_inside_the_logdir(tmp_path, data_dir):
    for name in ("../../x", str(tmp_path / "abs"), "a/b", ".."):
        with pytest.raises(ValueError, match="is not a plain run name"):
            finetune.main(_ft(tmp_path / "logs", data_dir, name=name))
    assert not (tmp_path / "logs").exists() and not (tmp_path / "abs").exists()
    from routing_env.search import run as search
    with pytest.raises(ValueError, match="is not a plain run name"):
        search.main(search.Config(name="../../x", logdir=str(tmp_path / "logs"), data_dir=str(data_dir)))
    assert not (tmp_path / "logs").exists() and not (tmp_path.parent / "x").exists()


# ---- 5. one writer, for sure -----------------------------------------------------------------------

_CONTENDERS = """
import multiprocessing as mp, sys
from routing_env.common.safefiles import RunLock, RunLockedError

def contender(folder, start, attempted, results):
    start.wait()  # every process tries at the same moment
    try:
        with RunLock(folder):
            attempted.wait()  # hold the lock until every contender has tried
            results.put("held")
    except RunLockedError:
        attempted.wait()
        results.put("refused")

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    for trial in range(int(sys.argv[2])):
        n = 2 + trial % 5
        start, attempted, results = ctx.Barrier(n), ctx.Barrier(n), ctx.Queue()
        folder = f"{sys.argv[1]}/run{trial % 4}"  # stale lock files of earlier trials must not matter
        procs = [ctx.Process(target=contender, args=(folder, start, attempted, results)) for _ in range(n)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=120) for _ in range(n)]
        for p in procs:
            p.join(60)
        print(trial, n, outcomes.count("held"))
"""


def test_the_run_lock_cannot_be_held_twice(tmp_path):
    """Before: a create-then-write-pid lock let two of several processes started together both hold it
    (2 of 30 trials with 2 processes). No timing here: barriers make every process try at once and
    hold until all have tried. In a fresh interpreter that imports only the lock, so forks are cheap."""
    script = tmp_path / "contenders.py"
    script.write_text(_CONTENDERS)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), "100"], capture_output=True, text=True,
                          timeout=600, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert len(rows) == 100 and all(held == "1" for _, _, held in rows), [r for r in rows if r[2] != "1"]


def test_a_killed_holders_lock_is_taken_over(tmp_path):
    ctx = mp.get_context("fork")
    ready = ctx.Event()

    def hold() -> None:
        with RunLock(tmp_path):
            ready.set()
            import time

            time.sleep(600)
    holder = ctx.Process(target=hold)
    holder.start()
    ready.wait(120)
    try:
        with pytest.raises(RunLockedError, match=f"in use by process {holder.pid}"):
            with RunLock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.join()
    assert (tmp_path / ".lock").exists()  # kill -9 left the file behind ...
    with RunLock(tmp_path):  # ... but not the lock: it is taken over
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
    assert not (tmp_path / ".lock").exists()


def test_no_absolute_paths_in_committed_results():
    """Results are read on other machines: a path of the machine that made them means nothing there."""
    import re

    bad = []
    for path in (ROOT / "results").rglob("*"):
        if path.suffix in (".json", ".md") and path.is_file():
            for m in re.finditer(r"""(?:^|[\s"'`=(])(/(?:work|root|home|tmp|Users|mnt)/[^\s"'`,)]*)""", path.read_text()):
                bad.append(f"{path.relative_to(ROOT)}: {m.group(1)}")
    assert not bad, bad[:10]
