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
from dataclasses import asdict
from pathlib import Path

import agents
from routing_env.training import finetune
from routing_env.search import gate
from routing_env.search import run as train_rl  # stage 2, named after its command
from routing_env.common.configs import PipelineConfig  # the settings, torch-free for the command line
from routing_env.data import TaskSource, resolve_task
from routing_env.registration import ENV_IDS
from routing_env.common.identity import RUN_PLACE_FIELDS, provenance, run_differences, settings_tag
from routing_env.common.results import aggregate, check_replace, dumps_record, run_metrics, run_questions, write_table
from routing_env.common.safefiles import atomic_write_text
from routing_env.common.utils import make_writer, save_config

__all__ = ["BUDGET_FIELDS", "PipelineConfig", "SEARCH_FIELDS", "STAGE3_FIELDS", "TASK_ENV", "VALUE_AGENTS", "check",
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


def _finetune_config(cfg: PipelineConfig, root: Path, name: str, seed: int, **kw) -> finetune.Config:
    return finetune.Config(**_source(cfg).args(), backbone=cfg.backbone, seed=seed, train_limit=cfg.train_limit,
                           eval_limit=cfg.eval_limit, data_dir=cfg.data_dir, device=cfg.device, logdir=str(root), name=name,
                           resume=True, balance=cfg.balance, num_experts=cfg.num_experts, top_k=cfg.top_k, rank=cfg.rank,
                           aux_loss_coef=cfg.aux_loss_coef, lr=cfg.lr, **kw)


def _finetune(cfg: PipelineConfig, root: Path, name: str, seed: int, force: bool = False, **kw) -> dict:
    """A fine-tune stage (an interrupted one resumes from its last epoch checkpoint)."""
    ft = _finetune_config(cfg, root, name, seed, **kw)
    return _stage(cfg, root, name, "results.json", ft, lambda: finetune.main(ft), force)


#: Settings every method shares: the budget. Any non-default value names its own task folder
#: (``task_folder``), so runs, records and tables of different budgets never meet.
BUDGET_FIELDS = ("epochs", "backbone", "balance", "num_experts", "top_k", "rank", "aux_loss_coef", "lr", "train_limit",
                 "eval_limit")
#: Settings of each stage beyond the shared budget; a non-default value gets its own run folder, so
#: a rerun with other settings never reuses a stage computed with different ones.
SEARCH_FIELDS = ("search_examples", "num_simulations", "agent_kwargs", "balance_weight", "warmup_epochs",
                 "search_batch_size")
STAGE3_FIELDS = ("beta", "route_weighting", "target_balance", "target_form", "target_temperature", "teacher_forcing",
                 "route_granularity", "route_loss_grad")


#: Agents whose targets files carry process values, so ``target_form`` onehot / softmax and
#: ``route_weighting`` value-gap apply; the others (router, random, PPO, ...) keep their own
#: distributions, equally weighted.
VALUE_AGENTS = ("mcts", "exhaustive")


def _env_args(cfg: PipelineConfig) -> dict:
    """The env id of a built-in task, or the default id plus the task's files (the id only picks the class)."""
    source = _source(cfg)
    return {"env": TASK_ENV.get(source.builtin or "", "layermoe-arc"), **({} if source.builtin else source.args())}


def _search_config(cfg: PipelineConfig, root: Path, agent: str, seed: int, checkpoint: Path, name: str) -> train_rl.Config:
    return train_rl.Config(
        **_env_args(cfg), agent=agent, checkpoint=str(checkpoint), seed=seed,
        num_examples=cfg.search_examples or cfg.train_limit or 10**9, num_simulations=cfg.num_simulations,
        batch_size=cfg.search_batch_size, device=cfg.device, agent_kwargs=cfg.agent_kwargs,
        balance_weight=cfg.balance_weight, data_dir=cfg.data_dir, logdir=str(root), name=name, compare_router=True)


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


def _stage3_settings(cfg: PipelineConfig, agent: str) -> dict:
    """Stage 3's settings for targets of ``agent``: agents without process values keep their own
    distributions (target form ``file``), equally weighted (value-gap would weigh every term 0)."""
    values = agent in VALUE_AGENTS
    return dict(beta=cfg.beta, route_weighting=cfg.route_weighting if values else "none",
                target_balance=cfg.target_balance, target_form=cfg.target_form if values else "file",
                target_temperature=cfg.target_temperature, teacher_forcing=cfg.teacher_forcing,
                route_granularity=cfg.route_granularity, route_loss_grad=cfg.route_loss_grad)


def check(cfg: PipelineConfig) -> None:
    """Every setting of every stage, checked before the first one runs (a typo in the last method
    must not cost the lora-moe run before it)."""
    from routing_env.common.configs import ROUTE_LOSS_GRADS
    from routing_env.search.targets import TARGET_BALANCING, TARGET_FORMS
    from routing_env.training.supervision import GRANULARITIES, WEIGHTINGS

    for flag, value in (("seeds", cfg.seeds), ("methods", cfg.methods)):
        if not value:
            raise ValueError(f"--{flag} is empty; give at least one")
    if not 0 < cfg.warmup_epochs < cfg.epochs:
        raise ValueError(f"warmup_epochs must be between 1 and epochs - 1 (= {cfg.epochs - 1}) so layermoe gets a stage 3; "
                         f"got {cfg.warmup_epochs}")
    for m in cfg.methods:
        if m not in ("lora", "lora-moe") and not m.startswith("layermoe-"):
            raise ValueError(f"unknown method {m!r}; valid: lora, lora-moe, layermoe-<agent> (e.g. layermoe-mcts)")
    for flag, value, valid in (("route-weighting", cfg.route_weighting, WEIGHTINGS),
                               ("target-balance", cfg.target_balance, TARGET_BALANCING),
                               ("target-form", cfg.target_form, TARGET_FORMS),
                               ("route-granularity", cfg.route_granularity, GRANULARITIES),
                               ("route-loss-grad", cfg.route_loss_grad, ROUTE_LOSS_GRADS)):
        if value not in valid:
            raise ValueError(f"--{flag} {value!r} is not one of {', '.join(valid)}")
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
        finetune.check_config(_finetune_config(cfg, root, method, cfg.seeds[0], method=method, epochs=cfg.epochs))
    for method in cfg.methods:  # agent name, its settings, search budget: as train_rl checks them
        if method.startswith("layermoe-"):
            train_rl.check_config(_search_config(cfg, root, method.removeprefix("layermoe-"), cfg.seeds[0], root, method))


def table_name(cfg: PipelineConfig) -> str:
    """``<task>`` for the default settings, else ``<task>-<tag of every non-default budget, search and stage-3 setting>``."""
    return _source(cfg).name + settings_tag(cfg, BUDGET_FIELDS + SEARCH_FIELDS + STAGE3_FIELDS)


def main(cfg: PipelineConfig) -> dict:
    check(cfg)
    # A table is never replaced by a subset of itself: refused now, not after hours of training.
    check_replace(Path(cfg.results_dir) / f"{table_name(cfg)}.json", {m: {"seeds": cfg.seeds} for m in cfg.methods})
    root = Path(cfg.logdir) / task_folder(cfg)
    runs: dict[str, list[dict]] = {m: [] for m in cfg.methods}
    tag = settings_tag(cfg, SEARCH_FIELDS + STAGE3_FIELDS)
    missing: list[str] = []
    gates: dict[int, dict] = {}
    for seed in cfg.seeds:
        unfinished = [m for m in cfg.methods if not _finished(cfg, root, _run_name(m, seed, tag))]
        if cfg.table_only:  # leave out what has not finished (its base run must have, for layermoe)
            missing += [f"{m} s{seed}" for m in unfinished]
        # Stage 3 continues the very lora-moe run it is compared with: when a layermoe stage is
        # still to run and only committed records of that run exist here (another machine), the
        # seed's lora-moe run is recomputed, so both rows come from the same run.
        warm = root / f"lora-moe-s{seed}" / "checkpoints" / f"epoch_{cfg.warmup_epochs}"
        pending = [m for m in unfinished if m.startswith("layermoe-")]
        rerun_base = bool(pending) and not warm.is_dir() and not cfg.table_only
        for method in cfg.methods:
            if cfg.table_only and method in unfinished:
                continue
            # ---- baselines: the same epochs of task training, no search ------------------------
            if method in ("lora", "lora-moe"):
                res = _finetune(cfg, root, _run_name(method, seed, tag), seed, force=rerun_base and method == "lora-moe",
                                method=method, epochs=cfg.epochs)
                runs[method].append({"seed": seed, "metrics": run_metrics(res), "questions": run_questions(res),
                                     "seconds": {"train": res["wall_time_s"]}})
                continue
            agent = method.removeprefix("layermoe-")
            # ---- stage 1: the first warmup_epochs of this seed's lora-moe run -------------------
            base = _finetune(cfg, root, f"lora-moe-s{seed}", seed, force=rerun_base, method="lora-moe", epochs=cfg.epochs)
            warm_s = base["history"][cfg.warmup_epochs - 1]["elapsed_s"]
            # ---- the gate: is there routing structure to learn on this warm-up? (dev, once a seed) --
            if cfg.gate_examples and seed not in gates and (
                    method in pending or _finished(cfg, root, _gate_name(cfg, seed), "gate.json")):
                gates[seed] = _gate(cfg, root, seed, warm)
            # ---- stage 2: search routing targets on that checkpoint -----------------------------
            search = _search(cfg, root, agent, seed, warm)
            if method in pending and not Path(search["targets"]).is_file():  # a record, but no targets here
                search = _search(cfg, root, agent, seed, warm, force=True)
            # ---- stage 3: the run's remaining epochs, plus the routing loss ---------------------
            res = _finetune(cfg, root, _run_name(method, seed, tag), seed, method="layermoe", epochs=cfg.epochs,
                            init_checkpoint=str(warm), targets=search["targets"], **_stage3_settings(cfg, agent))
            runs[method].append({"seed": seed, "metrics": run_metrics(res), "search": search.get("agent"),
                                 "paired_with": run_metrics(base),
                                 # per-question test records of both arms: the within-seed paired tests
                                 "questions": run_questions(res), "paired_questions": run_questions(base),
                                 "seconds": {"warm-up": warm_s, "search": search.get("wall_time_s"),
                                             "stage 3": res["wall_time_s"]}})

    # ---- the table ---------------------------------------------------------------------------------
    table = aggregate({m: r for m, r in runs.items() if r})
    if not table:
        raise ValueError(f"--table-only: no finished stage matches these settings (task folder {task_folder(cfg)}, "
                         f"settings tag {tag or 'none'}) under {root} or {Path(cfg.results_dir) / 'runs'}; nothing to "
                         "tabulate. Run the pipeline without --table-only, or give the settings the runs were made with")
    budget = {k: v for k, v in asdict(cfg).items()
              if k not in ("methods", "logdir", "results_dir", "data_dir", "device", "table_only")}
    notes = [f"{m}: targets from an agent without process values, so target_form file and route_weighting none"
             for m in cfg.methods if m.startswith("layermoe-")
             and any(_stage3_settings(cfg, m.removeprefix("layermoe-"))[k] != getattr(cfg, k)
                     for k in ("target_form", "route_weighting"))]
    if notes:
        budget["per-agent settings"] = "; ".join(notes)
    if gates:
        budget["routing-structure gate on the warm-up"] = "; ".join(f"s{s}: {gate.summary_line(g)}" for s, g in gates.items())
    if missing:
        budget["not finished (left out)"] = ", ".join(missing)
        print(f"[pipeline] not finished, left out of the table: {', '.join(missing)}")
    save_config(root / "pipeline", cfg)
    writer = make_writer(root / "pipeline")
    # Another budget or other layermoe settings: another table beside the default one, named by them.
    path = write_table(table_name(cfg), table, cfg.results_dir, budget, writer, provenance())
    writer.close()
    print(Path(path).read_text())
    return table

