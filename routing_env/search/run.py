"""Search the routing MDP with an agent and write routing targets (stage 2 of LayerMoE).

    python train_rl.py --env layermoe-arc                     # MCTS on the cached warm-up checkpoint
    python train_rl.py --env layermoe-arc --agent ppo
    python train_rl.py --env layermoe-arc --agent my_module:MyAgent

Reads top to bottom like the algorithm: set-up (env on the warm-up checkpoint, agent, targets file,
resuming finished examples), optional agent training (PPO), then the search over training examples
in batches (targets written after each batch, TensorBoard as it goes), and a summary comparing the
searched paths with the learned router's own greedy paths on the same examples.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

import agents
import routing_env  # importing registers the env ids
from agents.base import SearchResult
from routing_env.search.config import SearchConfig as Config  # the settings, torch-free for the command line
from routing_env.data import TaskSource, resolve_task
from routing_env.common.distributed import DistContext, NullWriter, setup
from routing_env.common.plots import load_heatmap
from routing_env.common.safefiles import RunLock, atomic_write_text, check_run_name
from routing_env.targets import TargetsWriter
from routing_env.common.utils import autocast_dtype, log_hparams, make_writer, pick_device, save_config, seed_everything

__all__ = ["Config", "check_config", "hindsight_note", "main", "search", "parse_agent_kwargs"]


def parse_agent_kwargs(text: str) -> dict:
    try:
        kw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--agent-kwargs is not valid JSON ({e.msg} at column {e.colno}): {text!r}; "
                         "e.g. --agent-kwargs '{\"c_puct\": 2.0}'") from e
    if not isinstance(kw, dict):
        raise ValueError(f"--agent-kwargs must be a JSON object, got {text!r}")
    return kw


def check_config(cfg: Config) -> tuple[object, TaskSource | None]:
    """Everything a typo can break, checked before the model loads: the agent's factory and the task."""
    for flag, value in (("num-examples", cfg.num_examples), ("batch-size", cfg.batch_size),
                        ("num-simulations", cfg.num_simulations)):
        if value < 1:
            raise ValueError(f"--{flag} must be at least 1, got {value}")
    # NaN would pass through every reward into the targets file; the env refuses it too, but only here
    # does the message name the flag.
    if not math.isfinite(cfg.balance_weight):
        raise ValueError(f"--balance-weight must be a finite number, got {cfg.balance_weight}; e.g. --balance-weight 0.1 "
                         "(0 turns the balance reward off)")
    if cfg.env not in gym.registry:
        raise ValueError(f"unknown env {cfg.env!r}; registered: {', '.join(routing_env.ENV_IDS)}")
    kwargs = parse_agent_kwargs(cfg.agent_kwargs)
    autocast_dtype(cfg.precision, pick_device(cfg.device))
    # The class is checked against the agent protocol and --agent-kwargs against its constructor here,
    # before the run folder and the model; a factory function is checked once it has built its agent.
    factory = agents.check_factory(agents.factory(cfg.agent), cfg.agent, kwargs)
    if cfg.name is not None:  # one folder inside --logdir, never a path out of it
        check_run_name(cfg.name)
    custom = cfg.task or cfg.train_file or cfg.dev_file or cfg.test_file
    return factory, resolve_task(cfg.task or "", cfg.train_file, cfg.dev_file, cfg.test_file) if custom else None


def agent_kwargs(cfg: Config, factory: object, run_dir: Path) -> dict:
    """The agent's arguments: --agent-kwargs, plus the shared settings its constructor accepts."""
    kw = parse_agent_kwargs(cfg.agent_kwargs)
    shared = {"num_simulations": cfg.num_simulations, "seed": cfg.seed, "batch_size": cfg.batch_size,
              "model_path": str(run_dir / "agent.zip")}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    return {**{k: v for k, v in shared.items() if k in params}, **kw}


def record(res: SearchResult, env: gym.Env) -> dict:
    return {"example": res.example, "id": env.examples[res.example].id, "targets": res.targets, "values": res.values,
            "path": res.path, "outcome": res.outcome, "correct": res.correct, "loads": res.loads, "balance": res.balance}


