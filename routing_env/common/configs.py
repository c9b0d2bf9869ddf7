"""The settings of every command line, one dataclass each, and the valid choices they list.

Imports nothing heavy (no torch, transformers or model code): a script parses its flags and answers
``--help`` from here, then imports the module that does the work. The modules keep their names for
them (``routing_env.training.finetune.Config`` is ``FinetuneConfig``, ``routing_env.search.run.Config`` is
``SearchConfig``; ``pipeline.PipelineConfig``, ``compare.CompareConfig``).

The choices that live in heavy modules (task names, methods, strategies, target options) are listed
again here; tests/test_cli.py checks that each list equals its source, so they cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from routing_env.common.cli import cfg_field
from routing_env.registration import ENV_IDS  # gymnasium, which the package import loads anyway

__all__ = ["AGENT_NAMES", "FinetuneConfig", "SearchConfig", "PipelineConfig", "CompareConfig", "PRECISIONS", "TASK_NAMES", "METHODS",
           "DEFAULT_BACKBONE", "STRATEGY_NAMES", "WEIGHTINGS", "TARGET_FORMS", "GRANULARITIES", "TARGET_BALANCING",
           "ROUTE_LOSS_GRADS"]

#: the registered agents (agents.AGENTS), for --help: the agents package sits above this one
AGENT_NAMES = ("mcts", "exhaustive", "ppo", "router", "random", "round-robin", "known-route")
#: ``--precision`` values (routing_env.common.utils.autocast_dtype maps them to a dtype)
PRECISIONS = ("auto", "fp32", "bf16")
#: built-in task names (routing_env.data.task_names())
TASK_NAMES = ("arc-easy", "arc-challenge", "obqa", "race", "mix4")
#: fine-tune methods of stage 1 (routing_env.moe.METHODS); finetune also takes "layermoe" (stage 3)
METHODS = ("lora", "lora-moe")
#: the packaged backbone (routing_env.moe.DEFAULT_BACKBONE)
DEFAULT_BACKBONE = "minilm"
#: routing / balancing strategies, in their registry's order (routing_env.moe.balancing.STRATEGIES)
STRATEGY_NAMES = ("aux", "z-loss", "loss-free", "top-p", "sinkhorn", "bip", "loramoe", "dynmole", "mar", "rmoe")
#: stage-3 target options (routing_env.training.supervision: WEIGHTINGS, TARGET_FORMS, GRANULARITIES, TARGET_BALANCING)
WEIGHTINGS = ("none", "value-gap")
TARGET_FORMS = ("file", "onehot", "softmax")
GRANULARITIES = ("group", "token")
#: which parameters the routing loss trains: the routers and, through their inputs, the adapters below
#: them (all), or the routers' own weights alone (router)
ROUTE_LOSS_GRADS = ("all", "router")
TARGET_BALANCING = ("none", "sinkhorn")


@dataclass
class FinetuneConfig:
    """Fine-tune LoRA / LoRA-MoE adapters on a multiple-choice task."""

    task: str = cfg_field("arc-easy", f"task: a name ({', '.join(TASK_NAMES)}), a folder of train/dev/test "
                          ".jsonl[.gz] files, or one file (split 80/10/10 by question-id hash)")
    train_file: str | None = cfg_field(None, "your own training split (with --dev-file and --test-file; overrides --task)")
    dev_file: str | None = cfg_field(None, "your own dev split (model selection and ablations read it)")
    test_file: str | None = cfg_field(None, "your own test split (read once, at the end)")
    method: str = cfg_field("lora-moe", "lora / lora-moe (stage 1), or layermoe: continue a lora-moe warm-up "
                            "with routing targets (stage 3)", choices=[*METHODS, "layermoe"])
    backbone: str = cfg_field(DEFAULT_BACKBONE, "'minilm' (packaged, offline), a local folder or a hub id")
    data_dir: str | None = cfg_field(None, "data folder (default: $ROUTING_ENV_DATA, else the Hugging Face hub)")
    epochs: int = cfg_field(2, "passes over the training split")
    batch_size: int = cfg_field(16, "questions per optimiser step")
    lr: float = cfg_field(1e-3, "peak learning rate (AdamW, linear warm-up then decay)")
    weight_decay: float = cfg_field(0.0, "AdamW weight decay")
    warmup_ratio: float = cfg_field(0.06, "share of the steps spent warming the learning rate up")
    max_grad_norm: float = cfg_field(1.0, "gradient clipping norm")
    max_length: int = cfg_field(128, "token limit of one (question, choice) input")
    num_experts: list[int] = cfg_field([4], "experts per layer: one number, or one per layer (MoLA), comma-separated")
    top_k: int = cfg_field(2, "experts per token")
    rank: int = cfg_field(8, "LoRA rank of each expert")
    alpha: float = cfg_field(16.0, "LoRA alpha (scale = alpha / rank)")
    dropout: float = cfg_field(0.05, "dropout on the adapter input")
    backbone_dropout: float | None = cfg_field(None, "the backbone's own dropout (hidden states, attention) while "
                                               "training; none keeps its config's (MiniLM: 0.1)")
    target_modules: list[str] = cfg_field(["all-linear"], "linear layers to adapt: all-linear, or names (query,value,...)")
    num_groups: int = cfg_field(3, "contiguous layer groups (the routing MDP's steps)")
    group_sizes: list[int] | None = cfg_field(None, "explicit layer-group sizes, e.g. 2,2,1,1 (overrides num-groups)")
    aux_loss_coef: float = cfg_field(0.01, "weight of the Switch balance loss (lora-moe, layermoe)")
    balance: str = cfg_field("aux", f"lora-moe routing / balancing strategy: {', '.join(STRATEGY_NAMES)}, combined with "
                             "'+' (e.g. loss-free+z-loss); aux is the Switch loss at --aux-loss-coef. layermoe keeps "
                             "its checkpoint's")
    init_checkpoint: str | None = cfg_field(None, "layermoe: the warm-up checkpoint to continue (its adapter settings are "
                                            "used); an epoch checkpoint of a lora-moe run continues that run's optimiser, "
                                            "schedule and RNG (paired design: only the routing loss differs)")
    targets: str | None = cfg_field(None, "layermoe: routing-targets file from train_rl.py for that checkpoint")
    beta: float = cfg_field(1.0, "layermoe: weight of the routing loss KL(target || group router distribution)")
    route_weighting: str = cfg_field("none", "layermoe: weight each (example, group) term equally, or by the spread "
                                     "of its process values", choices=list(WEIGHTINGS))
    target_form: str = cfg_field("file", "layermoe: targets as the agent wrote them, a one-hot of the best-valued "
                                 "action, or a softmax of the process values at --target-temperature",
                                 choices=list(TARGET_FORMS))
    target_temperature: float = cfg_field(1.0, "layermoe: temperature of --target-form softmax (values are in log-p units)")
    route_granularity: str = cfg_field("group", "layermoe: KL to the target of the group's router distribution averaged "
                                       "over the example's tokens, or of every token's", choices=list(GRANULARITIES))
    route_loss_grad: str = cfg_field("all", "layermoe: what the routing loss trains: all (the routers and, through their "
                                     "inputs, the adapters below them) or router (the routers' weights alone; the "
                                     "routing control needs it, see the README)", choices=list(ROUTE_LOSS_GRADS))
    teacher_forcing: float = cfg_field(0.0, "layermoe: share of targeted examples whose task-loss forward runs through "
                                       "their searched route, annealed linearly to 0 over stage 3")
    target_balance: str = cfg_field("none", "layermoe: use the targets as searched, or rescale them (sinkhorn) so every "
                                    "expert of a group gets the same total target mass over the training questions",
                                    choices=list(TARGET_BALANCING))
    train_limit: int | None = cfg_field(None, "use only the first N training questions")
    eval_limit: int | None = cfg_field(None, "evaluate on only the first N dev / test questions")
    eval_batch_size: int = cfg_field(64, "questions per evaluation batch")
    seed: int = cfg_field(0, "seed for adapter init, shuffling and dropout")
    device: str = cfg_field("auto", "auto, cpu or cuda[:i]")
    precision: str = cfg_field("auto", f"autocast: {', '.join(PRECISIONS)} (auto: bf16 on a CUDA GPU, fp32 elsewhere)")
    name: str | None = cfg_field(None, "run name (default: <task>-<method>-s<seed>)")
    logdir: str = cfg_field("runs", "parent folder of run folders (TensorBoard logs, checkpoints, results)")
    resume: bool = cfg_field(True, "continue from the last complete epoch checkpoint of this run (as train_rl.py "
                             "does); false starts again, overwriting it")
    eval_test: bool = cfg_field(True, "score the test split at the end (ablations select on dev and leave it unread)")
    log_every: int = cfg_field(1, "optimiser steps between TensorBoard loss points")


@dataclass
class SearchConfig:
    """Search the routing MDP with an agent; write routing targets for the training examples."""

    env: str = cfg_field("layermoe-arc", f"registered env id ({', '.join(ENV_IDS)})")
    task: str | None = cfg_field(None, "your own task instead of the env id's: a folder of train/dev/test .jsonl[.gz] "
                                 "files or one file (split 80/10/10 by question-id hash)")
    train_file: str | None = cfg_field(None, "your own training split (with --dev-file, --test-file; overrides --task)")
    dev_file: str | None = cfg_field(None, "your own dev split")
    test_file: str | None = cfg_field(None, "your own test split")
    agent: str = cfg_field("mcts", f"agent: {', '.join(sorted(AGENT_NAMES))}, or your own as path/to/file.py:Class or "
                           "module:Class (the module's folder on PYTHONPATH)")
    agent_kwargs: str = cfg_field("{}", "JSON object of extra agent constructor arguments, e.g. '{\"c_puct\": 2.0}'")
    checkpoint: str | None = cfg_field(None, "warm-up checkpoint folder (default: the cached demo warm-up of the task)")
    data_dir: str | None = cfg_field(None, "data folder (default: $ROUTING_ENV_DATA, else the Hugging Face hub)")
    split: str = cfg_field("train", "split whose examples get targets")
    num_examples: int = cfg_field(128, "search the first N examples of the split (stage 3 trains the rest on the task loss)")
    num_simulations: int = cfg_field(16, "MCTS simulations per layer group (for agents that take num_simulations)")
    batch_size: int = cfg_field(16, "examples searched together (one batched forward per tree level)")
    balance_weight: float = cfg_field(0.1, "weight of the env's per-group balance reward")
    seed: int = cfg_field(0, "seed of the agent and of torch / numpy")
    device: str = cfg_field("auto", "device of the env's model: auto (CUDA when available), cpu, cuda[:i]")
    precision: str = cfg_field("auto", f"autocast of the env's model: {', '.join(PRECISIONS)} (auto: bf16 on a CUDA "
                               "GPU, fp32 elsewhere)")
    output: str | None = cfg_field(None, "routing-targets file (default: <logdir>/<name>/targets.jsonl)")
    overwrite: bool = cfg_field(False, "start the targets file again instead of resuming it")
    compare_router: bool = cfg_field(True, "also score the learned router's greedy paths on the same examples")
    name: str | None = cfg_field(None, "run name (default: <env>-<agent>-s<seed>)")
    logdir: str = cfg_field("runs", "parent folder of run folders (TensorBoard logs, targets, summary)")


@dataclass
class PipelineConfig:
    """Warm-up -> search -> process-supervised fine-tune -> test, with the baselines, over seeds."""

    task: str = cfg_field("arc-easy", f"task: a name ({', '.join(ENV_IDS.values())}), a folder of train/dev/test "
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
                             "z-loss, loss-free, top-p, sinkhorn or a '+' combination (routing_env.studies.compare runs them all)")
    num_experts: list[int] = cfg_field([4], "experts per layer of the lora-moe runs: one number, or one per layer "
                                       "(MoLA, e.g. 2,2,4,4,6,6; every layer group needs one count); another value gets "
                                       "its own task folder, as every budget setting does")
    top_k: int = cfg_field(2, "experts per token of the lora-moe runs (1: the route alone decides a token's expert)")
    rank: int = cfg_field(8, "LoRA rank of every expert, and of plain lora")
    aux_loss_coef: float = cfg_field(0.01, "weight of the Switch balance loss of the lora-moe runs (0: none)")
    lr: float = cfg_field(1e-3, "peak learning rate of every fine-tune")
    train_limit: int | None = cfg_field(None, "use only the first N training questions (all methods)")
    eval_limit: int | None = cfg_field(None, "evaluate on only the first N dev / test questions (all methods)")
    search_examples: int | None = cfg_field(None, "search only the first N training questions (default: all; the "
                                            "rest get the task loss only)")
    num_simulations: int = cfg_field(32, "MCTS simulations per layer group")
    search_batch_size: int = cfg_field(16, "questions searched together (a larger batch fills a GPU; float rounding only)")
    gate_examples: int = cfg_field(200, "dev questions of the routing-structure gate (routing_env.search.gate) run on each "
                                   "seed's warm-up before its search; 0 skips it")
    agent_kwargs: str = cfg_field("{}", "JSON object of agent settings for every search, e.g. '{\"temperature\": 0.5}'")
    balance_weight: float = cfg_field(0.1, "weight of the env's per-group balance reward in the search")
    beta: float = cfg_field(1.0, "layermoe: weight of the routing loss")
    route_weighting: str = cfg_field("none", "layermoe: none or value-gap (weight by the spread of process values)")
    target_balance: str = cfg_field("none", "layermoe: none or sinkhorn (rescale targets to equal mass per expert)")
    target_form: str = cfg_field("file", "layermoe: file (as searched), onehot or softmax of the process values "
                                 "(agents with values: mcts, exhaustive; the others keep their distributions)")
    target_temperature: float = cfg_field(1.0, "layermoe: temperature of target_form softmax")
    route_granularity: str = cfg_field("group", "layermoe: group (token-averaged router) or token (per-token KL)")
    route_loss_grad: str = cfg_field("all", "layermoe: all (routers and, through their inputs, the adapters) or router "
                                     "(the routers' weights alone) get the routing loss's gradient")
    teacher_forcing: float = cfg_field(0.0, "layermoe: share of examples trained through their searched route (annealed)")
    data_dir: str | None = cfg_field(None, "data folder (default: $ROUTING_ENV_DATA, else the hub)")
    device: str = cfg_field("auto", "device of every stage, search included (auto, cpu, cuda[:i])")
    logdir: str = cfg_field("runs/pipeline", "parent folder of the stage runs (<logdir>/<task>/<stage>-s<seed>)")
    results_dir: str = cfg_field("results", "where the table, its JSON and the plot go")
    table_only: bool = cfg_field(False, "run nothing: write the table from the stages already finished (run "
                                 "folders or committed records), listing the (method, seed) pairs still missing")


@dataclass
class CompareConfig:
    """Every balancing strategy alone and with LayerMoE on top, paired by seed."""

    task: str = cfg_field("arc-easy", "task name or your own data (as in routing_env.pipeline)")
    methods: list[str] = cfg_field(["all"], f"comma-separated strategies or combinations ({', '.join(STRATEGY_NAMES)}, "
                                   "mola, e.g. loss-free+z-loss or mola+loss-free), or all")
    seeds: list[int] = cfg_field([0, 1, 2], "comma-separated seeds")
    epochs: int = cfg_field(2, "epochs of every run (LayerMoE: warm-up + stage 3)")
    train_limit: int | None = cfg_field(None, "use only the first N training questions")
    eval_limit: int | None = cfg_field(None, "evaluate on only the first N dev / test questions")
    search_batch_size: int = cfg_field(16, "questions searched together")
    data_dir: str | None = cfg_field(None, "data folder (default: $ROUTING_ENV_DATA)")
    device: str = cfg_field("auto", "device of every stage")
    logdir: str = cfg_field("runs/compare", "parent of the per-strategy pipeline folders")
    results_dir: str = cfg_field("results/compare", "where the table, JSON, plot and the stage records go")
    table_only: bool = cfg_field(False, "run nothing: the table from the finished stages")
