"""The whole LayerMoE pipeline on one task, every method on equal terms, and its results table.

    python -m routing_env.pipeline --task arc-easy                      # 3 seeds, all four methods
    python -m routing_env.pipeline --task obqa --seeds 0,1 --methods lora-moe,layermoe-mcts --train-limit 500

Per seed: ``lora`` and ``lora-moe`` train ``epochs`` epochs. ``layermoe-<agent>`` is paired with that
seed's lora-moe run: ``<agent>`` (train_rl.py) searches routing targets on the run's checkpoint after
``warmup_epochs`` (stage 1 = the run's first epochs), then stage 3 continues *that run* from that
checkpoint, with its optimiser state, schedule and RNG, adding beta * routing loss. The only
difference from lora-moe is the routing loss, so the table reports per-seed paired differences
(``layermoe-router``, targets from the learned router itself, is the no-search control). A stage
whose outputs exist is skipped; an interrupted one resumes (fine-tunes from their last epoch
checkpoint, searches after their last written example); either only when the settings it stored are
the ones this run would use (``_reusable``): a run is exactly what its settings say. Another budget
gets another task folder (``task_folder``), other search or stage-3 settings other stage names. The
table goes to ``results/<table>.md`` + JSON + a PNG plot, ``<table>`` being the task plus a tag of
every non-default setting (``table_name``), with the settings, command, commit and date under it.
"""

from __future__ import annotations

# The command line, before the imports below: --help and flag errors answer without loading torch,
# then run_cli imports this module (routing_env.pipeline, not __main__) and runs its main.
if __name__ == "__main__":
    from routing_env.common.cli import run_cli
    from routing_env.common.configs import PipelineConfig

    run_cli("routing_env.pipeline:main", PipelineConfig, __doc__)
    raise SystemExit(0)

import functools
import json
import math
from dataclasses import asdict, fields
from pathlib import Path

import agents
from routing_env.training import finetune
from routing_env.search import gate
from routing_env.search import run as train_rl  # stage 2, named after its command
from routing_env.common.configs import (  # the settings, torch-free for the command line
    DataLimits, LayerGroups, MoEShape, PipelineConfig, PipelineSearch, Place, Schedule, SearchSettings, Stage3Settings,
    StudyOutput,
    field_names)
from routing_env.data import TaskSource, resolve_task
from routing_env.registration import ENV_IDS
from routing_env.common.identity import RUN_PLACE_FIELDS, provenance, run_differences, settings_tag
from routing_env.common.results import aggregate, check_replace, dumps_record, run_metrics, run_questions, write_table
from routing_env.common.safefiles import atomic_write_text
from routing_env.common.utils import make_writer, save_config

__all__ = ["BUDGET_FIELDS", "PipelineConfig", "SEARCH_FIELDS", "STAGE3_FIELDS", "TASK_ENV", "VALUE_AGENTS", "WITHOUT_VALUES", "check",
           "main", "settings_tag", "table_name", "task_folder"]

TASK_ENV = {task: env_id for env_id, task in ENV_IDS.items()}


def _source(cfg: PipelineConfig) -> TaskSource:
    return _resolve(cfg.task, cfg.train_file, cfg.dev_file, cfg.test_file)


@functools.lru_cache(maxsize=8)
def _resolve(task: str, train_file: str | None, dev_file: str | None, test_file: str | None) -> TaskSource:
    return resolve_task(task, train_file, dev_file, test_file)  # hashes a custom task's files once, not per stage


def task_folder(cfg: PipelineConfig) -> str:
    """``<task>`` at the default budget, ``<task>-<tag of the budget>`` at any other (see ``BUDGET_FIELDS``).

    Run folders, committed records and tables of one budget never meet another's: a 32-question
    smoke run from the repository root neither reuses the full-size records nor replaces their tables.
    """
    return _source(cfg).name + settings_tag(cfg, BUDGET_FIELDS)


def _record(cfg: PipelineConfig, name: str) -> Path:
    """Where a finished stage's results are committed: ``<results_dir>/runs/<task folder>/<name>.json``."""
    return Path(cfg.results_dir) / "runs" / task_folder(cfg) / f"{name}.json"


def _finished(cfg: PipelineConfig, root: Path, name: str, filename: str = "results.json") -> bool:
    """Whether a stage has results here: its run folder's file, or its committed record."""
    return (root / name / filename).is_file() or _record(cfg, name).is_file()


#: Paths a stage's settings hold: they follow from the run names, which follow from the settings.
_PATHS = ("init_checkpoint", "targets", "checkpoint", "output")