def as_result(rec: dict) -> SearchResult:
    return SearchResult(rec["example"], rec["targets"], rec["values"], rec["path"], rec["outcome"], rec["correct"],
                        rec["loads"], rec["balance"])


def main(cfg: Config) -> dict:
    """Check the settings, take the run folder (one writer at a time), search.

    Under ``torchrun`` the batches of questions are shared out over the processes (one device
    each); rank 0 writes every result, in the order of a single-process run.
    """
    factory, source = check_config(cfg)
    ctx = setup()
    name = cfg.name or f"{source.name if source else cfg.env}-{agents.short_name(cfg.agent)}-s{cfg.seed}"
    run_dir = Path(cfg.logdir) / name
    out_path = Path(cfg.output) if cfg.output else run_dir / "targets.jsonl"
    locks = (RunLock(run_dir), RunLock.for_file(out_path)) if ctx.is_main else ()  # --output may lie outside run_dir
    with contextlib.ExitStack() as stack:
        for lock in locks:
            stack.enter_context(lock)
        return search(cfg, factory, source, name, run_dir, ctx)


def search(cfg: Config, factory: object, source: TaskSource | None, name: str, run_dir: Path,
           ctx: DistContext = DistContext()) -> dict:
    """Stage 2: search every example, writing its targets as it goes (``main`` holds ``run_dir``)."""
    run = set_up(cfg, factory, source, run_dir, ctx)
    finished, todo = resume(cfg, run, ctx)
    fit_agent(cfg, run, todo, run_dir, ctx)
    results = search_examples(cfg, run, finished, todo, ctx)
    if not ctx.is_main:  # rank 0 compares with the router and writes the summary
        run.writer.close()
        return ctx.broadcast(None)
    return ctx.broadcast(write_summary(cfg, run, results, name, run_dir))


@dataclass
class SearchRun:
    """What the set-up hands the search: the env and agent, where results go, the examples."""

    env: gym.Env
    agent: object
    writer: object  # TensorBoard (a NullWriter off rank 0)
    targets: TargetsWriter | None  # rank 0 only
    out_path: Path
    example_ids: list[int]
    widths: list[int]  # experts per group (MoLA: not all E)
    t_start: float


def set_up(cfg: Config, factory: object, source: TaskSource | None, run_dir: Path, ctx: DistContext) -> SearchRun:
    """The agent, the env on the warm-up checkpoint, TensorBoard and the targets file (its header names the run).

    The agent is built before the env: one that cannot be built (or is no agent) is refused before any model loads.
    """
    seed_everything(cfg.seed)
    t_start = time.time()
    if cfg.overwrite and ctx.is_main:  # a trained agent saved by an earlier run (PPO) would otherwise be reused
        (run_dir / "agent.zip").unlink(missing_ok=True)
    agent = agents.make(cfg.agent, **agent_kwargs(cfg, factory, run_dir))
    if ctx.is_main:
        save_config(run_dir, cfg)  # the resolved settings; `train_rl.py --config <run>/config.json` reruns them
    writer = make_writer(run_dir) if ctx.is_main else NullWriter()
    log_hparams(writer, cfg)
    env = gym.make(cfg.env, checkpoint=cfg.checkpoint, split=cfg.split, data_dir=cfg.data_dir, device=str(ctx.device(cfg.device)),
                   balance_weight=cfg.balance_weight, precision=cfg.precision,
                   **({"task": source} if source else {})).unwrapped
    if env.action_mode != "primary":
        raise ValueError("routing targets are per-expert distributions: train_rl.py needs action_mode='primary'")
    agent_config = agent.config() if callable(getattr(agent, "config", None)) else {}
    example_ids = list(range(min(cfg.num_examples, len(env.examples))))
    out_path = Path(cfg.output) if cfg.output else run_dir / "targets.jsonl"
    widths = list(getattr(env, "group_experts", [env.E] * env.G))  # experts per group (MoLA: not all E)
    header = targets_header(cfg, env, agent_config, widths)
    targets = TargetsWriter(out_path, header, overwrite=cfg.overwrite) if ctx.is_main else None
    return SearchRun(env, agent, writer, targets, out_path, example_ids, widths, t_start)


