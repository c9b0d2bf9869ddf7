"""The settings of every command line, and the valid choices they list.

Each setting is declared once, with its help text, in a settings group (a dataclass of fields):

    TaskData        task, train_file, dev_file, test_file         which data
    DataLimits      train_limit, eval_limit                       how much of it (budget)
    Schedule        epochs, lr                                    (budget)
    MoEShape        backbone, num_experts, top_k, rank, balance, aux_loss_coef   (budget)
    AdapterDetails  alpha, dropout, backbone_dropout, target_modules
    LayerGroups     num_groups, group_sizes                       the routing MDP's steps (budget)
    Stage3Settings  beta, route_weighting, target_form, ...       stage 3's routing loss and targets
    SearchSettings  agent_kwargs, num_simulations, balance_weight the search
    PipelineSearch  SearchSettings + warmup_epochs, search_examples, search_batch_size
    Place           data_dir, device, logdir                      where a run reads, runs and writes
    RunSettings     Place + seed, precision, name                 one run
    StudyOutput     seeds, results_dir, table_only                a table over methods and seeds

Each command's config inherits the groups it takes (``FinetuneConfig(RunSettings, Stage3Settings,
...)``), so its fields stay flat: ``cfg.lr``, ``dataclasses.asdict(cfg)`` and the flags
(``--lr``) are those of the fields, whichever group declares them. A command that takes one field of
a group alone, or defaults it otherwise (the pipeline's 32 simulations, its own logdir), restates
only that (``cfg_like``); the help stays the group's. The pipeline derives its run-name tags from
the groups (``pipeline.BUDGET_FIELDS = DataLimits + Schedule + MoEShape``, ``SEARCH_FIELDS``,
``STAGE3_FIELDS``), so a new stage-3 setting is declared here and nowhere else in the pipeline.
(Dataclass inheritance orders the fields base by base, the last-listed base first.)

Imports nothing heavy (no torch, transformers or model code): a script parses its flags and answers
``--help`` from here, then imports the module that does the work. The modules keep their names for
them (``routing_env.training.finetune.Config`` is ``FinetuneConfig``; ``pipeline.PipelineConfig``,
``compare.CompareConfig``).

Stage 3's choices (target forms, weightings, ...) are declared here and imported by the code that
reads them. The few that live in heavy modules (task names, methods, strategies) are listed again
here; tests/test_cli.py checks that each list equals its source, so they cannot drift apart.
``SearchConfig`` lives beside the search (``routing_env/search/config.py``): its ``--agent`` help names
the registered agents, and the agents package sits above this one.
"""

from __future__ import annotations

from dataclasses import dataclass

from routing_env.common.cli import cfg_field, cfg_like, field_names

__all__ = ["FinetuneConfig", "PipelineConfig", "CompareConfig", "TaskData", "DataLimits",
           "Schedule", "MoEShape", "AdapterDetails", "LayerGroups", "Stage3Settings", "SearchSettings", "PipelineSearch", "Place",
           "RunSettings", "StudyOutput", "field_names", "PRECISIONS", "TASK_NAMES", "METHODS",
           "DEFAULT_BACKBONE", "STRATEGY_NAMES", "WEIGHTINGS", "TARGET_FORMS", "GRANULARITIES", "TARGET_BALANCING",
           "ROUTE_LOSS_GRADS"]

