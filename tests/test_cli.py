"""The command lines: --help without torch, --threads, typed --config values, unwritable output folders."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from routing_env.training import finetune
from routing_env.common.utils import cfg_field, parse_config, run_cli

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers")


def _python(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ROUTING_GYM_TRACEBACK", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# ---- --help answers before torch loads --------------------------------------------------------------

@pytest.mark.parametrize("command", [["finetune.py"], ["train_rl.py"], ["-m", "routing_env.pipeline"],
                                     ["-m", "routing_env.studies.compare"]])
def test_help_imports_no_torch(command):
    # Importing torch (and transformers) is what made --help take 25-60 s on a busy machine.
    proc = _python("-X", "importtime", *command, "--help")
    assert proc.returncode == 0 and "usage:" in proc.stdout and "--threads" in proc.stdout, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert imported and not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_config_modules_import_no_torch():
    proc = _python("-c", "import sys, routing_env.common.cli, routing_env.common.configs, routing_env.search.config; "
                         f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_light_choice_lists_equal_their_sources():
    from routing_env.common import configs, utils
    from routing_env.data import task_names
    from routing_env.moe import DEFAULT_BACKBONE, METHODS
    from routing_env.moe.balancing import STRATEGIES
    assert configs.TASK_NAMES == tuple(task_names())
    assert configs.METHODS == tuple(METHODS) and configs.DEFAULT_BACKBONE == DEFAULT_BACKBONE
    assert configs.STRATEGY_NAMES == tuple(STRATEGIES)
    assert configs.PRECISIONS is utils.PRECISIONS


def test_agent_help_lists_the_registered_agents():
    # A new agent is its file plus its registry line: --help names it with no list to update elsewhere.
    proc = _python("-c", "import agents; agents.register('my-agent', 'agents.baselines:RandomAgent'); "
                         "from routing_env.search.config import SearchConfig; "
                         "print(SearchConfig.__dataclass_fields__['agent'].metadata['help'])")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(name in proc.stdout for name in ("my-agent", "mcts", "exhaustive", "known-route")), proc.stdout


def test_config_classes_keep_their_old_names():
    proc = _python("-c", "import finetune, train_rl; from routing_env import pipeline; from routing_env.common import configs; "
                         "from routing_env.search import run as search; from routing_env.search.config import SearchConfig; "
                         "from routing_env.studies import compare; "
                         "import routing_env.training.finetune as ft; "
                         "assert finetune.Config is ft.Config is configs.FinetuneConfig and finetune.main is ft.main; "
                         "assert train_rl.Config is search.Config is SearchConfig; "
                         "assert pipeline.PipelineConfig is configs.PipelineConfig; "
                         "assert compare.CompareConfig is configs.CompareConfig")
    assert proc.returncode == 0, proc.stderr[-2000:]



def test_each_setting_is_declared_once_and_the_commands_are_composed_of_the_groups():
    import dataclasses
    import re

    from routing_env.common import configs
    from routing_env.search.config import SearchConfig

    # one declaration (help text, choices) per setting: batch_size and methods mean other things per command
    declared = [n for path in ("routing_env/common/configs.py", "routing_env/search/config.py")
                for n in re.findall(r"^    (\w+): .* = cfg_field\(", (ROOT / path).read_text(), re.M)]
    twice = sorted({n for n in declared if declared.count(n) > 1})
    assert twice == ["batch_size", "methods"], twice
    commands = (configs.FinetuneConfig, SearchConfig, configs.PipelineConfig, configs.CompareConfig)
    texts: dict[str, set] = {}
    for cls in commands:
        for f in dataclasses.fields(cls):
            if f.name not in ("batch_size", "methods") and (cls, f.name) != (SearchConfig, "task"):
                texts.setdefault(f.name, set()).add(json.dumps(dict(f.metadata), sort_keys=True))
    assert {n: t for n, t in texts.items() if len(t) > 1} == {}  # shared settings read the same everywhere
    assert all(issubclass(c, configs.Stage3Settings) for c in (configs.FinetuneConfig, configs.PipelineConfig))
    assert all(issubclass(c, configs.SearchSettings) for c in (SearchConfig, configs.PipelineConfig))
    # ... each command keeps its own defaults, types and flat fields
    assert (SearchConfig().num_simulations, configs.PipelineConfig().num_simulations) == (16, 32)
    assert parse_config(configs.PipelineConfig, []).num_simulations == 32
    assert parse_config(SearchConfig, []).num_simulations == 16
    assert [c().logdir for c in commands] == ["runs", "runs", "runs/pipeline", "runs/compare"]
    assert (configs.PipelineConfig().results_dir, configs.CompareConfig().results_dir) == ("results", "results/compare")
    assert SearchConfig().task is None and configs.FinetuneConfig().task == "arc-easy"
    assert parse_config(SearchConfig, ["--task", "none"]).task is None
    assert dataclasses.asdict(configs.PipelineConfig(beta=0.5))["beta"] == 0.5  # asdict stays flat
    from routing_env.common.identity import RUN_PLACE_FIELDS
    assert set(configs.field_names(configs.Place)) <= set(RUN_PLACE_FIELDS)  # where a run runs is no part of it

# ---- --threads ---------------------------------------------------------------------------------------

_THREADS_PROBE = """
import json, sys
from dataclasses import dataclass, fields
from routing_env.common.cli import cfg_field, run_cli

@dataclass
class C:
    logdir: str = cfg_field(sys.argv[1], "out")

def main(cfg):
    seen = {"fields": [f.name for f in fields(cfg)], "torch_loaded": "torch" in sys.modules}
    if seen["torch_loaded"]:
        import torch
        seen["threads"] = torch.get_num_threads()
    print(json.dumps(seen))