def _reusable(res: dict, expected, where: Path, neutral: tuple[str, ...] = ()) -> dict:
    """``res`` when it was computed with ``expected``'s settings, else a refusal naming each difference.

    ``neutral``: settings shown not to change this stage's result (see ``_search``)."""
    diff = run_differences(expected, res.get("config") or {}, ignore=RUN_PLACE_FIELDS + _PATHS + neutral)
    if diff:
        raise ValueError(f"{where} holds a result computed with other settings ({'; '.join(diff)}); a stage is reused "
                         "only when every setting matches. Delete it (and its run folder) to recompute it, or use "
                         "another --logdir / --results-dir")
    return res


def _stage(cfg: PipelineConfig, root: Path, name: str, filename: str, expected, run, force: bool = False,
           neutral: tuple[str, ...] = ()) -> dict:
    """A stage's results: from its run folder, else from its committed record, else by running it.

    Run folder and record are reused only when their stored settings are ``expected``'s (the stage
    config this pipeline would run); any difference is refused, naming it. Whatever way the results
    come, they are (re)written to the record, so committing ``results/runs`` after each stage lets
    an interrupted table resume on another machine. ``force`` ignores a record (not a local run
    folder): for a stage whose local outputs a later stage needs.
    """
    local, record = root / name / filename, _record(cfg, name)
    if local.is_file():
        print(f"[pipeline] {task_folder(cfg)} {name}: done, skipped")
        res = _reusable(json.loads(local.read_text()), expected, local, neutral)
    elif record.is_file() and not force:
        print(f"[pipeline] {task_folder(cfg)} {name}: done (committed record {record}), skipped")
        return _reusable(json.loads(record.read_text()), expected, record, neutral)
    elif cfg.table_only:
        raise ValueError(f"--table-only: stage {name} has no results yet; run the pipeline without --table-only")
    else:
        print(f"[pipeline] {task_folder(cfg)} {name}: running")
        res = run()
    atomic_write_text(record, dumps_record(res))
    return res


#: Settings every method shares, the budget: the groups ``DataLimits``, ``Schedule`` and ``MoEShape``
#: of the config. Any non-default value names its own task folder (``task_folder``), so runs, records
#: and tables of different budgets never meet.
BUDGET_FIELDS = field_names(DataLimits, Schedule, MoEShape, LayerGroups)
#: Settings of each stage beyond the shared budget, the groups ``PipelineSearch`` and
#: ``Stage3Settings``; a non-default value gets its own run folder, so a rerun with other settings never
#: reuses a stage computed with different ones. A field added to a group joins its tag by itself.
SEARCH_FIELDS = field_names(PipelineSearch)
STAGE3_FIELDS = field_names(Stage3Settings)


def _values(cfg: PipelineConfig, names: tuple[str, ...]) -> dict:
    """``name -> value`` of the config's settings ``names`` (a group's fields), to pass on to a stage."""
    return {k: getattr(cfg, k) for k in names}


def _finetune_config(cfg: PipelineConfig, root: Path, name: str, seed: int, **kw) -> finetune.Config:
    """A fine-tune of the pipeline's budget (``epochs`` included) at ``seed``; ``kw``: its method, stage-3
    settings and inputs (and any other of its settings, which wins over the budget's)."""
    return finetune.Config(**{**_source(cfg).args(), **_values(cfg, BUDGET_FIELDS), "seed": seed, "data_dir": cfg.data_dir,
                              "device": cfg.device, "logdir": str(root), "name": name, "resume": True, **kw})


def _finetune(cfg: PipelineConfig, root: Path, name: str, seed: int, force: bool = False, **kw) -> dict:
    """A fine-tune stage (an interrupted one resumes from its last epoch checkpoint)."""
    ft = _finetune_config(cfg, root, name, seed, **kw)
    return _stage(cfg, root, name, "results.json", ft, lambda: finetune.main(ft), force)


#: Agents whose targets files carry process values, so ``target_form`` onehot / softmax and
#: ``route_weighting`` value-gap apply; the others (router, random, PPO, ...) keep their own
#: distributions, equally weighted.
VALUE_AGENTS = ("mcts", "exhaustive")


def _env_args(cfg: PipelineConfig) -> dict:
    """The env id of a built-in task, or the default id plus the task's files (the id only picks the class)."""
    source = _source(cfg)
    return {"env": TASK_ENV.get(source.builtin or "", "layermoe-arc"), **({} if source.builtin else source.args())}


