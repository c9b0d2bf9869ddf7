"""``RoutingEnv``: the LayerMoE routing MDP as a Gymnasium environment (one episode = one example)."""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces

from routing_env.env.cache import TensorLRU
from routing_env.data import TaskSource, encode_pairs, resolve_task
from routing_env.moe import MCModel, load_checkpoint, moe_layers, split_layer_groups
from routing_env.moe.stepper import GroupStepper, Rows
from routing_env.env.planning import EnvState, PlanningMixin
from routing_env.common.utils import autocast_dtype

__all__ = ["RoutingEnv", "EnvState", "ACTION_MODES", "REWARD_MODES", "check_number"]

ACTION_MODES = ("primary", "combo", "bias")
REWARD_MODES = ("outcome", "process")
BIAS_SCALE = 10.0  # `bias` actions in [-1, 1] are this many logits; beyond ~10 a softmax is saturated anyway


def check_number(owner: str, name: str, value: Any, *, integer: bool = False, low: float | None = None,
                 high: float | None = None, optional: bool = False) -> None:
    """Refuse a bad numeric argument up front: a ``ValueError`` naming it, its value and the valid range.

    Without this, ``cache_mb=-5`` is accepted, ``balance_weight=nan`` turns every reward into NaN, and
    ``max_examples=0`` or ``obs_proj_dim=-1`` fail deep inside numpy after a model has loaded (or a
    demo warm-up has trained). A number is a real, finite, non-bool value; an integer an integral one.
    """
    if optional and value is None:
        return
    if integer:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    else:
        ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        kind = "an integer" if integer else "a finite number"
        if low is not None and high is not None:
            bounds = f" in [{low:g}, {high:g}]"
        else:
            bounds = f" >= {low:g}" if low is not None else f" <= {high:g}" if high is not None else ""
        raise ValueError(f"{owner}: {name} must be {kind}{bounds}{' (or None)' if optional else ''}, got {value!r}")


@dataclass
class _Example:
    rows: Rows  # the example's choices, length-sorted as MCModel.forward orders them
    order: torch.Tensor  # [C] row r holds choice order[r]
    answer_row: int
    id: str

    def nbytes(self) -> int:
        r = self.rows
        return sum(t.numel() * t.element_size() for t in (r.input_ids, r.attention_mask, r.token_type_ids, self.order)
                   if t is not None)


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"RoutingEnv: device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"RoutingEnv: device {device!r} asked for, but torch sees no CUDA device; use device='cpu'")
    return dev