run_cli(main, C, argv=sys.argv[2:])
"""


def test_threads_flag_sets_torchs_threads_and_is_no_setting(tmp_path):
    proc = _python("-c", _THREADS_PROBE, str(tmp_path), "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"fields": ["logdir"], "torch_loaded": True, "threads": 1}
    # Without the flag torch keeps its default, and the command line does not even import it.
    proc = _python("-c", _THREADS_PROBE, str(tmp_path))
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"fields": ["logdir"], "torch_loaded": False}


def test_threads_must_be_a_positive_int(tmp_path, capsys):
    for bad, needle in (("0", "must be at least 1, got 0"), ("x", "must be an int, got 'x'")):
        with pytest.raises(SystemExit) as info:
            run_cli(lambda cfg: None, _Out, argv=["--logdir", str(tmp_path), "--threads", bad])
        assert info.value.code == 2 and f"argument --threads: {needle}" in capsys.readouterr().err


# ---- typed values: flags and --config files ----------------------------------------------------------

@pytest.mark.parametrize("name, text, needle", [
    ("c.json", '{"epochs": "two"}', "setting 'epochs' must be an int, got 'two'"),
    ("c.yaml", "epochs: two\n", "setting 'epochs' must be an int, got 'two'"),
    ("c.json", '{"epochs": 2.5}', "setting 'epochs' must be an int, got 2.5"),
    ("c.json", '{"epochs": true}', "setting 'epochs' must be an int, got True"),
    ("c.json", '{"lr": "fast"}', "setting 'lr' must be a number, got 'fast'"),
    ("c.yaml", "resume: 3\n", "setting 'resume' must be true or false, got 3"),
    ("c.json", '{"num_experts": [2, "x"]}', "setting 'num_experts' must be a comma-separated list of ints, got [2, 'x']"),
    ("c.json", '{"num_experts": {"a": 1}}', "setting 'num_experts' must be a comma-separated list of ints"),
    ("c.json", '{"train_limit": "many"}', "setting 'train_limit' must be an int, or none, got 'many'"),
    ("c.json", '{"task": null}', "setting 'task' must be a string, got None"),
    ("c.json", '{"epochs": [1, 2]}', "setting 'epochs' must be an int, got [1, 2]"),
    ("c.json", '{"method": "moe"}', "setting 'method' must be one of lora, lora-moe, layermoe, got 'moe'"),
])
def test_config_file_value_of_the_wrong_type_is_one_error_line(tmp_path, capsys, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SystemExit) as info:
        parse_config(finetune.Config, ["--config", str(path)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"error: --config {path}: {needle}" in err and "Traceback" not in err, err


def test_config_file_values_of_every_kind(tmp_path):
    (tmp_path / "c.yaml").write_text("train_limit: null\nnum_experts: 4\ngroup_sizes: [1, 2]\ntarget_modules: query,value\n"
                                     "resume: no\neval_test: 'false'\nlr: 1\nname: 7\nbackbone_dropout: none\n")
    cfg = parse_config(finetune.Config, ["--config", str(tmp_path / "c.yaml")])
    assert (cfg.train_limit, cfg.num_experts, cfg.group_sizes, cfg.target_modules) == (None, [4], [1, 2], ["query", "value"])
    assert (cfg.resume, cfg.eval_test, cfg.lr, cfg.name, cfg.backbone_dropout) == (False, False, 1.0, "7", None)


@pytest.mark.parametrize("args, needle", [
    (["--epochs", "two"], "argument --epochs: must be an int, got 'two'"),
    (["--train-limit", "x"], "argument --train-limit: must be an int, or none, got 'x'"),
    (["--num-experts", "2,x"], "argument --num-experts: must be a comma-separated list of ints, got '2,x'"),
    (["--resume", "maybe"], "argument --resume: must be true or false, got 'maybe'"),
])
def test_flag_of_the_wrong_type_names_flag_and_type(capsys, args, needle):
    with pytest.raises(SystemExit) as info:
        parse_config(finetune.Config, args)
    assert info.value.code == 2 and needle in capsys.readouterr().err


# ---- output folders that cannot be written --------------------------------------------------------------

@dataclass
class _Out:
    logdir: str = cfg_field("runs", "out")


@pytest.mark.parametrize("script", ["finetune.py", "train_rl.py"])
def test_unwritable_logdir_is_one_error_line_before_any_work(tmp_path, script):
    (tmp_path / "afile").write_text("")  # a folder under a file cannot be made, not even by root
    logdir = tmp_path / "afile" / "sub"
    proc = _python(script, "--logdir", str(logdir), timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0] == (f"error: cannot write to {logdir}: {tmp_path / 'afile'} is a file, not a folder; "
                        "choose another --logdir")


def test_os_error_inside_the_logdir_during_the_run_is_one_line(tmp_path, capsys):
    def main(cfg: _Out) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(Path(cfg.logdir) / "run" / "results.json"))

    with pytest.raises(SystemExit) as info:
        run_cli(main, _Out, argv=["--logdir", str(tmp_path)])
    assert info.value.code == 2
    assert capsys.readouterr().err == (f"error: cannot write to {tmp_path / 'run' / 'results.json'}: Permission denied; "
                                       "choose another --logdir\n")

    def elsewhere(cfg: _Out) -> None:  # not the output folder's: a bug or a missing input, shown in full
        raise PermissionError(errno.EACCES, "Permission denied", "/somewhere/else")

    with pytest.raises(PermissionError):
        run_cli(elsewhere, _Out, argv=["--logdir", str(tmp_path)])