def _search_config(cfg: PipelineConfig, root: Path, agent: str, seed: int, checkpoint: Path, name: str) -> train_rl.Config:
    """A search with the pipeline's search settings (``SearchSettings``, passed as they are)."""
    return train_rl.Config(
        **_env_args(cfg), **_values(cfg, field_names(SearchSettings)), agent=agent, checkpoint=str(checkpoint), seed=seed,
        num_examples=cfg.search_examples or cfg.train_limit or 10**9, batch_size=cfg.search_batch_size,
        device=cfg.device, data_dir=cfg.data_dir, logdir=str(root), name=name, compare_router=True)


def _search(cfg: PipelineConfig, root: Path, agent: str, seed: int, checkpoint: Path, force: bool = False) -> dict:
    """A search stage (train_rl resumes after its last written example)."""
    name = f"search-{agent}{settings_tag(cfg, SEARCH_FIELDS)}-s{seed}"
    rl = _search_config(cfg, root, agent, seed, checkpoint, name)
    # An act-only agent (router, random, ...) runs its examples one episode at a time whatever the
    # batch (``agents.rollout``): there the batch size only chunks the writes, so it is no part of
    # the result's identity. A batched planner (a ``search`` method) computes per batch.
    neutral = () if hasattr(agents.factory(agent), "search") else ("batch_size",)
    return _stage(cfg, root, name, "summary.json", rl, lambda: train_rl.main(rl), force, neutral)


def _gate_name(cfg: PipelineConfig, seed: int) -> str:
    return f"gate{settings_tag(cfg, ('gate_examples',))}-s{seed}"


def _gate(cfg: PipelineConfig, root: Path, seed: int, checkpoint: Path) -> dict:
    """The routing-structure gate on the warm-up (dev; ``routing_env.search.gate``), a stage like the others."""
    name = _gate_name(cfg, seed)
    g = gate.GateConfig(checkpoint=str(checkpoint), **_env_args(cfg), examples=min(cfg.gate_examples, cfg.eval_limit or cfg.gate_examples), seed=seed,
                        data_dir=cfg.data_dir, device=cfg.device)
    res = _stage(cfg, root, name, "gate.json", g, lambda: gate.run(g, root / name / "gate.json"))
    if not res["structure"]:
        print(f"[pipeline] warning, seed {seed}: {res['warning']}")
    return res


def _run_name(method: str, seed: int, tag: str) -> str:
    """A method's final run: ``<method>-s<seed>`` for the baselines, with the settings tag for layermoe."""
    return f"{method}-s{seed}" if method in ("lora", "lora-moe") else f"{method}{tag}-s{seed}"


#: Stage-3 settings that need process values, and what targets without them get instead.
WITHOUT_VALUES = {"target_form": "file", "route_weighting": "none"}


def _stage3_settings(cfg: PipelineConfig, agent: str) -> dict:
    """Stage 3's settings (every field of ``Stage3Settings``) for targets of ``agent``: agents without
    process values keep their own distributions (target form ``file``), equally weighted (value-gap
    would weigh every term 0)."""
    settings = _values(cfg, STAGE3_FIELDS)
    return settings if agent in VALUE_AGENTS else {**settings, **WITHOUT_VALUES}


def check(cfg: PipelineConfig) -> None:
    """Every setting of every stage, checked before the first one runs (a typo in the last method
    must not cost the lora-moe run before it)."""
    for flag, value in (("seeds", cfg.seeds), ("methods", cfg.methods)):
        if not value:
            raise ValueError(f"--{flag} is empty; give at least one")
    if not 0 < cfg.warmup_epochs < cfg.epochs:
        raise ValueError(f"warmup_epochs must be between 1 and epochs - 1 (= {cfg.epochs - 1}) so layermoe gets a stage 3; "
                         f"got {cfg.warmup_epochs}")
    for m in cfg.methods:
        if m not in ("lora", "lora-moe") and not m.startswith("layermoe-"):
            raise ValueError(f"unknown method {m!r}; valid: lora, lora-moe, layermoe-<agent> (e.g. layermoe-mcts)")
    for f in fields(cfg):  # the flags check their choices; a config made in code (compare) is checked here
        valid, value = f.metadata.get("choices"), getattr(cfg, f.name)
        if valid and value not in valid:
            raise ValueError(f"--{f.name.replace('_', '-')} {value!r} is not one of {', '.join(valid)}")
    if not (math.isfinite(cfg.beta) and cfg.beta >= 0):
        raise ValueError(f"--beta must be a finite number >= 0, got {cfg.beta}")
    if not (math.isfinite(cfg.target_temperature) and cfg.target_temperature > 0):
        raise ValueError(f"--target-temperature must be a finite number > 0, got {cfg.target_temperature}")
    if not 0 <= cfg.teacher_forcing <= 1:
        raise ValueError(f"--teacher-forcing is a share of the examples, in [0, 1]; got {cfg.teacher_forcing}")
    if cfg.search_batch_size < 1:  # train_rl's check below would name it --batch-size
        raise ValueError(f"--search-batch-size must be at least 1, got {cfg.search_batch_size}")
    if cfg.gate_examples < 0:
        raise ValueError(f"--gate-examples must be at least 0 (0 skips the gate), got {cfg.gate_examples}")
    if cfg.search_examples is not None and cfg.search_examples < 1:
        raise ValueError(f"--search-examples must be at least 1 (or none for all), got {cfg.search_examples}")
    root = Path(cfg.logdir) / "<check>"
    for method in ("lora", "lora-moe"):  # budget, MoE shape, strategy, task: as each fine-tune checks them
        finetune.check_config(_finetune_config(cfg, root, method, cfg.seeds[0], method=method))
    for method in cfg.methods:  # agent name, its settings, search budget: as train_rl checks them
        if method.startswith("layermoe-"):
            train_rl.check_config(_search_config(cfg, root, method.removeprefix("layermoe-"), cfg.seeds[0], root, method))