#: ``--precision`` values (routing_env.common.utils.autocast_dtype maps them to a dtype)
PRECISIONS = ("auto", "fp32", "bf16")
#: finetune --compile: how the training forward and backward run (routing_env.training.finetune.compile_net)
COMPILE_MODES = ("none", "default", "graphs", "trace")
#: built-in task names (routing_env.data.task_names())
TASK_NAMES = ("arc-easy", "arc-challenge", "obqa", "race", "mix4")
#: fine-tune methods of stage 1 (routing_env.moe.METHODS); finetune also takes "layermoe" (stage 3)
METHODS = ("lora", "lora-moe")
#: the packaged backbone (routing_env.moe.DEFAULT_BACKBONE)
DEFAULT_BACKBONE = "minilm"
#: routing / balancing strategies, in their registry's order (routing_env.moe.balancing.STRATEGIES)
STRATEGY_NAMES = ("aux", "z-loss", "loss-free", "top-p", "sinkhorn", "bip", "loramoe", "dynmole", "mar", "rmoe")
# Stage 3's choices, declared here once (training/supervision.py and targets.py import them):
#: How each (example, group) term is weighted: equally, or by how much the search said the choice
#: mattered (the spread of its process values, max Q - min Q, normalised to mean 1 over the file).
WEIGHTINGS = ("none", "value-gap")
#: Which distribution a group is pulled toward: the file's targets as the agent wrote them (MCTS:
#: visit counts), a one-hot of the best-valued action, or a softmax of the process values (Q, in
#: log-p units) at ``target_temperature``. The last two need a file with values (MCTS, exhaustive).
TARGET_FORMS = ("file", "onehot", "softmax")
#: Where the routing loss compares router and target: the group's router distribution averaged over
#: the example's tokens (``group``), or each token's distribution (``token``: mean per-token KL).
GRANULARITIES = ("group", "token")
#: which parameters the routing loss trains: the routers and, through their inputs, the adapters below
#: them (all), or the routers' own weights alone (router)
ROUTE_LOSS_GRADS = ("all", "router")
#: How the file's targets are adjusted before training: as searched, or (``sinkhorn``) rescaled so
#: that, per group, every expert receives the same total target mass over the training questions.
TARGET_BALANCING = ("none", "sinkhorn")

# ---- the settings groups: each setting declared once -------------------------------------------------

@dataclass
class TaskData:
    """Which task: a built-in name, your own data, or your own three splits."""

    task: str = cfg_field("arc-easy", f"task: a name ({', '.join(TASK_NAMES)}), a folder of train/dev/test "
                          ".jsonl[.gz] files, or one file (split 80/10/10 by question-id hash)")
    train_file: str | None = cfg_field(None, "your own training split (with --dev-file and --test-file; overrides --task)")
    dev_file: str | None = cfg_field(None, "your own dev split (model selection and ablations read it)")
    test_file: str | None = cfg_field(None, "your own test split (read once, at the end)")


@dataclass
class DataLimits:
    """How much of the data is used (part of the budget: the pipeline's task folder is named by it)."""

    train_limit: int | None = cfg_field(None, "use only the first N training questions (a study: in every run)")
    eval_limit: int | None = cfg_field(None, "evaluate on only the first N dev / test questions (a study: in every run)")


@dataclass
class Schedule:
    """Task training (part of the budget)."""

    epochs: int = cfg_field(2, "passes over the training split (a study: of every method; layermoe: warm-up + stage 3)")
    lr: float = cfg_field(1e-3, "peak learning rate (AdamW, linear warm-up then decay)")


@dataclass
class MoEShape:
    """The adapters: backbone, experts, rank and routing strategy (part of the budget)."""

    backbone: str = cfg_field(DEFAULT_BACKBONE, "'minilm' (packaged, offline), a local folder or a hub id")
    num_experts: list[int] = cfg_field([4], "experts per layer: one number, or one per layer (MoLA, e.g. 2,2,4,4,6,6; "
                                       "every layer group needs one count), comma-separated")
    top_k: int = cfg_field(2, "experts per token (1: the route alone decides a token's expert)")
    rank: int = cfg_field(8, "LoRA rank of each expert (and of plain lora)")
    aux_loss_coef: float = cfg_field(0.01, "weight of the Switch balance loss (lora-moe, layermoe; 0: none)")
    balance: str = cfg_field("aux", f"lora-moe routing / balancing strategy: {', '.join(STRATEGY_NAMES)}, combined with "
                             "'+' (e.g. loss-free+z-loss); aux is the Switch loss at --aux-loss-coef. layermoe keeps "
                             "its warm-up's (routing_env.studies.compare runs them all)")