class RoutingEnv(PlanningMixin, gym.Env):
    """
    ## Description

    Expert routing in a LoRA mixture-of-experts as a sequential decision problem (LayerMoE). The
    transformer layers of a fine-tuned LoRA-MoE are cut into ``G`` contiguous layer groups; an
    episode routes one multiple-choice question through them, one group per step. The env runs
    only that group's layers (hidden states at group boundaries are cached by action prefix) and,
    after the last group, scores the question with the model's head.

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

    Outcome: ``log p(correct answer)`` of the finished path (``info["correct"]`` says whether it is
    the model's prediction). Balance, per group: ``-balance_weight * E * sum_e p_e (s_e - 1/E)``, with
    ``p`` this step's expert-load shares in the group and ``s`` the group's running shares: choosing
    over-used experts costs, under-used ones pay. ``reward_mode="outcome"`` pays everything at the
    last step; ``"process"`` pays the balance term at each step and the outcome at the end.

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

    metadata = {"render_modes": []}

    def __init__(
        self,
        task: str | TaskSource = "arc-easy",
        checkpoint: str | Path | Callable[[TaskSource], str | Path] | None = None,
        split: str = "train",
        action_mode: str = "primary",
        reward_mode: str = "outcome",
        balance_weight: float = 0.1,
        num_groups: int | None = None,
        group_sizes: list[int] | None = None,
        max_examples: int | None = None,
        data_dir: str | Path | None = None,
        device: str = "cpu",
        obs_proj_dim: int = 16,
        projection_seed: int = 0,
        cache_mb: float = 1024.0,
        num_experts: int | None = None,
        model: MCModel | None = None,
        precision: str = "auto",
    ) -> None:
        if action_mode not in ACTION_MODES:
            raise ValueError(f"unknown action_mode {action_mode!r}; valid: {', '.join(ACTION_MODES)}")
        if reward_mode not in REWARD_MODES:
            raise ValueError(f"unknown reward_mode {reward_mode!r}; valid: {', '.join(REWARD_MODES)}")
        # Every argument, then the data, before any model is built or trained (without a checkpoint
        # the env trains a demo warm-up first: a typo must not cost that).
        self._check_args(balance_weight=balance_weight, num_groups=num_groups, group_sizes=group_sizes,
                         max_examples=max_examples, obs_proj_dim=obs_proj_dim, projection_seed=projection_seed,
                         cache_mb=cache_mb, num_experts=num_experts)
        self.device = _device(device)
        autocast = autocast_dtype(precision, self.device)
        self.source = resolve_task(task)
        self.task, self.split = self.source.name, split
        self.examples = self.source.load(split, data_dir, limit=max_examples)
        self.action_mode, self.reward_mode, self.balance_weight = action_mode, reward_mode, float(balance_weight)
        if model is None:
            if checkpoint is None:
                raise ValueError("RoutingEnv needs checkpoint= (a LoRA-MoE checkpoint folder from finetune.py) or model=; "
                                 "gymnasium.make('layermoe-arc') without a checkpoint uses the cached demo warm-up")
            # A callable resolves the checkpoint only now, after every argument and the data were checked
            # (the registered ids pass one that trains the demo warm-up when none is cached).
            model = load_checkpoint(checkpoint(self.source) if callable(checkpoint) else checkpoint)
        self.model = model.to(self.device).eval()
        if num_groups is not None or group_sizes is not None:
            self._regroup(num_groups, group_sizes)
        self.stepper = GroupStepper(self.model, autocast)
        self.G = self.stepper.num_groups
        #: experts of each group's layers; a MoLA model (``--num-experts 2,2,4,4,6,6``) has more in higher groups
        self.group_experts, self.k = self._group_experts()
        self.E = max(self.group_experts)  # the width of actions, priors, loads and observations
        if num_experts is not None and {num_experts} != set(self.group_experts):
            has = self.E if len(set(self.group_experts)) == 1 else f"{self.group_experts} per group"
            raise ValueError(f"the env expects {num_experts} experts per layer, the checkpoint has {has}; "
                             f"pass a checkpoint trained with --num-experts {num_experts} or drop num_experts")
        if len(set(self.group_experts)) > 1 and action_mode != "primary":
            raise ValueError(f"action_mode={action_mode!r} needs the same expert count in every group; this model has "
                             f"{self.group_experts} per group (MoLA): use action_mode='primary'")
        self.combos = list(itertools.combinations(range(self.E), self.k))
        self.tokenizer = self.model.tokenizer_for(self.model.backbone_name)
        # Visited examples' token rows: bounded too (RACE has ~88k questions), by an eighth of
        # cache_mb; the embeddings entering group 0 live in the prefix cache under the empty prefix.
        self._encoded = TensorLRU(int(cache_mb * 2**20) // 8, sizeof=_Example.nbytes)
        self._entry = self._entry_routers()
        d = self.model.backbone.config.hidden_size
        self.projection = torch.from_numpy(  # [P, d], fixed by projection_seed, not by reset seeds
            np.random.default_rng(projection_seed).normal(0.0, 1.0 / np.sqrt(d), (obs_proj_dim, d)).astype(np.float32)
        ).to(self.device)
        self.cache = TensorLRU(int(cache_mb * 2**20))  # (example, prefix) -> (hidden [C, T, d (+ H)], loads [E])
        # Rows per batched group forward (see ``_run_batch``): length-sorted chunks pay on a CPU; a
        # GPU wants one pass per group level.
        self.batch_rows = 32 if self.device.type == "cpu" else 4096

        if action_mode == "primary":
            self.action_space = spaces.Discrete(self.E)
        elif action_mode == "combo":
            self.action_space = spaces.Discrete(len(self.combos))
        else:
            self.action_space = spaces.Box(-1.0, 1.0, (self.E,), np.float32)
        n_obs = self.G + 2 * self.E + obs_proj_dim
        low = np.concatenate([np.zeros(self.G + 2 * self.E), -np.ones(obs_proj_dim)]).astype(np.float32)
        self.observation_space = spaces.Box(low, np.ones(n_obs, np.float32), dtype=np.float32)
        self.load_stats = np.zeros((self.G, self.E))  # [G, E] running counts; explicit, saved in get_state
        self._example, self._prefix, self._done = 0, (), True
        self._episode_loads = np.zeros((self.G, self.E))
        self._episode_balance = 0.0  # balance rewards of this episode so far (paid at the end in outcome mode)

    # ---- set-up helpers --------------------------------------------------------------------------
    @staticmethod
    def _check_args(balance_weight: Any, num_groups: Any, group_sizes: Any, max_examples: Any, obs_proj_dim: Any,
                    projection_seed: Any, cache_mb: Any, num_experts: Any) -> None:
        """The numeric arguments' valid ranges (``check_number``); those that need the model (num_groups
        at most the layer count, group_sizes summing to it) are checked again once it has loaded."""
        check_number("RoutingEnv", "balance_weight", balance_weight)  # any sign; 0 turns the balance term off
        check_number("RoutingEnv", "num_groups", num_groups, integer=True, low=1, optional=True)
        if group_sizes is not None and not (isinstance(group_sizes, (list, tuple)) and group_sizes and all(
                isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in group_sizes)):
            raise ValueError(f"RoutingEnv: group_sizes must be a list of integers >= 1 (or None), got {group_sizes!r}")
        check_number("RoutingEnv", "max_examples", max_examples, integer=True, low=1, optional=True)
        check_number("RoutingEnv", "obs_proj_dim", obs_proj_dim, integer=True, low=0)  # 0: no hidden-state features
        check_number("RoutingEnv", "projection_seed", projection_seed, integer=True, low=0)  # numpy seeds are >= 0
        check_number("RoutingEnv", "cache_mb", cache_mb, low=0)  # 0 keeps only the newest entry (slow, still right)
        check_number("RoutingEnv", "num_experts", num_experts, integer=True, low=1, optional=True)

    def _regroup(self, num_groups: int | None, group_sizes: list[int] | None) -> None:
        groups = split_layer_groups(self.model.num_layers, num_groups, group_sizes)
        group_of = {layer: g for g, layers in enumerate(groups) for layer in layers}
        for m in moe_layers(self.model):
            m.group = group_of[m.layer]
        self.model.moe_config.num_groups, self.model.moe_config.group_sizes = len(groups), [len(g) for g in groups]

    def _group_experts(self) -> tuple[list[int], int]:
        """``([E_g] per group, k)``: a group action forces one expert in all of its layers, so they need one count."""
        layers = moe_layers(self.model)
        if not layers:
            raise ValueError("the model has no LoRA-MoE layers; the env needs a checkpoint trained with --method lora-moe")
        ks = {m.top_k for m in layers}
        if len(ks) != 1:
            raise ValueError(f"the env needs the same top-k in every layer; this model has {sorted(ks)}")
        counts = []
        for g in range(self.stepper.num_groups):
            here = sorted({m.num_experts for m in layers if m.group == g})
            if len(here) != 1:
                raise ValueError(f"the env needs one expert count per layer group; group {g} has layers with {here} "
                                 "experts: regroup (group_sizes) so that each group's layers have the same count")
            counts.append(here[0])
        return counts, ks.pop()

    def num_actions(self, g: int) -> int:
        """Valid actions at group ``g``: ``[0, num_actions(g))`` (fewer than ``action_space.n`` in a MoLA model's lower groups)."""
        return self.group_experts[g] if self.action_mode == "primary" else int(self.action_space.n)

    def action_masks(self) -> np.ndarray:
        """``[A]`` bool: the actions valid at the current step (sb3-contrib's ``MaskablePPO`` convention)."""
        mask = np.zeros(self.action_space.n, bool)
        mask[: self.num_actions(min(len(self._prefix), self.G - 1))] = True
        return mask

    def _entry_routers(self) -> list[list]:
        """Per group, the MoE modules that read exactly the hidden state entering the group.

        Found once by tracing a forward: their routers give the observation's router probabilities
        from cached boundary states alone, without running the group (for BERT: query, key, value).
        """
        ex = self._example_rows(0)
        seen: dict[str, torch.Tensor] = {}
        hooks = [m.register_forward_pre_hook(lambda mod, a: seen.setdefault(mod.name, a[0])) for m in moe_layers(self.model)]
        h = self.stepper.embed(ex.rows)
        entry = []
        try:
            for g in range(self.G):
                seen.clear()
                nxt = self.stepper.run_group(h, ex.rows.attention_mask, g, None)
                x = self.stepper.split(h)[0]
                entry.append([m for m in moe_layers(self.model) if m.group == g and m.name in seen and torch.equal(seen[m.name], x)])
                h = nxt
        finally:
            for hk in hooks:
                hk.remove()
        if not all(entry):
            raise ValueError("could not find, for every group, a router that reads the group's input hidden state")
        return entry

    def _example_rows(self, i: int) -> _Example:
        cached = self._encoded.get(i)
        if cached is None:
            ex = self.examples[i]
            b = encode_pairs(self.tokenizer, [ex])
            C = len(ex.choices)
            ids, mask = b.input_ids[0, :C], b.attention_mask[0, :C]
            types = b.token_type_ids[0, :C] if b.token_type_ids is not None else None
            # Rows in the length order MCModel.forward uses, so the env's scores are bit-identical to it.
            order = torch.argsort(mask.sum(1), stable=True)
            T = int(mask.sum(1).max())
            rows = Rows(ids[order, :T].to(self.device), mask[order, :T].to(self.device),
                        None if types is None else types[order, :T].to(self.device))
            cached = _Example(rows, order, int((order == ex.answer).nonzero()), ex.id)
            self._encoded.put(i, cached)
        return cached

    # ---- actions and cached transitions ----------------------------------------------------------
    def _action_key(self, action: Any, group: int | None = None) -> int | tuple:
        """Validate an action (at ``group``, when given) and return its hashable form (the cache key's path element)."""
        if self.action_mode == "bias":
            a = np.asarray(action, dtype=np.float32)
            if a.shape != (self.E,) or not np.all(np.isfinite(a)) or not self.action_space.contains(a):
                raise ValueError(f"bias action must be {self.E} finite floats in [-1, 1], got {action!r}")
            return tuple(float(x) for x in a)
        a = np.asarray(action)
        if a.ndim != 0 or not np.issubdtype(a.dtype, np.integer) or not 0 <= int(a) < self.action_space.n:
            raise ValueError(f"{self.action_mode} action must be an integer in [0, {self.action_space.n}), got {action!r}")
        if group is not None and group < self.G and int(a) >= self.num_actions(group):
            raise ValueError(f"group {group} has {self.num_actions(group)} experts (per group: {self.group_experts}): "
                             f"its action must be an integer in [0, {self.num_actions(group)}), got {int(a)} "
                             "(env.action_masks() gives the valid actions)")
        return int(a)

    def _selection_bias(self, key: int | tuple, rows: int, group: int) -> torch.Tensor:  # [rows, E_g]
        E = self.group_experts[group]
        bias = torch.zeros(E)
        if self.action_mode == "primary":
            bias[key] = float("inf")
        elif self.action_mode == "combo":
            bias.fill_(float("-inf"))
            bias[list(self.combos[key])] = 0.0
        else:
            bias = torch.tensor(key, dtype=torch.float32) * BIAS_SCALE
        return bias.expand(rows, E).to(self.device)

    def _boundary(self, i: int, prefix: tuple) -> tuple[torch.Tensor, np.ndarray | None]:
        """Hidden states entering group ``len(prefix)`` after routing ``prefix``, and the last group's loads."""
        ex = self._example_rows(i)
        cached = self.cache.get((i, prefix))
        if cached is not None:
            return cached
        if not prefix:  # the embeddings: cached like any boundary, under the cache_mb bound
            out = (self.stepper.embed(ex.rows), None)
            self.cache.put((i, prefix), out)
            return out
        parent, _ = self._boundary(i, prefix[:-1])
        out = self._run_batch([parent], [ex.rows.attention_mask], len(prefix) - 1, [prefix[-1]])[0]
        self.cache.put((i, prefix), out)
        return out

    def _run_batch(self, hiddens: list[torch.Tensor], masks: list[torch.Tensor], group: int,
                   keys: list) -> list[tuple[torch.Tensor, np.ndarray]]:
        """Run ``group`` for several examples' rows -> ``(hidden, loads [E])`` per example.

        Examples are sorted by length and batched in chunks of about ``batch_rows`` rows, each padded
        only to its own longest example: one batch padded to the longest of all would spend most of
        its FLOPs on padding (ARC lengths vary 3x), which on a compute-bound CPU costs more than the
        batching saves.
        """
        order = sorted(range(len(hiddens)), key=lambda n: hiddens[n].shape[1])
        results: list = [None] * len(hiddens)
        chunk: list[int] = []
        for pos, n in enumerate(order):
            chunk.append(n)
            rows = sum(hiddens[m].shape[0] for m in chunk)
            if rows >= self.batch_rows or pos == len(order) - 1:
                for m, res in zip(chunk, self._run_padded([hiddens[m] for m in chunk], [masks[m] for m in chunk],
                                                          group, [keys[m] for m in chunk])):
                    results[m] = res
                chunk = []
        return results

    def _run_padded(self, hiddens: list[torch.Tensor], masks: list[torch.Tensor], group: int,
                    keys: list) -> list[tuple[torch.Tensor, np.ndarray]]:
        T = max(h.shape[1] for h in hiddens)
        hidden = torch.cat([F.pad(h, (0, 0, 0, T - h.shape[1])) for h in hiddens])  # [R, T, d]
        mask = torch.cat([F.pad(m, (0, T - m.shape[1])) for m in masks])  # [R, T]
        bias = torch.cat([self._selection_bias(k, h.shape[0], group) for k, h in zip(keys, hiddens)])  # [R, E_g]
        out, counts = self.stepper.run_group_counts(hidden, mask, group, bias)
        counts = counts.cpu().numpy()  # [R, E_g]
        counts = np.pad(counts, ((0, 0), (0, self.E - counts.shape[1])))  # [R, E]: a MoLA group's missing experts at 0
        results, start = [], 0
        for h in hiddens:
            n, t = h.shape[0], h.shape[1]
            results.append((out[start : start + n, :t], counts[start : start + n].sum(0)))
            start += n
        return results

    # ---- observation and rewards -----------------------------------------------------------------
    def router_probs(self, i: int, prefix: tuple) -> np.ndarray:
        """``[E_g]`` the learned router's mean probabilities for group ``len(prefix)`` (entry routers)."""
        return self._router_probs_t(i, prefix).cpu().numpy()

    def _router_probs_t(self, i: int, prefix: tuple) -> torch.Tensor:  # [E_g] float32, on the model's device
        h, _ = self._boundary(i, prefix)
        return self.stepper.entry_probs(h, self._example_rows(i).rows.attention_mask, self._entry[len(prefix)])

    def _load_share(self, g: int) -> np.ndarray:
        """``[E]`` running load shares of group ``g`` (uniform before any load; 0 beyond a MoLA group's experts)."""
        total, E = self.load_stats[g].sum(), self.group_experts[g]
        return self.load_stats[g] / total if total > 0 else np.pad(np.full(E, 1.0 / E), (0, self.E - E))

    def _observation(self) -> np.ndarray:
        g = len(self._prefix)
        h = self.stepper.split(self._boundary(self._example, self._prefix)[0])[0]
        obs = np.zeros(self.observation_space.shape, np.float32)
        mask = self._example_rows(self._example).rows.attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * mask).sum((0, 1)) / mask.sum()  # [d]
        obs[self.G + 2 * self.E :] = torch.tanh(self.projection @ pooled).cpu().numpy()
        if g < self.G:
            obs[g] = 1.0
            probs = self.router_probs(self._example, self._prefix)
            obs[self.G : self.G + len(probs)] = probs
            obs[self.G + self.E : self.G + 2 * self.E] = self._load_share(g)
        return np.clip(obs, self.observation_space.low, self.observation_space.high)

    def balance_reward(self, g: int, counts: np.ndarray) -> float:
        """``-w E sum_e p_e (s_e - 1/E)``: what routing ``counts [E]`` in group ``g`` costs for balance (E: the group's)."""
        E = self.group_experts[g]
        p = counts[:E] / max(counts.sum(), 1.0)
        return float(-self.balance_weight * E * np.dot(p, self._load_share(g)[:E] - 1.0 / E))

    def outcome(self, i: int, prefix: tuple) -> tuple[float, bool]:
        """``(log p(correct), correct)`` of a complete path."""
        return self._score(i, self._choice_logp_t(i, prefix).cpu().numpy())

    def _choice_logp_t(self, i: int, prefix: tuple) -> torch.Tensor:  # [C] float64 log p per choice, on the device
        h, _ = self._boundary(i, prefix)
        ex = self._example_rows(i)
        return torch.log_softmax(self.stepper.row_scores(h, ex.rows.attention_mask).double(), 0)  # in row order

    def _score(self, i: int, logp: np.ndarray) -> tuple[float, bool]:
        row = self._example_rows(i).answer_row
        return float(logp[row]), int(logp.argmax()) == row

    # ---- Gymnasium API ---------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        options = options or {}
        if "example" in options:
            i = int(options["example"])
            if not 0 <= i < len(self.examples):
                raise ValueError(f"options['example']={i} is out of range; this split has {len(self.examples)} examples")
        else:
            i = int(self.np_random.integers(len(self.examples)))
        self._example, self._prefix, self._done = i, (), False
        self._episode_loads = np.zeros((self.G, self.E))
        self._episode_balance = 0.0
        return self._observation(), {"example": i, "id": self.examples[i].id}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._done:
            raise ValueError("step() called after the episode ended; call reset() first")
        g = len(self._prefix)
        key = self._action_key(action, g)
        self._prefix = self._prefix + (key,)
        _, counts = self._boundary(self._example, self._prefix)
        self._episode_loads[g] = counts
        r_bal = self.balance_reward(g, counts)
        terminated = len(self._prefix) == self.G
        info: dict[str, Any] = {"example": self._example, "id": self.examples[self._example].id,
                                "path": list(self._prefix), "group_loads": self._episode_loads.copy(),
                                "balance_reward": r_bal}
        self._episode_balance += r_bal
        reward = r_bal if self.reward_mode == "process" else 0.0
        if terminated:
            logp, correct = self.outcome(self._example, self._prefix)
            reward += logp + (self._episode_balance if self.reward_mode == "outcome" else 0.0)
            info.update(outcome=logp, correct=correct)
            self.load_stats += self._episode_loads
            self._done = True
        return self._observation(), float(reward), terminated, False, info