def table_name(cfg: PipelineConfig) -> str:
    """``<task>`` for the default settings, else ``<task>-<tag of every non-default budget, search and stage-3 setting>``."""
    return _source(cfg).name + settings_tag(cfg, BUDGET_FIELDS + SEARCH_FIELDS + STAGE3_FIELDS)


def _stage_tag(cfg: PipelineConfig) -> str:
    """The tag of the non-default search and stage-3 settings: layermoe runs are named by it (``_run_name``)."""
    return settings_tag(cfg, SEARCH_FIELDS + STAGE3_FIELDS)


def main(cfg: PipelineConfig) -> dict:
    """Every method on every seed (stages already finished are reused), then the table."""
    check(cfg)
    # A table is never replaced by a subset of itself: refused now, not after hours of training.
    check_replace(Path(cfg.results_dir) / f"{table_name(cfg)}.json", {m: {"seeds": cfg.seeds} for m in cfg.methods})
    root = Path(cfg.logdir) / task_folder(cfg)
    runs: dict[str, list[dict]] = {m: [] for m in cfg.methods}
    gates: dict[int, dict] = {}
    missing: list[str] = []
    for seed in cfg.seeds:
        missing += _run_seed(cfg, root, seed, runs, gates)
    return _write_table(cfg, root, runs, gates, missing)


def _warm_checkpoint(cfg: PipelineConfig, root: Path, seed: int) -> Path:
    """The checkpoint of the seed's lora-moe run after the warm-up: the search's model and stage 3's start."""
    return root / f"lora-moe-s{seed}" / "checkpoints" / f"epoch_{cfg.warmup_epochs}"


def _run_seed(cfg: PipelineConfig, root: Path, seed: int, runs: dict[str, list[dict]], gates: dict[int, dict]) -> list[str]:
    """Every method on ``seed``, its row appended to ``runs[method]`` (and the seed's gate to ``gates``).

    Returns the ``"<method> s<seed>"`` left out: with ``--table-only``, those not finished (a layermoe
    method's base run must have finished too)."""
    unfinished = [m for m in cfg.methods if not _finished(cfg, root, _run_name(m, seed, _stage_tag(cfg)))]
    # Stage 3 continues the very lora-moe run it is compared with: when a layermoe stage is
    # still to run and only committed records of that run exist here (another machine), the
    # seed's lora-moe run is recomputed, so both rows come from the same run.
    pending = [m for m in unfinished if m.startswith("layermoe-")]
    rerun_base = bool(pending) and not _warm_checkpoint(cfg, root, seed).is_dir() and not cfg.table_only
    for method in cfg.methods:
        if cfg.table_only and method in unfinished:
            continue
        if method in ("lora", "lora-moe"):
            runs[method].append(_baseline(cfg, root, method, seed, force=rerun_base and method == "lora-moe"))
        else:
            runs[method].append(_layermoe(cfg, root, method, seed, rerun_base, method in pending, gates))
    return [f"{m} s{seed}" for m in unfinished] if cfg.table_only else []


def _baseline(cfg: PipelineConfig, root: Path, method: str, seed: int, force: bool) -> dict:
    """The row of a baseline (lora, lora-moe): ``epochs`` epochs of task training, no search."""
    res = _finetune(cfg, root, _run_name(method, seed, _stage_tag(cfg)), seed, force=force, method=method)
    return {"seed": seed, "metrics": run_metrics(res), "questions": run_questions(res),
            "seconds": {"train": res["wall_time_s"]}}


