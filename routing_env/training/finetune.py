"""Fine-tune a LoRA or LoRA-MoE multiple-choice model: LayerMoE's warm-up (stage 1) and its
process-supervised fine-tune (stage 3).

    python finetune.py --task arc-easy --method lora-moe --epochs 2
    python finetune.py --task arc-easy --method layermoe --init-checkpoint runs/w/final --targets targets.jsonl

Reads top to bottom like the algorithm: set-up, data, model (fresh adapters, or for ``layermoe`` the
warm-up checkpoint and its routing targets), then epochs of (train, evaluate on dev, checkpoint), and
a final test evaluation written to ``runs/<name>/results.json``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from routing_env.common.configs import COMPILE_MODES, ROUTE_LOSS_GRADS
from routing_env.common.configs import FinetuneConfig as Config  # the settings, torch-free for the command line
from routing_env.data import MCBatch, TaskSource, describe_split, move, resolve_task
from routing_env.common.distributed import DistContext, NullWriter, setup
from routing_env.training.evaluation import encode_split, evaluate, iterate_indices
from routing_env.training.graphs import compile_net
from routing_env.moe.balancing import make_strategy
from routing_env.moe import (MoEConfig, RoutingPlan, RoutingRecorder, build_model, load_checkpoint, model_fingerprint,
                             moe_layers, save_checkpoint)
from routing_env.common.plots import load_heatmap
from routing_env.common.results import dumps_record
from routing_env.common.identity import check_same_run, provenance
from routing_env.common.safefiles import RunLock, atomic_write_text, check_run_name
from routing_env.training.supervision import TargetTable, forced_route_bias, group_agreement, routing_loss
from routing_env.targets import TargetsError, load_targets
from routing_env.training.step import (StepRecord, finish_step, guarded_update, load_optimizer_state, make_adamw,
                                       step_values, to_host)
from routing_env.training.train_state import NonFiniteLoss, check_paired, last_checkpoint, load_training_state, save_epoch
from routing_env.common.utils import autocast, autocast_dtype, log_hparams, make_writer, save_config, seed_everything

__all__ = ["Config", "NonFiniteLoss", "check_config", "main", "moe_config", "train"]


def moe_config(cfg: Config) -> MoEConfig:
    targets = cfg.target_modules
    return MoEConfig(
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        num_experts=cfg.num_experts[0] if len(cfg.num_experts) == 1 else cfg.num_experts,
        top_k=cfg.top_k,
        rank=cfg.rank,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        num_groups=cfg.num_groups,
        group_sizes=cfg.group_sizes,
        balance=cfg.balance,
    )


def set_backbone_dropout(model: torch.nn.Module, p: float) -> None:
    """Set every dropout of the backbone itself to ``p`` (the adapters' own dropout is ``--dropout``)."""
    adapter_dropouts = {id(m.dropout) for m in moe_layers(model)}
    for name, m in model.backbone.named_modules():
        if isinstance(m, torch.nn.Dropout) and id(m) not in adapter_dropouts and "lora_dropout" not in name:
            m.p = p


def log_routing(writer, model, stats, tag: str, step: int, run_dir: Path) -> None:
    """``routing_<split>/cv_layer_<i>`` (and balance) scalars and an expert-load heatmap (PNG + TensorBoard image)."""
    if not stats:
        return
    split = tag.split("_")[0]  # dev and test curves under their own tags, never one tag at one step
    for layer, s in stats.items():
        writer.add_scalar(f"routing_{split}/cv_layer_{layer}", s.cv, step)
        writer.add_scalar(f"routing_{split}/max_over_mean_layer_{layer}", s.max_over_mean, step)
        writer.add_scalar(f"routing_{split}/norm_entropy_layer_{layer}", s.norm_entropy, step)
    fig = load_heatmap([s.loads for s in stats.values()], [f"layer {i}" for i in stats],
                       f"expert load, {tag}", run_dir / f"expert_load_{tag}.png")
    writer.add_figure(f"routing_{split}/expert_load", fig, step)


def check_config(cfg: Config) -> TaskSource:
    """Refuse settings that cannot train (naming the flag), before any folder or model is made."""
    for flag, value, least in (("epochs", cfg.epochs, 1), ("batch-size", cfg.batch_size, 1),
                               ("eval-batch-size", cfg.eval_batch_size, 1), ("max-length", cfg.max_length, 8),
                               ("top-k", cfg.top_k, 1), ("rank", cfg.rank, 1), ("log-every", cfg.log_every, 1)):
        if value < least:
            raise ValueError(f"--{flag} must be at least {least}, got {value}")
    for flag, value in (("train-limit", cfg.train_limit), ("eval-limit", cfg.eval_limit)):
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be at least 1 (or none for all), got {value}")
    autocast_dtype(cfg.precision, "cpu")  # an unknown --precision, before any work
    make_strategy(cfg.balance)  # an unknown --balance or a clash, before any work
    if not cfg.lr > 0 or not np.isfinite(cfg.lr):
        raise ValueError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.compile not in COMPILE_MODES:
        raise ValueError(f"unknown --compile {cfg.compile!r}; valid: {', '.join(COMPILE_MODES)}")
    if cfg.route_loss_grad not in ROUTE_LOSS_GRADS:
        raise ValueError(f"--route-loss-grad {cfg.route_loss_grad!r} is not one of {', '.join(ROUTE_LOSS_GRADS)}")
    if cfg.method == "layermoe" and (not cfg.init_checkpoint or not cfg.targets):
        raise ValueError("--method layermoe needs --init-checkpoint (the warm-up) and --targets (from train_rl.py)")
    if cfg.method == "layermoe" and not (Path(cfg.init_checkpoint) / "adapter_config.json").is_file():
        raise ValueError(f"--init-checkpoint {cfg.init_checkpoint} is not a checkpoint folder (no adapter_config.json); "
                         "pass a lora-moe run's checkpoints/epoch_<n> (paired) or final/ folder")
    if cfg.method == "layermoe" and not Path(cfg.targets).is_file():
        raise ValueError(f"--targets {cfg.targets}: no such file; make it with train_rl.py on the --init-checkpoint")
    state_file = Path(cfg.init_checkpoint or "") / "training_state.pt"
    if cfg.method == "layermoe" and state_file.is_file():  # an epoch checkpoint: stage 3 continues that run
        state = torch.load(state_file, weights_only=False, map_location="cpu")
        # Checked here, before the run folder gets its config.json: a refused run must leave nothing
        # behind that would refuse the corrected command as "made with other settings".
        check_paired(cfg, state.get("config"), Path(cfg.init_checkpoint))
        done = state["epoch"] + 1
        if done >= cfg.epochs:  # stage 3 would train 0 steps and report the base model as layermoe
            raise ValueError(f"--init-checkpoint {cfg.init_checkpoint} is after epoch {done} of the run, and --epochs is "
                             f"{cfg.epochs}: stage 3 would have nothing left to train; pass an earlier epoch checkpoint "
                             "(the warm-up) or more --epochs (for both runs)")
    if cfg.name is not None:
        check_run_name(cfg.name)
    return resolve_task(cfg.task, cfg.train_file, cfg.dev_file, cfg.test_file)


def main(cfg: Config) -> dict:
    """Check the settings, take the run folder (one writer at a time), train, test.

    Under ``torchrun`` every process trains its share of each batch (DDP) and rank 0 writes.
    """
    source = check_config(cfg)
    ctx = setup()
    if cfg.batch_size < ctx.world:
        raise ValueError(f"--batch-size {cfg.batch_size} is below the {ctx.world} processes; each needs a question per step")
    name = cfg.name or f"{source.name}-{cfg.method}-s{cfg.seed}"
    run_dir = Path(cfg.logdir) / name
    with RunLock(run_dir) if ctx.is_main else contextlib.nullcontext():
        if cfg.resume and (run_dir / "config.json").is_file():  # the settings this folder's run was made with
            check_same_run(cfg, json.loads((run_dir / "config.json").read_text()), run_dir,
                           "give these settings another --name, rerun with the stored ones (--config "
                           f"{run_dir / 'config.json'}), or pass --resume false to discard that run and start again")
        return train(cfg, source, name, run_dir, ctx)


@dataclass
class Run:
    """Everything one training run holds: what ``set_up`` and ``build`` make, what the loop advances."""

    cfg: Config
    ctx: DistContext
    source: TaskSource
    name: str
    run_dir: Path
    device: torch.device
    amp: torch.dtype | None  # autocast dtype (None: fp32)
    writer: Any
    t_start: float
    data: dict[str, list] = field(default_factory=dict)  # "train", "dev", "test" examples
    model: Any = None  # the MCModel
    net: Any = None  # the model, or its DDP wrapper, compiled under --compile (what the training forward calls)
    width_multiple: int = 1  # training batches' widths rounded up to a multiple of it (--compile: few shapes)
    tokenizer: Any = None
    encoded: dict[str, Any] = field(default_factory=dict)  # split -> its EncodedSplit (tokenised once, at set-up)
    params: list = field(default_factory=list)  # the trainable parameters
    optimizer: Any = None
    scheduler: Any = None
    table: TargetTable | None = None  # layermoe's routing targets (None: no routing loss)
    covered: int = 0  # training questions with a target
    steps_per_epoch: int = 0
    total_steps: int = 0
    history: list[dict] = field(default_factory=list)  # one record per finished epoch
    start_epoch: int = 0
    step: int = 0  # optimiser steps taken
    stage3_start: int = 0  # the step this process started training at (teacher forcing anneals from it)
    use_aux: bool = False  # collect the balance terms (the Switch loss on, or a strategy with its own)
    pending: StepRecord | None = None  # the last step, its values on their way to the host (read at the next)

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"


@dataclass
class EpochCurve:
    """An epoch's training curve for the record (TensorBoard has every step): the task loss from the
    per-step host value, the routing loss and agreement summed on the device (no extra sync)."""

    device: torch.device
    task: float = 0.0
    steps: int = 0
    route: torch.Tensor | None = None
    agree: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.route, self.agree = torch.zeros((), device=self.device), torch.zeros((), device=self.device)

    def summary(self, stage3: bool) -> dict:
        out = {"task_loss": self.task / max(self.steps, 1)}
        if stage3:
            n = max(self.steps, 1)
            out |= {"route_loss": float(self.route) / n, "route_agreement": float(self.agree) / n}
        return out


@dataclass
class StepLosses:
    """One training step's loss terms (``route``: stage 3's routing loss and what it compared)."""

    task: torch.Tensor
    aux: torch.Tensor
    total: torch.Tensor
    route: torch.Tensor | None = None
    agreement: torch.Tensor | None = None  # [G] share of targeted examples whose router argmax is the target's


def train(cfg: Config, source: TaskSource, name: str, run_dir: Path, ctx: DistContext = DistContext()) -> dict:
    """The run itself (``main`` has checked ``cfg`` and holds ``run_dir``): set-up, model, resume, then
    per epoch one pass over the training set and (rank 0) a dev evaluation and checkpoint; a test last."""
    run = prepare(cfg, source, name, run_dir, ctx)
    for epoch in range(run.start_epoch, cfg.epochs):
        curve = train_epoch(run, epoch)
        if not ctx.is_main:  # rank 0 evaluates and checkpoints; the others wait
            ctx.barrier()
            continue
        evaluate_and_checkpoint(run, epoch, curve)
        ctx.barrier()
    if not ctx.is_main:  # rank 0 tests and writes; every rank returns its results
        return ctx.broadcast(None)
    return test_and_report(run)


# ---- set-up --------------------------------------------------------------------------------------

def prepare(cfg: Config, source: TaskSource, name: str, run_dir: Path, ctx: DistContext) -> Run:
    """A run ready for its first epoch: set-up, model (and targets), optimiser, resume, the training wrapper."""
    run = set_up(cfg, source, name, run_dir, ctx)
    build_model_and_targets(run)
    build_optimiser(run)
    resume(run)
    start_training(run)
    return run


def set_up(cfg: Config, source: TaskSource, name: str, run_dir: Path, ctx: DistContext) -> Run:
    """Seed, device, config file, writer and the data splits."""
    ckpt_root = run_dir / "checkpoints"
    if ctx.is_main and not cfg.resume and ckpt_root.is_dir():  # starting again: no stale epoch may be resumed later
        shutil.rmtree(ckpt_root)
    ctx.barrier()
    seed_everything(cfg.seed)
    device = ctx.device(cfg.device)
    amp = autocast_dtype(cfg.precision, device)
    if ctx.is_main:
        save_config(run_dir, cfg)  # the resolved settings; `finetune.py --config <run>/config.json` reruns them
    writer = make_writer(run_dir) if ctx.is_main else NullWriter()
    log_hparams(writer, cfg)
    run = Run(cfg, ctx, source, name, run_dir, device, amp, writer, time.time())
    run.data = {split: source.load(split, cfg.data_dir, limit=limit) for split, limit in
                (("train", cfg.train_limit), ("dev", cfg.eval_limit), ("test", cfg.eval_limit))}
    ctx.print(describe_split(source, {split: len(exs) for split, exs in run.data.items()}))
    return run


def build_model_and_targets(run: Run) -> None:
    """Fresh adapters, or for ``layermoe`` the warm-up checkpoint and its routing targets."""
    cfg = run.cfg
    if cfg.method == "layermoe":
        run.model = load_checkpoint(cfg.init_checkpoint).to(run.device)
        load_target_table(run)
    else:
        run.model = build_model(cfg.method, cfg.backbone, moe_config(cfg), seed=cfg.seed).to(run.device)
    if cfg.backbone_dropout is not None:
        set_backbone_dropout(run.model, cfg.backbone_dropout)
    run.tokenizer = run.model.tokenizer_for(run.model.backbone_name)
    # Each split tokenised once (on the GPU when there is one): a step's batch is then an index and a
    # slice. Rank 0 alone evaluates, so the others encode the training split only.
    run.encoded = {split: encode_split(run.model, run.tokenizer, exs, cfg.max_length, run.device)
                   for split, exs in run.data.items() if exs and (split == "train" or run.ctx.is_main)}


def load_target_table(run: Run) -> None:
    """The routing targets, checked against exactly this model (same tensors, groups, experts) and the train split."""
    cfg, model, train_set = run.cfg, run.model, run.data["train"]
    if not moe_layers(model):
        raise ValueError(f"--init-checkpoint {cfg.init_checkpoint} is not a lora-moe checkpoint; layermoe continues one")
    layers = moe_layers(model)
    group_experts = [max(m.num_experts for m in layers if m.group == g) for g in range(model.moe_config.num_groups)]
    E = max(group_experts)
    table = TargetTable(load_targets(cfg.targets), {
        "task": run.source.name, "fingerprint": model_fingerprint(model), "num_groups": model.moe_config.num_groups,
        "num_experts": E, "num_actions": E,
        **({"group_experts": group_experts} if len(set(group_experts)) > 1 else {})}, cfg.route_weighting,
        cfg.target_balance, cfg.target_form, cfg.target_temperature)
    split = table.header.get("split", "train")
    if split != "train":  # stage 3 trains on training questions: none would have a target
        raise TargetsError(f"{cfg.targets}:1: the targets were searched on the {split!r} split, stage 3 trains on "
                           "'train'; search the training split (train_rl.py --split train)")
    covered = sum(e.id in table.targets for e in train_set)
    if covered == 0:
        raise TargetsError(f"{cfg.targets}: none of the {len(train_set)} training questions has a target (the file's "
                           f"{len(table)} ids are other questions); search this task's training split on "
                           f"{cfg.init_checkpoint}")
    run.ctx.print(f"layermoe: routing targets for {covered} of {len(train_set)} training questions from {cfg.targets}")
    hist = table.histogram()
    run.ctx.print("layermoe: mean target per expert, by group: " + "; ".join(
        f"g{g} [{', '.join(f'{x:.2f}' for x in row)}]" for g, row in enumerate(hist)))
    run.table, run.covered = table, covered


def build_optimiser(run: Run) -> None:
    """AdamW over the trainable parameters and the linear warm-up schedule over every epoch's steps."""
    cfg = run.cfg
    run.params = [p for p in run.model.parameters() if p.requires_grad]
    run.optimizer = make_adamw(run.params, cfg.lr, cfg.weight_decay)
    run.steps_per_epoch = -(-len(run.data["train"]) // cfg.batch_size)
    run.total_steps = run.steps_per_epoch * cfg.epochs
    run.scheduler = get_linear_schedule_with_warmup(run.optimizer, int(cfg.warmup_ratio * run.total_steps), run.total_steps)


def resume(run: Run) -> None:
    """Adapters, optimiser, schedule and RNG from the last finished epoch.

    Of this run (--resume), else, for layermoe, of the lora-moe run whose epoch checkpoint it
    continues: the paired design, in which stage 3 is that run's remaining epochs plus the routing
    loss, so with beta 0 it *is* that run.
    """
    cfg, ctx = run.cfg, run.ctx
    done = last_checkpoint(run.model, run.ckpt_root) if cfg.resume else None
    paired = run.table is not None and done is None and (Path(cfg.init_checkpoint) / "training_state.pt").is_file()
    if done or paired:
        last, state = done or (Path(cfg.init_checkpoint), load_training_state(Path(cfg.init_checkpoint)))
        if paired:
            check_paired(cfg, state.get("config"), last)  # (check_config refused one with no epoch left)
        elif state.get("config") is not None:  # this run's own checkpoint: made with these settings?
            check_same_run(cfg, state["config"], last, "give these settings another --name, or pass --resume false "
                           "to discard that run and start again")
        load_optimizer_state(run.optimizer, state["optimizer"])  # (a checkpoint of the per-parameter AdamW too)
        run.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and run.device.type == "cuda":  # dropout on the GPU draws from here
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        run.history, run.start_epoch = state["history"], state["epoch"] + 1
        ctx.print(f"{'continuing the run of' if paired else 'resuming'} {last} after epoch {state['epoch'] + 1}"
                  f"{' with the routing loss (paired design)' if paired else ''}")
    elif run.table is not None:
        ctx.print(f"layermoe: {cfg.init_checkpoint} has no training_state.pt, so stage 3 starts a fresh optimiser and "
                  "schedule (not paired with a lora-moe run; pass an epoch checkpoint of one to pair them)")


def start_training(run: Run) -> None:
    """Which loss terms the forwards collect, the first step, and the DDP wrapper under ``torchrun``."""
    cfg, model = run.cfg, run.model
    strategy = model.routing.strategy if cfg.method in ("lora-moe", "layermoe") else None
    # Loss terms are collected when the Switch loss is on (the default strategy) or a strategy has its own.
    run.use_aux = cfg.method in ("lora-moe", "layermoe") and (cfg.aux_loss_coef > 0 or strategy is not None)
    run.step = run.stage3_start = run.start_epoch * run.steps_per_epoch  # teacher forcing anneals over this run's steps
    run.net = model
    if run.ctx.world > 1:
        run.net = DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    run.net, run.width_multiple = compile_net(run.net, cfg.compile)



# ---- train ---------------------------------------------------------------------------------------

def train_epoch(run: Run, epoch: int) -> EpochCurve:
    """One pass over the shuffled training set, one optimiser step per batch."""
    cfg, ctx = run.cfg, run.ctx
    if ctx.world > 1:
        # Same initial adapters on every rank (seeded; DDP also broadcasts rank 0's), but each rank
        # its own dropout stream, reseeded from (seed, rank, epoch) at every epoch: the checkpoint
        # holds rank 0's RNG only, so a resumed run must not depend on the other ranks' state.
        torch.manual_seed(cfg.seed * 1_000_003 + ctx.rank * 7919 + epoch)
    # Teacher forcing's own stream (the paired runs' RNG untouched), per epoch so a resume draws the same.
    forcing_rng = np.random.default_rng([cfg.seed, 0x7F, epoch])
    run.model.train()
    # Shuffle order is a function of (seed, epoch) alone, so a resumed run sees the same batches.
    rng = np.random.default_rng([cfg.seed, epoch])
    bar = tqdm(iterate_indices(len(run.data["train"]), cfg.batch_size, rng), total=run.steps_per_epoch,
               desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not ctx.is_main)
    curve = EpochCurve(run.device)
    for global_idx in bar:
        # The global batch is --batch-size whatever the world size; each rank takes every
        # world-th question of it (a last batch smaller than the world is skipped by all ranks).
        if len(global_idx) < ctx.world:
            continue
        task_value = train_step(run, global_idx, epoch, forcing_rng, curve)
        if task_value is not None:  # the previous step's, read without waiting for this one
            bar.set_postfix(loss=f"{task_value:.3f}")
    finish_step(run, curve)  # the epoch's last step: read, checked (a stop names it) and logged
    return curve


def train_step(run: Run, global_idx: np.ndarray, epoch: int, forcing_rng: np.random.Generator,
               curve: EpochCurve) -> float | None:
    """Forward under this step's routing plan, the losses, backward, the update (a no-op on the device
    when the loss or gradient norm is not finite) and the copy of its values to the host; no host sync.
    In between, the previous step's values are read, checked and logged (``step.finish_step``), so
    this returns the previous step's task loss (mean over the ranks; None at an epoch's first step)."""
    cfg, ctx, model = run.cfg, run.ctx, run.model
    batch = run.encoded["train"].batch(global_idx[ctx.rank :: ctx.world], width_multiple=run.width_multiple)
    plan = step_plan(run, batch, len(batch), forcing_rng)
    with model.routed(plan) as rec, autocast(run.device, run.amp):
        logits = run.net(batch).float()  # [B, C]
    losses = step_losses(run, logits, batch, len(batch), len(global_idx), rec)
    if losses.route is not None:
        curve.route += losses.route.detach()
        curve.agree += losses.agreement.mean()
    run.optimizer.zero_grad(set_to_none=True)
    losses.total.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm, foreach=True)
    # A finite loss can still give an infinite gradient (NaN adapters after the step): both are checked.
    values = step_values(ctx.mean, losses.task, losses.total, grad_norm, losses.aux, losses.route, losses.agreement)
    previous = finish_step(run, curve)  # before this update: a stop there leaves the model as before that step
    record = dict(scheduler_state=run.scheduler.state_dict(), lrs=[g["lr"] for g in run.optimizer.param_groups])
    guarded_update(run.optimizer, values[3])
    run.scheduler.step()
    run.step += 1
    run.pending = StepRecord(run.step, epoch, batch.ids, *to_host(values), **record,
                             lr_after=run.scheduler.get_last_lr()[0])
    return previous


def step_plan(run: Run, batch: MCBatch, num_examples: int, forcing_rng: np.random.Generator) -> RoutingPlan:
    """The routing of one training forward: the balance terms, stage 3's route sums and teacher forcing.

    Teacher-forced routing: a share of the targeted examples (annealed to 0 by the end of stage 3)
    runs the task loss through its searched route.
    """
    cfg, table = run.cfg, run.table
    bias = {}
    if table is not None and cfg.teacher_forcing > 0:
        share = cfg.teacher_forcing * (1 - (run.step - run.stage3_start) / max(run.total_steps - run.stage3_start, 1))
        paths = table.batch_paths(batch.ids)  # [B, G]
        paths[torch.from_numpy(forcing_rng.random(num_examples) >= share)] = -1
        row_example = run.model.row_examples(batch)  # [R]
        bias = forced_route_bias(move(paths, run.device), row_example, table.group_experts)  # (non-blocking)
    return RoutingPlan(selection_bias=bias, compute_aux=run.use_aux, collect_route=table is not None,
                       route_grad_router_only=cfg.route_loss_grad == "router")


def step_losses(run: Run, logits: torch.Tensor, batch: MCBatch, num_examples: int, global_size: int,
                rec: RoutingRecorder) -> StepLosses:
    """Task loss, the balance terms the forward recorded and, in stage 3, the routing loss toward the targets."""
    cfg, ctx, table = run.cfg, run.ctx, run.table
    if ctx.world == 1:
        task_loss = F.cross_entropy(logits, batch.labels)
    else:  # this rank's sum over the global batch's size: DDP's mean of gradients is the global mean's
        task_loss = F.cross_entropy(logits, batch.labels, reduction="sum") * ctx.world / global_size
    aux_loss = torch.stack(rec.aux_losses).mean() if rec.aux_losses else torch.zeros((), device=logits.device)
    loss = task_loss + cfg.aux_loss_coef * aux_loss
    if rec.balance_losses:  # each strategy's own weighted term, averaged over the MoE modules
        loss = loss + torch.stack(rec.balance_losses).sum() / len(moe_layers(run.model))
    if table is None:
        return StepLosses(task_loss, aux_loss, loss)
    # Stage 3: pull each group's router toward the example's target.
    probs = rec.example_group_probs(num_examples)  # [B, G, E]
    tgt, w = (move(x, run.device) for x in table.batch(batch.ids))  # [B, G, E], [B, G]; non-blocking copies
    logp = rec.example_group_probs(num_examples, log=True) if cfg.route_granularity == "token" else None
    route_loss = routing_loss(probs, tgt, w, logp)
    agreement = group_agreement(probs.detach(), tgt, w)  # once a step: the epoch curve and the step's log read it
    return StepLosses(task_loss, aux_loss, loss + cfg.beta * route_loss, route_loss, agreement)


# ---- evaluate, checkpoint, test --------------------------------------------------------------------

def evaluate_and_checkpoint(run: Run, epoch: int, curve: EpochCurve) -> None:
    """Rank 0 after each epoch: dev accuracy and loads, the epoch's record, the epoch checkpoint."""
    cfg, writer = run.cfg, run.writer
    res = evaluate(run.model, run.tokenizer, run.encoded.get("dev", run.data["dev"]), batch_size=cfg.eval_batch_size, max_length=cfg.max_length,
                   device=run.device, desc="dev", amp_dtype=run.amp)
    if not np.isfinite(res.loss):  # adapters gone non-finite by a path the step checks did not see
        raise NonFiniteLoss(f"the dev loss after epoch {epoch + 1} is {res.loss} (adapters not finite); no "
                            f"checkpoint or results were written for it. Lower --lr or check the inputs; "
                            f"epoch {epoch} is the last good checkpoint in {run.ckpt_root}")
    writer.add_scalar("eval/accuracy", res.accuracy, run.step)
    writer.add_scalar("eval/loss", res.loss, run.step)
    log_routing(writer, run.model, res.layer_stats, f"dev_epoch{epoch + 1}", run.step, run.run_dir)
    # The per-question block of dev for the last epoch only (the model the run ends with; earlier
    # epochs' blocks would multiply the committed records' size for no paired comparison).
    run.history.append({"epoch": epoch + 1, "step": run.step, "train": curve.summary(run.table is not None),
                        "dev": res.summary(questions=epoch + 1 == cfg.epochs), "elapsed_s": time.time() - run.t_start})
    print(f"epoch {epoch + 1}: dev accuracy {res.accuracy:.4f} (loss {res.loss:.4f})")
    save_epoch(run.model, run.optimizer, run.scheduler, run.ckpt_root / f"epoch_{epoch + 1}", epoch, run.history, cfg,
               run.source.name, run.device)


def test_and_report(run: Run) -> dict:
    """Rank 0 at the end: the test evaluation, the final checkpoint and ``results.json``."""
    cfg, writer, table = run.cfg, run.writer, run.table
    test_res = None
    if cfg.eval_test:
        test_res = evaluate(run.model, run.tokenizer, run.encoded.get("test", run.data["test"]), batch_size=cfg.eval_batch_size,
                            max_length=cfg.max_length, device=run.device, desc="test", amp_dtype=run.amp)
        if not np.isfinite(test_res.loss):
            raise NonFiniteLoss(f"the test loss is {test_res.loss} (adapters not finite); no results were written")
        writer.add_scalar("eval/test_accuracy", test_res.accuracy, run.step)
        log_routing(writer, run.model, test_res.layer_stats, "test", run.step, run.run_dir)
    final = save_checkpoint(run.model, run.run_dir / "final", extra={
        "task": run.source.name, "seed": cfg.seed, "test_accuracy": test_res.accuracy if test_res else None})
    results = {
        "name": run.name,
        "task": run.source.name,
        "method": cfg.method,
        "test": test_res.summary() if test_res else None,
        "history": run.history,
        "wall_time_s": time.time() - run.t_start,
        "checkpoint": str(final),
        "targets_coverage": None if table is None else run.covered / len(run.data["train"]),
        "targets_histogram": None if table is None else table.histogram().tolist(),
        "config": asdict(cfg),
        "provenance": provenance(),
    }
    atomic_write_text(run.run_dir / "results.json", dumps_record(results))
    writer.close()
    if test_res:
        print(f"test accuracy {test_res.accuracy:.4f} on {test_res.n} questions; results in {run.run_dir / 'results.json'}")
    return run.ctx.broadcast(results)