@dataclass
class AdapterDetails:
    """The adapters' finer settings (a fine-tune's own)."""

    alpha: float = cfg_field(16.0, "LoRA alpha (scale = alpha / rank)")
    dropout: float = cfg_field(0.05, "dropout on the adapter input")
    backbone_dropout: float | None = cfg_field(None, "the backbone's own dropout (hidden states, attention) while "
                                               "training; none keeps its config's (MiniLM: 0.1)")
    target_modules: list[str] = cfg_field(["all-linear"], "linear layers to adapt: all-linear, or names (query,value,...)")


@dataclass
class LayerGroups:
    """How the transformer layers are cut into the routing MDP's steps (budget: a model of its own)."""

    num_groups: int = cfg_field(3, "contiguous layer groups (the routing MDP's steps); the layer count must divide by it "
                                "unless --group-sizes is given")
    group_sizes: list[int] | None = cfg_field(None, "explicit layer-group sizes, e.g. 2,2,1,1 (overrides num-groups; "
                                              "a 16-layer Llama-3.2-1B: 6,5,5)")


@dataclass
class Stage3Settings:
    """Stage 3 (layermoe): the routing loss and the targets it is computed against.

    The pipeline names its stage-3 runs by these fields (``pipeline.STAGE3_FIELDS``) and passes each to
    the fine-tune: a field added here is a new stage-3 setting everywhere.
    """

    beta: float = cfg_field(1.0, "layermoe: weight of the routing loss KL(target || group router distribution)")
    route_weighting: str = cfg_field("none", "layermoe: weight each (example, group) term equally, or by the spread "
                                     "of its process values", choices=list(WEIGHTINGS))
    target_form: str = cfg_field("file", "layermoe: targets as the agent wrote them, a one-hot of the best-valued "
                                 "action, or a softmax of the process values at --target-temperature (agents with "
                                 "process values: mcts, exhaustive; the pipeline keeps the others' distributions)",
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


@dataclass
class SearchSettings:
    """The search of routing targets (stage 2)."""

    agent_kwargs: str = cfg_field("{}", "JSON object of extra agent constructor arguments, e.g. '{\"c_puct\": 2.0}'")
    num_simulations: int = cfg_field(16, "MCTS simulations per layer group (for agents that take num_simulations)")
    balance_weight: float = cfg_field(0.1, "weight of the env's per-group balance reward")


@dataclass
class PipelineSearch(SearchSettings):
    """The pipeline's searches: when, on how many questions, how many at once (``pipeline.SEARCH_FIELDS``)."""

    num_simulations: int = cfg_like(SearchSettings, "num_simulations", 32)
    warmup_epochs: int = cfg_field(1, "layermoe: epochs of the lora-moe warm-up before the search")
    search_examples: int | None = cfg_field(None, "search only the first N training questions (default: all; the "
                                            "rest get the task loss only)")
    search_batch_size: int = cfg_field(16, "questions searched together (a larger batch fills a GPU; float rounding only)")


@dataclass
class Place:
    """Where a run reads, runs and writes: no part of what it computes (``identity.RUN_PLACE_FIELDS``)."""

    data_dir: str | None = cfg_field(None, "data folder (default: $ROUTING_ENV_DATA, else the Hugging Face hub)")
    device: str = cfg_field("auto", "auto (CUDA when available), cpu or cuda[:i]; a study runs every stage, search "
                            "included, there")
    logdir: str = cfg_field("runs", "parent folder of the run folders (TensorBoard logs, checkpoints, targets, results; "
                            "a pipeline's are <logdir>/<task>/<stage>-s<seed>)")


@dataclass
class RunSettings(Place):
    """One run (a fine-tune or a search): its seed, precision and name."""

    seed: int = cfg_field(0, "seed of the adapter init, shuffling and dropout (a search: of the agent) and of torch / numpy")
    precision: str = cfg_field("auto", f"autocast: {', '.join(PRECISIONS)} (auto: bf16 on a CUDA GPU, fp32 elsewhere)")
    name: str | None = cfg_field(None, "run name (default: <task>-<method>-s<seed>; a search: <env>-<agent>-s<seed>)")


@dataclass
class StudyOutput:
    """A table over methods and seeds (the pipeline, the strategy comparison)."""

    seeds: list[int] = cfg_field([0, 1, 2], "comma-separated seeds; every method runs every seed")
    results_dir: str = cfg_field("results", "where the table, its JSON and the plot go (the stage records under runs/)")
    table_only: bool = cfg_field(False, "run nothing: write the table from the stages already finished (run "
                                 "folders or committed records), listing the (method, seed) pairs still missing")


# ---- the commands: each composed of the groups it takes ----------------------------------------------

@dataclass
class FinetuneConfig(RunSettings, Stage3Settings, AdapterDetails, LayerGroups, MoEShape, Schedule, DataLimits,
                     TaskData):
    """Fine-tune LoRA / LoRA-MoE adapters on a multiple-choice task."""

    method: str = cfg_field("lora-moe", "lora / lora-moe (stage 1), or layermoe: continue a lora-moe warm-up "
                            "with routing targets (stage 3)", choices=[*METHODS, "layermoe"])
    init_checkpoint: str | None = cfg_field(None, "layermoe: the warm-up checkpoint to continue (its adapter settings are "
                                            "used); an epoch checkpoint of a lora-moe run continues that run's optimiser, "
                                            "schedule and RNG (paired design: only the routing loss differs)")
    targets: str | None = cfg_field(None, "layermoe: routing-targets file from train_rl.py for that checkpoint")
    batch_size: int = cfg_field(16, "questions per optimiser step")
    weight_decay: float = cfg_field(0.0, "AdamW weight decay")
    warmup_ratio: float = cfg_field(0.06, "share of the steps spent warming the learning rate up")
    max_grad_norm: float = cfg_field(1.0, "gradient clipping norm")
    max_length: int = cfg_field(128, "token limit of one (question, choice) input")
    eval_batch_size: int = cfg_field(64, "questions per evaluation batch")
    resume: bool = cfg_field(True, "continue from the last complete epoch checkpoint of this run (as train_rl.py "
                             "does); false starts again, overwriting it")
    eval_test: bool = cfg_field(True, "score the test split at the end (ablations select on dev and leave it unread)")
    log_every: int = cfg_field(1, "optimiser steps between TensorBoard loss points")
    compile: str = cfg_field("none", "torch.compile the training forward and backward, batch widths bucketed to 32 "
                             "tokens: none; default (inductor); graphs (inductor replaying CUDA graphs, for a GPU); "
                             "trace (traced but run eagerly: a check). Under inductor the adapters' dropout draws "
                             "other masks, so it is a setting of the run", choices=COMPILE_MODES)


@dataclass
class PipelineConfig(StudyOutput, Place, Stage3Settings, PipelineSearch, LayerGroups, MoEShape, Schedule, DataLimits,
                     TaskData):
    """Warm-up -> search -> process-supervised fine-tune -> test, with the baselines, over seeds."""

    logdir: str = cfg_like(Place, "logdir", "runs/pipeline")
    methods: list[str] = cfg_field(["lora", "lora-moe", "layermoe-mcts", "layermoe-ppo"],
                                   "comma-separated methods: lora, lora-moe, layermoe-<agent> (any registered agent)")
    gate_examples: int = cfg_field(200, "dev questions of the routing-structure gate (routing_env.search.gate) run on each "
                                   "seed's warm-up before its search; 0 skips it")


@dataclass
class CompareConfig(StudyOutput, Place, DataLimits):
    """Every balancing strategy alone and with LayerMoE on top, paired by seed."""

    logdir: str = cfg_like(Place, "logdir", "runs/compare")
    results_dir: str = cfg_like(StudyOutput, "results_dir", "results/compare")
    task: str = cfg_like(TaskData, "task")
    epochs: int = cfg_like(Schedule, "epochs")
    search_batch_size: int = cfg_like(PipelineSearch, "search_batch_size")
    methods: list[str] = cfg_field(["all"], f"comma-separated strategies or combinations ({', '.join(STRATEGY_NAMES)}, "
                                   "mola, e.g. loss-free+z-loss or mola+loss-free), or all")