def _layermoe(cfg: PipelineConfig, root: Path, method: str, seed: int, rerun_base: bool, pending: bool,
              gates: dict[int, dict]) -> dict:
    """The row of ``layermoe-<agent>``: warm-up, gate, search, stage 3, paired with the seed's lora-moe run.

    ``rerun_base``: recompute the lora-moe run (its checkpoints are not here); ``pending``: this
    method's stage 3 is still to run, so its search's targets file must be here."""
    agent, warm = method.removeprefix("layermoe-"), _warm_checkpoint(cfg, root, seed)
    # ---- stage 1: the first warmup_epochs of this seed's lora-moe run -------------------
    base = _finetune(cfg, root, f"lora-moe-s{seed}", seed, force=rerun_base, method="lora-moe")
    warm_s = base["history"][cfg.warmup_epochs - 1]["elapsed_s"]
    # ---- the gate: is there routing structure to learn on this warm-up? (dev, once a seed) --
    if cfg.gate_examples and seed not in gates and (
            pending or _finished(cfg, root, _gate_name(cfg, seed), "gate.json")):
        gates[seed] = _gate(cfg, root, seed, warm)
    # ---- stage 2: search routing targets on that checkpoint -----------------------------
    search = _search(cfg, root, agent, seed, warm)
    if pending and not Path(search["targets"]).is_file():  # a record, but no targets here
        search = _search(cfg, root, agent, seed, warm, force=True)
    # ---- stage 3: the run's remaining epochs, plus the routing loss ---------------------
    res = _finetune(cfg, root, _run_name(method, seed, _stage_tag(cfg)), seed, method="layermoe",
                    init_checkpoint=str(warm), targets=search["targets"], **_stage3_settings(cfg, agent))
    return {"seed": seed, "metrics": run_metrics(res), "search": search.get("agent"), "paired_with": run_metrics(base),
            # per-question test records of both arms: the within-seed paired tests
            "questions": run_questions(res), "paired_questions": run_questions(base),
            "seconds": {"warm-up": warm_s, "search": search.get("wall_time_s"), "stage 3": res["wall_time_s"]}}


def _write_table(cfg: PipelineConfig, root: Path, runs: dict[str, list[dict]], gates: dict[int, dict],
                 missing: list[str]) -> dict:
    """The table of the finished rows, with its settings under it: ``<results_dir>/<table_name>.md``, JSON, plot."""
    table = aggregate({m: r for m, r in runs.items() if r})
    if not table:
        raise ValueError(f"--table-only: no finished stage matches these settings (task folder {task_folder(cfg)}, "
                         f"settings tag {_stage_tag(cfg) or 'none'}) under {root} or {Path(cfg.results_dir) / 'runs'}; "
                         "nothing to tabulate. Run the pipeline without --table-only, or give the settings the runs "
                         "were made with")
    if missing:
        print(f"[pipeline] not finished, left out of the table: {', '.join(missing)}")
    save_config(root / "pipeline", cfg)
    writer = make_writer(root / "pipeline")
    # Another budget or other layermoe settings: another table beside the default one, named by them.
    path = write_table(table_name(cfg), table, cfg.results_dir, _table_settings(cfg, gates, missing), writer,
                       provenance())
    writer.close()
    print(Path(path).read_text())
    return table


def _table_settings(cfg: PipelineConfig, gates: dict[int, dict], missing: list[str]) -> dict:
    """The settings every row shares (all but the methods, where they ran and the output), per-agent
    exceptions, the gates' verdicts and the rows left out: written under the table."""
    hidden = {"methods", *field_names(Place), *field_names(StudyOutput)} - {"seeds"}
    settings = {k: v for k, v in asdict(cfg).items() if k not in hidden}
    without = " and ".join(f"{k} {v}" for k, v in WITHOUT_VALUES.items())
    notes = [f"{m}: targets from an agent without process values, so {without}"
             for m in cfg.methods if m.startswith("layermoe-")
             and any(_stage3_settings(cfg, m.removeprefix("layermoe-"))[k] != getattr(cfg, k) for k in WITHOUT_VALUES)]
    if notes:
        settings["per-agent settings"] = "; ".join(notes)
    if gates:
        settings["routing-structure gate on the warm-up"] = "; ".join(f"s{s}: {gate.summary_line(g)}"
                                                                      for s, g in gates.items())
    if missing:
        settings["not finished (left out)"] = ", ".join(missing)
    return settings
