"""``RoutingEnv``: the LayerMoE routing MDP over a LoRA-MoE checkpoint (one episode = one example).

The MDP itself (episode state, rewards, observation layout, planning interface) is ``RoutingMDP``
(``mdp``); this backend supplies its transitions, priors and scores by running the model group by
group, with hidden states at group boundaries cached by action prefix. Its helpers: ``checks``
(arguments), ``groups`` (layer groups, entry routers), ``batching`` (rows, batched group forwards).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from routing_env.common.utils import autocast_dtype
from routing_env.data import TaskSource, resolve_task
from routing_env.env.batching import EncodedExample, NodeOut, embed_batch, example_rows, run_batch
from routing_env.env.cache import TensorLRU
from routing_env.env.checks import check_device, check_env_args, check_number
from routing_env.env.groups import entry_routers, group_expert_counts, regroup_layers
from routing_env.env.mdp import ACTION_MODES, REWARD_MODES, EnvState, RoutingMDP, check_modes
from routing_env.moe import MCModel, load_checkpoint, model_fingerprint
from routing_env.moe.stepper import GroupStepper

__all__ = ["RoutingEnv", "EnvState", "ACTION_MODES", "REWARD_MODES", "check_number"]


class RoutingEnv(RoutingMDP):
    """
    ## Description

    Expert routing in a LoRA mixture-of-experts as a sequential decision problem (LayerMoE). The
    transformer layers of a fine-tuned LoRA-MoE are cut into ``G`` contiguous layer groups; an
    episode routes one multiple-choice question through them, one group per step. The env runs
    only that group's layers (hidden states at group boundaries are cached by action prefix) and,
    after the last group, scores the question as the model's backbone kind does
    (``routing_env.moe.backbones``): an encoder runs one row per choice and scores each with its
    head; a causal LM runs one lettered prompt and reads the answer letters' next-token logits.

    ## Action Space

    * ``primary`` (default): ``Discrete(E)``: expert ``a`` is forced into every token's top-k in the
      group's layers; the learned router fills the other ``k - 1`` slots.
    * ``combo``: ``Discrete(C(E, k))``: the exact top-k set, ``combos[a]`` (``itertools.combinations`` order).
    * ``bias``: ``Box(-1, 1, (E,))``: ``10 * a`` is added to the router's logits for selection (a
      normalised box, as SB3 recommends). The zero vector is the learned router's own routing.

    Gates are always the router's probabilities renormalised over the selected experts.

    A MoLA model (``--num-experts 2,2,4,4,6,6``) has ``group_experts[g]`` experts in group ``g``
    and ``E`` is the largest: ``primary`` only, ``Discrete(E)``, where group ``g`` takes actions
    ``[0, group_experts[g])`` (``action_masks()``, as sb3-contrib's ``MaskablePPO`` reads it) and
    refuses the others with a ``ValueError``; a group's missing experts read 0 in the observation.

    ## Observation Space

    ``Box(shape=(G + 2E + P,), float32)``:

    | slice | meaning | range |
    |---|---|---|
    | ``[0, G)`` | one-hot of the current group | {0, 1} |
    | ``[G, G+E)`` | the learned router's mean expert probabilities for the group: the routers reading the group's input, over real tokens and choices | [0, 1] |
    | ``[G+E, G+2E)`` | running expert-load shares of the group (balance context) | [0, 1] |
    | ``[G+2E, G+2E+P)`` | ``tanh`` of a fixed, seeded projection of the mean-pooled hidden state entering the group | [-1, 1] |

    After the last step the observation has an all-zero group one-hot.

    ## Rewards

    Outcome: ``log p(correct answer)`` of the finished path, a softmax over the choices' scores (an
    encoder's head scores, a causal LM's letter logits); ``info["correct"]`` says whether it is the
    model's prediction. Balance, per group: ``-balance_weight * E * sum_e p_e (s_e - 1/E)``, with
    ``p`` this step's expert-load shares in the group and ``s`` the group's running shares: choosing
    over-used experts costs, under-used ones pay. ``reward_mode="outcome"`` pays everything at the
    last step; ``"process"`` pays the balance term at each step and the outcome at the end.
    ``info["reward_terms"]`` is the step's reward term by term (``balance``, ``outcome`` where paid,
    their ``total``); the last step's ``info["return_terms"]`` the episode's, in either mode.

    ## Starting State

    A training example drawn with ``self.np_random``, or ``options={"example": i}``; no group routed.

    ## Episode End

    Terminates after ``G`` steps (every group routed). Never truncates. Running load shares are
    updated with the episode's loads when it ends.

    ## Arguments

    ``gymnasium.make("layermoe-arc", checkpoint=None, split="train", action_mode="primary",
    reward_mode="outcome", balance_weight=0.1, num_groups=None, group_sizes=None, max_examples=None,
    data_dir=None, device="cpu", obs_proj_dim=16, projection_seed=0, cache_mb=1024, precision="auto")``. Each registered
    id sets ``task``; pass ``task=`` to route your own data instead: a folder of train/dev/test
    files, one file (split by question-id hash) or a ``TaskSource`` (``routing_env.data.resolve_task``). Through
    ``gymnasium.make`` without a ``checkpoint`` the cached warm-up checkpoint of the task is used, or trained (demo
    size) first (``routing_env.training.warmup.make_env``); ``RoutingEnv`` itself needs ``checkpoint`` (a folder, or
    a callable from the task's ``TaskSource`` to one, called after the arguments and data are checked) or ``model``.
    ``num_groups`` / ``group_sizes`` regroup the layers for routing (default: the checkpoint's groups);
    ``num_experts``, when given, must match the checkpoint's. ``precision``: ``auto`` runs the model
    under bf16 autocast on a CUDA GPU and in fp32 elsewhere; ``fp32`` / ``bf16`` force one.

    These are checked before any data or model loads, a ``ValueError`` naming the argument, its value
    and the valid range: ``balance_weight`` a finite number (0: no balance term), ``cache_mb`` a
    finite number >= 0, ``max_examples``, ``num_groups``, ``num_experts`` integers >= 1 or None,
    ``group_sizes`` integers >= 1, ``obs_proj_dim`` (0: no hidden-state features) and
    ``projection_seed`` integers >= 0, ``device`` a torch device that exists, ``precision`` one of
    ``auto``, ``fp32``, ``bf16``.
    """

    def __init__(self, task: str | TaskSource = "arc-easy",
                 checkpoint: str | Path | Callable[[TaskSource], str | Path] | None = None, split: str = "train",
                 action_mode: str = "primary", reward_mode: str = "outcome", balance_weight: float = 0.1,
                 num_groups: int | None = None, group_sizes: list[int] | None = None, max_examples: int | None = None,
                 data_dir: str | Path | None = None, device: str = "cpu", obs_proj_dim: int = 16,
                 projection_seed: int = 0, cache_mb: float = 1024.0, num_experts: int | None = None,
                 model: MCModel | None = None, precision: str = "auto") -> None:
        check_modes(action_mode, reward_mode)
        # Every argument, then the data, before any model is loaded, or trained (a checkpoint resolver,
        # as ``gym.make`` passes without a checkpoint, may train the demo warm-up: a typo must not cost that).
        check_env_args(balance_weight=balance_weight, num_groups=num_groups, group_sizes=group_sizes,
                       max_examples=max_examples, obs_proj_dim=obs_proj_dim, projection_seed=projection_seed,
                       cache_mb=cache_mb, num_experts=num_experts)
        self.device = check_device(device)
        autocast = autocast_dtype(precision, self.device)
        self.source = resolve_task(task)
        self.task, self.split = self.source.name, split
        self.examples = self.source.load(split, data_dir, limit=max_examples)
        if model is None:
            if checkpoint is None:
                raise ValueError("RoutingEnv needs checkpoint= (a LoRA-MoE checkpoint folder from finetune.py) or model=; "
                                 "gymnasium.make('layermoe-arc') without a checkpoint uses the cached demo warm-up")
            # A callable resolves the checkpoint only now, after every argument and the data were checked
            # (the registered ids pass one that trains the demo warm-up when none is cached).
            model = load_checkpoint(checkpoint(self.source) if callable(checkpoint) else checkpoint)
        self.model = model.to(self.device).eval()
        if num_groups is not None or group_sizes is not None:
            regroup_layers(self.model, num_groups, group_sizes)
        self.stepper = GroupStepper(self.model, autocast)
        counts, k = group_expert_counts(self.model, self.stepper.num_groups, num_experts, action_mode)
        self._init_mdp(counts, k, action_mode, reward_mode, float(balance_weight), obs_proj_dim)
        self.tokenizer = self.model.tokenizer_for(self.model.backbone_name)
        # Visited examples' token rows: bounded too (RACE has ~88k questions), by an eighth of
        # cache_mb; the embeddings entering group 0 live in the prefix cache under the empty prefix.
        self._encoded = TensorLRU(int(cache_mb * 2**20) // 8, sizeof=EncodedExample.nbytes)
        self._entry = entry_routers(self)
        d = self.model.backbone.config.hidden_size
        self.projection = torch.from_numpy(  # [P, d], fixed by projection_seed, not by reset seeds
            np.random.default_rng(projection_seed).normal(0.0, 1.0 / np.sqrt(d), (obs_proj_dim, d)).astype(np.float32)
        ).to(self.device)
        self.cache = TensorLRU(int(cache_mb * 2**20), storage=NodeOut.storage)  # (example, prefix) -> NodeOut
        # Rows per batched group forward (see ``run_batch``): length-sorted chunks pay on a CPU; a
        # GPU wants one pass per group level.
        self.batch_rows = 32 if self.device.type == "cpu" else 4096

    @property
    def fingerprint(self) -> str:
        """The model's fingerprint (``model_fingerprint``), written into routing-target files."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    # ---- cached transitions ----------------------------------------------------------------------
    _example_rows, _run_batch, _embed_batch = example_rows, run_batch, embed_batch  # batching's, as methods

    def _boundary(self, i: int, prefix: tuple) -> NodeOut:
        """Node ``(i, prefix)``: the hidden states entering group ``len(prefix)`` after routing ``prefix``,
        the last group's loads, and what a search reads of the node (``batching``)."""
        cached = self.cache.get((i, prefix))
        if cached is None:
            if not prefix:  # the embeddings: cached like any boundary, under the cache_mb bound
                cached = self._embed_batch([i])[0]
            else:
                cached = self._run_batch([i], [self._boundary(i, prefix[:-1]).hidden], len(prefix) - 1, [prefix[-1]])[0]
            self.cache.put((i, prefix), cached)
        return cached

    def _loads(self, i: int, prefix: tuple) -> np.ndarray:
        return self._boundary(i, prefix).loads

    def prefetch(self, nodes: list[tuple[int, tuple]]) -> None:
        """Compute every uncached boundary on the way to ``nodes``: one batched pass per group level
        (the embeddings of all their examples, then each group)."""
        # The embeddings of the examples whose root, or a first group's node, is to be computed.
        roots = [i for i in dict.fromkeys(i for i, p in nodes if (i, p[:1]) not in self.cache) if (i, ()) not in self.cache]
        for i, out in zip(roots, self._embed_batch(roots) if roots else []):
            self.cache.put((i, ()), out)
        for g in range(self.G):
            todo = list(dict.fromkeys((i, p[: g + 1]) for i, p in nodes if len(p) > g and (i, p[: g + 1]) not in self.cache))
            if not todo:
                continue
            parents = [self._boundary(i, p[:-1]).hidden for i, p in todo]
            outs = self._run_batch([i for i, _ in todo], parents, g, [p[-1] for _, p in todo])
            for key, out in zip(todo, outs):
                self.cache.put(key, out)

    # ---- priors, features and scores -------------------------------------------------------------
    def router_probs(self, i: int, prefix: tuple) -> np.ndarray:
        """``[E_g]`` the learned router's mean probabilities for group ``len(prefix)`` (entry routers)."""
        if len(prefix) >= self.G:
            raise ValueError(f"router probabilities are those of a group still to route; {tuple(prefix)} routes all {self.G}")
        return self._boundary(i, prefix).readout.copy()  # the cached array stays the cache's

    def _features(self, i: int, prefix: tuple) -> np.ndarray:
        """``[P]`` ``tanh`` of the fixed projection of the mean-pooled hidden state entering group ``len(prefix)``
        (after the last group once it is complete); computed with the node's transition (``batching``)."""
        return self._boundary(i, prefix).features.copy()

    def _path_scores(self, i: int, path: tuple) -> np.ndarray:  # [C] float64 log p per choice, in ex.order
        if len(path) != self.G:
            raise ValueError(f"a path routes all {self.G} groups; {tuple(path)} routes {len(path)}")
        return self._boundary(i, path).readout.copy()  # evaluate_paths hands it to the caller

    def _score(self, i: int, logp: np.ndarray) -> tuple[float, bool]:
        row = self._example_rows(i).answer_row
        return float(logp[row]), int(logp.argmax()) == row

    def _path_details(self, ids: list[int], logps: dict[int, np.ndarray]) -> dict:
        answer = np.array([self._example_rows(i).answer_row for i in ids], dtype=int)
        return {"logp": [logps[n] for n in range(len(ids))], "answer": answer}