def targets_header(cfg: Config, env: gym.Env, agent_config: dict, widths: list[int]) -> dict:
    return {
        "env_id": cfg.env, "task": env.task, "split": cfg.split, "fingerprint": env.fingerprint,
        "num_groups": env.G, "num_experts": env.E, "num_actions": int(env.action_space.n), "top_k": env.k,
        # Only a MoLA model's files carry per-group counts, so files written before them still resume.
        **({"group_experts": widths} if len(set(widths)) > 1 else {}),
        "action_mode": env.action_mode, "agent": cfg.agent, "agent_config": agent_config,
        "balance_weight": cfg.balance_weight, "checkpoint": str(cfg.checkpoint) if cfg.checkpoint else "default-warmup",
    }


def resume(cfg: Config, run: SearchRun, ctx: DistContext) -> tuple[list[SearchResult], list[int]]:
    """The examples already in the targets file (rank 0 reads it) and those left to search; the finished
    ones count towards the running loads, as when they were searched."""
    env = run.env
    index = {env.examples[i].id: i for i in run.example_ids}
    done = ctx.broadcast({k: r for k, r in run.targets.done.items() if k in index} if run.targets else None)
    finished = [as_result(r) for r in done.values()]
    for res in finished:
        env.finish_episode(res.loads)
    todo = [i for i in run.example_ids if env.examples[i].id not in done]
    ctx.print(f"{cfg.agent} on {cfg.env} (task {env.task}): {len(run.example_ids)} examples, {len(finished)} already in "
              f"{run.out_path}, {len(todo)} to search")
    return finished, todo


def fit_agent(cfg: Config, run: SearchRun, todo: list[int], run_dir: Path, ctx: DistContext) -> None:
    """Train a learning agent (PPO) before it searches, when there is anything left to search."""
    agent = run.agent
    if todo and callable(getattr(agent, "fit", None)) and ctx.world > 1:
        raise ValueError(f"agent {cfg.agent!r} trains before it searches (fit); run it as one process, not under torchrun")
    if todo and callable(getattr(agent, "fit", None)):
        t0 = time.time()
        takes_logdir = "tensorboard_log" in inspect.signature(agent.fit).parameters
        agent.fit(run.env, tensorboard_log=str(run_dir / "agent")) if takes_logdir else agent.fit(run.env)
        run.writer.add_scalar("charts/fit_seconds", time.time() - t0, 0)


def search_examples(cfg: Config, run: SearchRun, finished: list[SearchResult], todo: list[int],
                    ctx: DistContext) -> list[SearchResult]:
    """Search ``todo`` a batch at a time, writing each batch's targets; every result, finished ones first."""
    env = run.env
    results: list[SearchResult] = list(finished)
    bar = tqdm(total=len(run.example_ids), initial=len(finished), desc=f"search ({cfg.agent})", unit="ex",
               disable=not ctx.is_main)
    chunks = [todo[s : s + cfg.batch_size] for s in range(0, len(todo), cfg.batch_size)]
    for step_start in range(0, len(chunks), ctx.world):
        # One batch per rank per step (the batches a single process would search, so the same
        # batched forwards); the running loads then take every rank's results, in batch order.
        step_chunks = chunks[step_start : step_start + ctx.world]
        mine = step_chunks[ctx.rank] if ctx.rank < len(step_chunks) else []
        t0 = time.time()
        own = agents.run_agent(run.agent, env, mine) if mine else []
        seconds = time.time() - t0
        parts = ctx.gather([record(r, env) for r in own])  # [world] lists of records, rank order = batch order
        if ctx.world > 1:
            for r, part in enumerate(parts):
                if r != ctx.rank:  # this rank's own results already count (the agent ended their episodes)
                    for rec in part:
                        env.finish_episode(np.asarray(rec["loads"]))
        recs = [rec for part in parts for rec in part]
        batch = [as_result(rec) for rec in recs] if ctx.world > 1 else own
        if run.targets is not None:
            run.targets.write(recs)
        results += batch
        log_batch(run, results, batch, seconds)
        bar.update(sum(len(c) for c in step_chunks))
    bar.close()
    return results


