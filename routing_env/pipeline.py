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
checkpoint, searches after their last written example). The table goes to ``results/<task>.md`` +
JSON + a PNG plot.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from routing_env import finetune
from routing_env import search as train_rl  # stage 2, named after its command
from routing_env.data import TaskSource, resolve_task
from routing_env.moe import DEFAULT_BACKBONE
from routing_env.registration import ENV_IDS
from routing_env.results import aggregate, run_metrics, write_table
from routing_env.safefiles import atomic_write_text
from routing_env.utils import cfg_field, make_writer, run_cli, save_config

__all__ = ["PipelineConfig", "main"]

TASK_ENV = {task: env_id for env_id, task in ENV_IDS.items()}


@dataclass
class PipelineConfig:
    """Warm-up -> search -> process-supervised fine-tune -> test, with the baselines, over seeds."""

    task: str = cfg_field("arc-easy", f"task: a name ({', '.join(TASK_ENV)}), a folder of train/dev/test "
                          ".jsonl[.gz] files, or one file (split 80/10/10 by question-id hash)")
    train_file: str | None = cfg_field(None, "your own training split (with --dev-file, --test-file; overrides --task)")
    dev_file: str | None = cfg_field(None, "your own dev split")
    test_file: str | None = cfg_field(None, "your own test split")
    methods: list[str] = cfg_field(["lora", "lora-moe", "layermoe-mcts", "layermoe-ppo"],
                                   "comma-separated methods: lora, lora-moe, layermoe-<agent> (any registered agent)")
    seeds: list[int] = cfg_field([0, 1, 2], "comma-separated seeds; every method runs every seed")
    epochs: int = cfg_field(2, "epochs of task training for every method (layermoe: warm-up + stage 3)")
    warmup_epochs: int = cfg_field(1, "layermoe: epochs of the lora-moe warm-up before the search")
    backbone: str = cfg_field(DEFAULT_BACKBONE, "backbone of every method")
    balance: str = cfg_field("aux", "routing / balancing strategy of the lora-moe runs (layermoe inherits it): aux, "
                             "z-loss, loss-free, top-p, sinkhorn or a '+' combination (routing_env.compare runs them all)")
    num_experts: list[int] = cfg_field([4], "experts per layer of the lora-moe runs: one number, or one per layer "
                                       "(MoLA, e.g. 2,2,4,4,6,6; every layer group needs one count). Another value, "
                                       "like another --balance, needs its own --logdir")
    train_limit: int | None = cfg_field(None, "use only the first N training questions (all methods)")
    eval_limit: int | None = cfg_field(None, "evaluate on only the first N dev / test questions (all methods)")
    search_examples: int | None = cfg_field(None, "search only the first N training questions (default: all; the "
                                            "rest get the task loss only)")
    num_simulations: int = cfg_field(32, "MCTS simulations per layer group")
    search_batch_size: int = cfg_field(16, "questions searched together (a larger batch fills a GPU; float rounding only)")
    agent_kwargs: str = cfg_field("{}", "JSON object of agent settings for every search, e.g. '{\"temperature\": 0.5}'")
    balance_weight: float = cfg_field(0.1, "weight of the env's per-group balance reward in the search")
    beta: float = cfg_field(1.0, "layermoe: weight of the routing loss")
    route_weighting: str = cfg_field("none", "layermoe: none or value-gap (weight by the spread of process values)")
    target_balance: str = cfg_field("none", "layermoe: none or sinkhorn (rescale targets to equal mass per expert)")
    target_form: str = cfg_field("file", "layermoe: file (as searched), onehot or softmax of the process values "
                                 "(agents with values: mcts, exhaustive; the others keep their distributions)")
    target_temperature: float = cfg_field(1.0, "layermoe: temperature of target_form softmax")
    route_granularity: str = cfg_field("group", "layermoe: group (token-averaged router) or token (per-token KL)")
    teacher_forcing: float = cfg_field(0.0, "layermoe: share of examples trained through their searched route (annealed)")
    data_dir: str | None = cfg_field(None, "data folder (default: $ROUTING_ENV_DATA, else the hub)")
    device: str = cfg_field("auto", "device of every stage, search included (auto, cpu, cuda[:i])")
    logdir: str = cfg_field("runs/pipeline", "parent folder of the stage runs (<logdir>/<task>/<stage>-s<seed>)")
    results_dir: str = cfg_field("results", "where the table, its JSON and the plot go")
    table_only: bool = cfg_field(False, "run nothing: write the table from the stages already finished (run "
                                 "folders or committed records), listing the (method, seed) pairs still missing")