def log_batch(run: SearchRun, results: list[SearchResult], batch: list[SearchResult], seconds: float) -> None:
    """TensorBoard after a batch (the last of ``results``): each example's return, speed, outcome, the
    search's statistics and the running load balance."""
    writer, step = run.writer, len(results)
    for k, r in enumerate(batch):
        writer.add_scalar("charts/episodic_return", r.total, step - len(batch) + k)
    writer.add_scalar("charts/SPS", len(batch) * run.env.G / max(seconds, 1e-9), step)  # env steps (groups) per second
    writer.add_scalar("charts/outcome_mean", float(np.mean([r.outcome for r in results])), step)
    writer.add_scalar("charts/accuracy", float(np.mean([r.correct for r in results])), step)
    sims = sum(r.extra.get("simulations", 0) for r in batch)
    if sims:
        writer.add_scalar("search/simulations_per_example", sims / len(batch), step)
        # One simulation advances every tree of the batch, so this is per batched simulation.
        writer.add_scalar("search/time_per_simulation_ms", 1e3 * seconds * len(batch) / sims, step)
        writer.add_scalar("search/depth", float(np.mean([r.extra["depth"] for r in batch])), step)
        writer.add_scalar("search/visit_share_of_chosen", float(np.mean([r.targets.max(1).mean() for r in batch])), step)
    summary = agents.summarize(results, run.widths)
    for g in range(run.env.G):
        writer.add_scalar(f"routing/cv_group_{g}", summary["cv"][g], step)
        for e in range(run.widths[g]):
            writer.add_scalar(f"routing/load_share_g{g}_e{e}", summary["load_share"][g][e], step)
    writer.add_scalar("routing/cv_mean", summary["cv_mean"], step)


def write_summary(cfg: Config, run: SearchRun, results: list[SearchResult], name: str, run_dir: Path) -> dict:
    """Rank 0: the searched paths vs the learned router's own greedy paths, summary.json and load heatmaps."""
    env, widths = run.env, run.widths
    summary = {"agent": agents.summarize(results, widths)}
    if cfg.compare_router:
        saved = env.load_stats.copy()
        env.load_stats[:] = 0.0  # the router's paths, scored from the same starting loads as the search
        summary["router"] = agents.summarize(agents.run_agent(agents.make("router"), env, run.example_ids), widths)
        env.load_stats = saved
    # The search saw each question's answer: its numbers say how good routes exist, not how well a
    # router would do on questions it has not seen. Said in the file and on the console, next to them.
    summary.update(config=asdict(cfg), targets=str(run.out_path), name=name, wall_time_s=time.time() - run.t_start,
                   hindsight=True, note=hindsight_note(cfg.split, cfg.compare_router))
    rows = {k: v for k, v in summary.items() if k in ("agent", "router")}
    pngs = []
    print(f"{len(results)} {cfg.split} questions: searched paths ({cfg.agent})"
          + (" vs the learned router's own greedy paths" if "router" in rows else ""))
    for who, s in rows.items():
        pngs.append(run_dir / f"loads_{who}.png")
        fig = load_heatmap(s["load_share"], [f"group {g}" for g in range(env.G)], f"{who}: expert-load shares of chosen paths",
                           pngs[-1])
        run.writer.add_figure(f"routing/loads_{who}", fig, len(results))
        print(f"{who:>7}: outcome (log p correct) {s['outcome_mean']:.4f}  accuracy {s['accuracy']:.3f}  "
              f"load CV {s['cv_mean']:.3f} (per group {', '.join(f'{c:.3f}' for c in s['cv'])})")
    print(summary["note"])
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    run.writer.close()
    print(f"targets:       {run.out_path}\n"
          f"summary:       {run_dir / 'summary.json'}\n"
          f"TensorBoard:   {run_dir}  (tensorboard --logdir {run_dir})\n"
          f"load heatmaps: {', '.join(map(str, pngs))}")
    return summary


def hindsight_note(split: str, compared: bool = True) -> str:
    """What the summary's numbers are: a search with the answer known, not a held-out score."""
    router = "; the router's greedy paths are scored on the same questions" if compared else ""
    return (f"note: these are {split} questions searched knowing the answer (hindsight){router}. This is not a "
            "held-out accuracy: whether the targets help shows in stage 3 (finetune.py --method layermoe "
            "--targets ...) on dev and test.")