def _source(cfg: PipelineConfig) -> TaskSource:
    return _resolve(cfg.task, cfg.train_file, cfg.dev_file, cfg.test_file)


@functools.lru_cache(maxsize=8)
def _resolve(task: str, train_file: str | None, dev_file: str | None, test_file: str | None) -> TaskSource:
    return resolve_task(task, train_file, dev_file, test_file)  # hashes a custom task's files once, not per stage


def _record(cfg: PipelineConfig, name: str) -> Path:
    """Where a finished stage's results are committed: ``<results_dir>/runs/<task>/<name>.json``."""
    return Path(cfg.results_dir) / "runs" / _source(cfg).name / f"{name}.json"


def _finished(cfg: PipelineConfig, root: Path, name: str, filename: str = "results.json") -> bool:
    """Whether a stage has results here: its run folder's file, or its committed record."""
    return (root / name / filename).is_file() or _record(cfg, name).is_file()


def _stage(cfg: PipelineConfig, root: Path, name: str, filename: str, run, force: bool = False) -> dict:
    """A stage's results: from its run folder, else from its committed record, else by running it.

    Whatever way they come, they are (re)written to the record, so committing ``results/runs``
    after each stage lets an interrupted table resume on another machine. ``force`` ignores a
    record (not a local run folder): for a stage whose local outputs a later stage needs.
    """
    local, record = root / name / filename, _record(cfg, name)
    if local.is_file():
        print(f"[pipeline] {_source(cfg).name} {name}: done, skipped")
        res = json.loads(local.read_text())
    elif record.is_file() and not force:
        print(f"[pipeline] {_source(cfg).name} {name}: done (committed record {record}), skipped")
        return json.loads(record.read_text())
    elif cfg.table_only:
        raise ValueError(f"--table-only: stage {name} has no results yet; run the pipeline without --table-only")
    else:
        print(f"[pipeline] {_source(cfg).name} {name}: running")
        res = run()
    atomic_write_text(record, json.dumps(res, indent=2))
    return res


def _finetune(cfg: PipelineConfig, root: Path, name: str, seed: int, force: bool = False, **kw) -> dict:
    """A fine-tune stage (an interrupted one resumes from its last epoch checkpoint)."""
    return _stage(cfg, root, name, "results.json", lambda: finetune.main(finetune.Config(
        **_source(cfg).args(), backbone=cfg.backbone, seed=seed, train_limit=cfg.train_limit, eval_limit=cfg.eval_limit,
        data_dir=cfg.data_dir, device=cfg.device, logdir=str(root), name=name, resume=True, balance=cfg.balance,
        num_experts=cfg.num_experts, **kw)),
        force)


#: Settings of each stage beyond the shared budget; a non-default value gets its own run folder, so
#: a rerun with other settings never reuses a stage computed with different ones.
SEARCH_FIELDS = ("search_examples", "num_simulations", "agent_kwargs", "balance_weight")
STAGE3_FIELDS = ("beta", "route_weighting", "target_balance", "target_form", "target_temperature", "teacher_forcing",
                 "route_granularity")


#: Agents whose targets files carry process values, so ``target_form`` onehot / softmax applies.
VALUE_AGENTS = ("mcts", "exhaustive")


def settings_tag(cfg: PipelineConfig, names: tuple[str, ...]) -> str:
    """``""`` when ``names`` are all at their defaults, else ``"-<8 hex>"`` naming those settings."""
    defaults = {f.name: f.default for f in fields(PipelineConfig)}
    changed = {k: getattr(cfg, k) for k in names if getattr(cfg, k) != defaults[k]}
    return "-" + hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8] if changed else ""


def _search(cfg: PipelineConfig, root: Path, agent: str, seed: int, checkpoint: Path, force: bool = False) -> dict:
    """A search stage (train_rl resumes after its last written example)."""
    name = f"search-{agent}{settings_tag(cfg, SEARCH_FIELDS)}-s{seed}"
    source = _source(cfg)  # a custom task goes to the env as files (the env id only picks the class)
    return _stage(cfg, root, name, "summary.json", lambda: train_rl.main(train_rl.Config(
        env=TASK_ENV.get(source.builtin or "", "layermoe-arc"), **({} if source.builtin else source.args()),
        agent=agent, checkpoint=str(checkpoint), seed=seed,
        num_examples=cfg.search_examples or cfg.train_limit or 10**9, num_simulations=cfg.num_simulations,
        batch_size=cfg.search_batch_size, device=cfg.device, agent_kwargs=cfg.agent_kwargs,
        balance_weight=cfg.balance_weight, data_dir=cfg.data_dir, logdir=str(root), name=name, compare_router=True)), force)


def _run_name(method: str, seed: int, tag: str) -> str:
    """A method's final run: ``<method>-s<seed>`` for the baselines, with the settings tag for layermoe."""
    return f"{method}-s{seed}" if method in ("lora", "lora-moe") else f"{method}{tag}-s{seed}"


def main(cfg: PipelineConfig) -> dict:
    if not 0 < cfg.warmup_epochs < cfg.epochs:
        raise ValueError(f"warmup_epochs must be between 1 and epochs - 1 (= {cfg.epochs - 1}) so layermoe gets a stage 3; "
                         f"got {cfg.warmup_epochs}")
    for m in cfg.methods:
        if m not in ("lora", "lora-moe") and not m.startswith("layermoe-"):
            raise ValueError(f"unknown method {m!r}; valid: lora, lora-moe, layermoe-<agent> (e.g. layermoe-mcts)")
    source = _source(cfg)  # checked before anything runs
    for flag, value in (("seeds", cfg.seeds), ("methods", cfg.methods)):
        if not value:
            raise ValueError(f"--{flag} is empty; give at least one")
    root = Path(cfg.logdir) / source.name
    runs: dict[str, list[dict]] = {m: [] for m in cfg.methods}
    tag = settings_tag(cfg, SEARCH_FIELDS + STAGE3_FIELDS)
    missing: list[str] = []
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
                runs[method].append({"seed": seed, "metrics": run_metrics(res), "seconds": {"train": res["wall_time_s"]}})
                continue
            agent = method.removeprefix("layermoe-")
            # ---- stage 1: the first warmup_epochs of this seed's lora-moe run -------------------
            base = _finetune(cfg, root, f"lora-moe-s{seed}", seed, force=rerun_base, method="lora-moe", epochs=cfg.epochs)
            warm_s = base["history"][cfg.warmup_epochs - 1]["elapsed_s"]
            # ---- stage 2: search routing targets on that checkpoint -----------------------------
            search = _search(cfg, root, agent, seed, warm)
            if method in pending and not Path(search["targets"]).is_file():  # a record, but no targets here
                search = _search(cfg, root, agent, seed, warm, force=True)
            # ---- stage 3: the run's remaining epochs, plus the routing loss ---------------------
            res = _finetune(cfg, root, _run_name(method, seed, tag), seed, method="layermoe", epochs=cfg.epochs,
                            init_checkpoint=str(warm), targets=search["targets"], beta=cfg.beta,
                            route_weighting=cfg.route_weighting, target_balance=cfg.target_balance,
                            # Agents without process values (router, PPO, ...) keep their own distributions.
                            target_form=cfg.target_form if agent in VALUE_AGENTS else "file",
                            target_temperature=cfg.target_temperature,
                            teacher_forcing=cfg.teacher_forcing, route_granularity=cfg.route_granularity)
            runs[method].append({"seed": seed, "metrics": run_metrics(res), "search": search.get("agent"),
                                 "paired_with": run_metrics(base),
                                 "seconds": {"warm-up": warm_s, "search": search.get("wall_time_s"),
                                             "stage 3": res["wall_time_s"]}})

    # ---- the table ---------------------------------------------------------------------------------
    table = aggregate({m: r for m, r in runs.items() if r})
    budget = {k: v for k, v in asdict(cfg).items()
              if k not in ("methods", "logdir", "results_dir", "data_dir", "device", "table_only")}
    if missing:
        budget["not finished (left out)"] = ", ".join(missing)
        print(f"[pipeline] not finished, left out of the table: {', '.join(missing)}")
    save_config(root / "pipeline", cfg)
    writer = make_writer(root / "pipeline")
    # Other layermoe settings: another table beside the default one, the settings in its budget line.
    path = write_table(source.name + tag, table, cfg.results_dir, budget, writer)
    writer.close()
    print(Path(path).read_text())
    return table


if __name__ == "__main__":
    run_cli(main, PipelineConfig, __doc__)
