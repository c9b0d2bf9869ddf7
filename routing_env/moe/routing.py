"""Routing of a model's LoRA-MoE layers, passed in as values: a plan in, a recorder out.

Every ``LoRAMoELinear`` of a model holds the model's one ``RoutingContext`` (``model.routing``), the
mechanism, not a place for callers to write to. A caller says what the next forwards should do with a
frozen ``RoutingPlan`` (selection bias per layer group, what to record, the route-gradient mode) and
installs it for a ``with`` block, which hands back a ``RoutingRecorder`` with what those forwards did
(expert loads per module, per-row router probabilities and counts per group, route sums, auxiliary
and balance losses), all from the same forwards; no second pass is needed for statistics::

    with model.routed(RoutingPlan(compute_aux=True, collect_route=True)) as rec:
        logits = model(batch)
    loss = task_loss + torch.stack(rec.aux_losses).mean()

The block always restores what was installed before it (nothing, outside any block): plan, recorder
and the per-forward state, whether the forward returned or raised. Outside any block a forward routes
with the empty plan (the learned router, nothing recorded).

The per-forward bookkeeping ``MCModel.forward`` and the group stepper set for the layers (the batch's
token mask, each row's example, a chunk's rows, a recurrent router's state) lives in ``PassState``,
set through ``RoutingContext.begin_pass`` / ``end_pass`` inside ``routing_env.moe`` only.

Overrides are expressed as one *selection bias* per layer group, ``[R, E]`` for the ``R`` sequences in
the batch, added to the router logits for top-k *selection only*; gates stay the router's
probabilities renormalised over the chosen experts. The three action modes are special cases:

* ``primary`` expert ``a``: ``+inf`` at ``a``, 0 elsewhere, so ``a`` is in every token's top-k and the
  router fills the other ``k - 1`` slots;
* ``combo`` set ``S`` (``|S| = k``): 0 on ``S``, ``-inf`` elsewhere, so the top-k is exactly ``S``;
* ``bias`` vector ``b``: ``b`` itself.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np
import torch

__all__ = [
    "RoutingPlan",
    "RoutingRecorder",
    "PassState",
    "RoutingContext",
    "primary_bias",
    "combo_bias",
    "load_stats",
    "LayerStats",
]


@dataclass(frozen=True, eq=False)
class RoutingPlan:
    """What the forwards of one ``with model.routed(plan)`` block do (a value: build a new one to change it)."""

    selection_bias: Mapping[int, torch.Tensor] = field(default_factory=dict)  # group -> [R, E_g]
    compute_aux: bool = False  # collect each module's balance terms (Switch loss, or the strategy's)
    record_loads: bool = False  # accumulate expert counts per module into ``loads``
    record_rows: bool = False  # per-row, per-group expert counts (summed over the group's modules)
    collect_route: bool = False  # per-row, per-group router probability sums *with gradient* (stage 3)
    # Those sums' gradient reaches the routers' weights only, not the router inputs (and so not the
    # adapters below): stage 3's --route-loss-grad router.
    route_grad_router_only: bool = False

    @property
    def records(self) -> bool:
        """Whether a forward under this plan records anything."""
        return self.compute_aux or self.record_loads or self.record_rows or self.collect_route


#: The plan of a forward outside any ``routed`` block: the learned router, nothing recorded.
NO_PLAN = RoutingPlan()


@dataclass(eq=False)
class RoutingRecorder:
    """What the forwards of one ``routed`` block did, kept on the device (read them after the block)."""

    aux_terms: list[torch.Tensor] = field(default_factory=list)  # Switch loss per module, computed by the module
    # The fused low-rank layers' Switch statistics per module, ``([num_blocks, 2E], top_k)``: per block of tokens
    # (sum_t w_t p_t, sum_t w_t chosen_t); their losses are computed for all modules at once (``aux_losses``):
    # a few launches in all instead of ~10 per module.
    switch_stats: list[tuple[torch.Tensor, int]] = field(default_factory=list)
    balance_losses: list[torch.Tensor] = field(default_factory=list)  # other strategies' weighted terms per module
    loads: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> [E] float64 counts
    row_counts: dict[int, torch.Tensor] = field(default_factory=dict)  # group -> [R, E] assignments
    route_sum: dict[int, torch.Tensor] = field(default_factory=dict)  # group -> [rows, E] sum of probs (grad)
    route_count: dict[int, torch.Tensor] = field(default_factory=dict)  # group -> [rows] (module, token) pairs
    route_logsum: dict[int, torch.Tensor] = field(default_factory=dict)  # group -> [rows, E] sum of log probs (grad)
    row_example: torch.Tensor | None = None  # [rows] example of each row of the last MCModel forward

    @property
    def aux_losses(self) -> list[torch.Tensor]:
        """The Switch loss of every module that recorded one (x ``--aux-loss-coef``), as 0-d tensors."""
        cached = self.__dict__.get("_switch_cache")
        if cached is None or cached[0] != len(self.switch_stats):
            cached = (len(self.switch_stats), _switch_losses(self.switch_stats))
            self.__dict__["_switch_cache"] = cached
        return self.aux_terms + cached[1]

    def add_route(self, group: int, prob_sum: torch.Tensor, count: torch.Tensor, logprob_sum: torch.Tensor,
                  row_index: torch.Tensor | None, num_rows: int | None) -> None:
        """Accumulate a module's per-row router probability sums ``[r, E]``, token counts ``[r]`` and
        log-probability sums ``[r, E]`` (for the per-token routing loss) into the batch's rows
        ``row_index`` of ``num_rows`` (None: the pass holds every row)."""
        rows = row_index if row_index is not None else torch.arange(prob_sum.shape[0], device=prob_sum.device)
        n = num_rows if num_rows is not None else prob_sum.shape[0]
        if group not in self.route_sum:
            self.route_sum[group] = prob_sum.new_zeros(n, prob_sum.shape[1])
            self.route_logsum[group] = prob_sum.new_zeros(n, prob_sum.shape[1])
            self.route_count[group] = count.new_zeros(n)
        rows = rows.to(prob_sum.device)
        self.route_sum[group] = self.route_sum[group].index_add(0, rows, prob_sum)
        self.route_logsum[group] = self.route_logsum[group].index_add(0, rows, logprob_sum)
        self.route_count[group] = self.route_count[group].index_add(0, rows, count)

    def example_group_probs(self, num_examples: int, log: bool = False) -> torch.Tensor:
        """``[B, G, E]`` router distribution per example and layer group, with gradient (a MoLA group
        with fewer experts is padded with zeros to the largest ``E``).

        The mean over the group's adapted modules and over every real token of the example's rows
        (all its choices): one distribution per (example, group), the granularity of a routing target.
        ``log=True``: the same mean of the tokens' *log* probabilities instead (per-token loss).
        """
        groups = sorted(self.route_sum)
        if not groups or self.row_example is None:
            raise RuntimeError("no routing was collected: run an MCModel forward under a plan with collect_route")
        out = []
        for g in groups:
            ex = self.row_example.to(self.route_sum[g].device)
            src = self.route_logsum[g] if log else self.route_sum[g]
            s = src.new_zeros(num_examples, src.shape[1]).index_add(0, ex, src)
            n = self.route_count[g].new_zeros(num_examples).index_add(0, ex, self.route_count[g])
            out.append(s / n.clamp_min(1.0)[:, None])
        E = max(o.shape[1] for o in out)
        return torch.stack([torch.nn.functional.pad(o, (0, E - o.shape[1])) for o in out], 1)


def _switch_losses(stats: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
    """``E * sum_e f_e P_e`` per module from its ``[num_blocks, 2E]`` statistics (``SwitchAux.loss``, batched by shape).

    ``f_e = c_e / (n k)`` and ``P_e = p_e / n`` with ``n`` the weighted token count; every real token
    makes exactly ``k`` choices, so ``n = sum_e c_e / k`` (clamped to 1 like the module's own form).
    """
    out: list[torch.Tensor | None] = [None] * len(stats)
    shapes: dict[tuple[int, int], list[int]] = {}
    for i, (s, k) in enumerate(stats):
        shapes.setdefault((*s.shape, k), []).append(i)
    for (_, two_e, k), idx in shapes.items():
        E = two_e // 2
        # [M, 2, E]: every module's block sums summed over the blocks, one stack and one sum for all.
        S = torch.stack([stats[i][0] for i in idx]).sum(1).view(len(idx), 2, E)
        n = (S[:, 1].sum(-1) / k).clamp_min(1.0)  # [M]
        losses = (S[:, 0] * S[:, 1]).sum(-1) * (E / k) / n.square()  # [M]
        out_m = losses.unbind()
        for i, value in zip(idx, out_m):
            out[i] = value
    return out  # type: ignore[return-value]


@dataclass(eq=False)
class PassState:
    """Bookkeeping of the pass in progress, set by ``MCModel.forward`` and the group stepper alone."""

    token_mask: torch.Tensor | None = None  # [R, S] bool: real tokens (padding is routed but not counted)
    row_index: torch.Tensor | None = None  # [r] rows of the model's batch that the current pass holds
    num_rows: int | None = None  # rows in the model's batch (chunked encoders run them in parts)
    row_example: torch.Tensor | None = None  # [rows] example of each row
    # [T, H] routing state a recurrent strategy (rmoe) passes from module to module within one pass;
    # None at the start of every pass (a pre-hook on the input embeddings resets it), or set by the
    # env's stepper to the state cached at a group boundary.
    router_state: torch.Tensor | None = None
    _weight: tuple | None = field(default=None, repr=False)  # (mask, its [T] weights): one conversion per mask
    _seed: torch.Tensor | None = field(default=None, repr=False)  # [1] int64: the fused layers' dropout seed

    def dropout_seed(self, device: torch.device) -> torch.Tensor:
        """``[1]`` int64 on ``device``: the seed of this pass's adapter-input dropout in the fused layers (each
        layer adds its own salt), drawn once per pass from torch's generator on that device (seeded runs
        repeat; on a GPU a device op, so no host sync and safe under CUDA-graph capture)."""
        if self._seed is None or self._seed.device != device:
            self._seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)
        return self._seed

    def token_weight(self, num_tokens: int, like: torch.Tensor) -> torch.Tensor:
        """``[T]`` 1.0 for the real tokens of the current pass (``token_mask``), 0.0 for padding.

        Computed once per mask and shared by every layer of the pass (one conversion, not one per module).
        """
        mask = self.token_mask
        if mask is None or mask.numel() != num_tokens:
            return like.new_ones(num_tokens)
        cached = self._weight
        if cached is None or cached[0] is not mask or cached[1].device != like.device or cached[1].dtype != like.dtype:
            cached = (mask, mask.reshape(-1).to(like.device, like.dtype))
            self._weight = cached
        return cached[1]

    def clear(self) -> None:
        self.token_mask = self.row_index = self.num_rows = self.row_example = self.router_state = None
        self._weight = self._seed = None

    def snapshot(self) -> dict:
        return dict(vars(self))

    def restore(self, snapshot: dict) -> None:
        """Back to a ``snapshot`` (in place: the rmoe reset hook holds this object)."""
        vars(self).update(snapshot)


class RoutingContext:
    """The routing mechanism one model's LoRA-MoE layers share: the installed plan, the recorder, the
    pass in progress and the balancing strategy (``strategy``; None: top-k and the Switch loss)."""

    def __init__(self, strategy: Any = None) -> None:
        self.strategy = strategy
        self._plan: RoutingPlan = NO_PLAN
        self._recorder: RoutingRecorder | None = None
        self._state = PassState()

    @property
    def plan(self) -> RoutingPlan:
        """The plan the layers follow now (``NO_PLAN`` outside any ``routed`` block)."""
        return self._plan

    @property
    def recorder(self) -> RoutingRecorder | None:
        """Where the layers record now (None outside any ``routed`` block)."""
        return self._recorder

    @property
    def state(self) -> PassState:
        """The pass in progress (the layers read it; ``begin_pass`` sets it)."""
        return self._state

    @contextmanager
    def routed(self, plan: RoutingPlan) -> Iterator[RoutingRecorder]:
        """Install ``plan`` and a fresh recorder for the block's forwards; yield the recorder.

        On leaving, by return or by exception, everything is as it was before the block: the previous
        plan and recorder (outside any block: none) and the pass state (outside a forward: empty), so
        nothing carries over to the next forward, not even from a forward that raised half-way. A
        nested block (inside a forward hook, say) thus leaves the pass it runs in as it found it.
        """
        if not isinstance(plan, RoutingPlan):
            raise TypeError(f"routed() takes a RoutingPlan, got {type(plan).__name__}")
        outer, state = (self._plan, self._recorder), self._state.snapshot()
        recorder = RoutingRecorder()
        self._plan, self._recorder = plan, recorder
        try:
            yield recorder
        finally:
            self._plan, self._recorder = outer
            self._state.restore(state)

    def begin_pass(self, *, token_mask: torch.Tensor | None, row_example: torch.Tensor | None = None,
                   row_index: torch.Tensor | None = None, num_rows: int | None = None,
                   router_state: torch.Tensor | None = None) -> PassState:
        """Set the state of the pass that follows (``routing_env.moe`` internals: MCModel, stepper)."""
        s = self._state
        s.token_mask, s.row_example, s.row_index, s.num_rows = token_mask, row_example, row_index, num_rows
        s.router_state = router_state
        s._seed = None  # each pass (each chunk of a chunked one) draws its own dropout seed
        if row_example is not None and self._recorder is not None:
            self._recorder.row_example = row_example
        return s

    def end_pass(self) -> None:
        """Forget the pass's state (what ``begin_pass`` set and the layers advanced)."""
        self._state.clear()

    # Read by the layers and strategies: the pass's token weights.
    def token_weight(self, num_tokens: int, like: torch.Tensor) -> torch.Tensor:
        return self._state.token_weight(num_tokens, like)


def primary_bias(primary: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[R]`` expert ids (-1: no override) -> ``[R, E]`` selection bias forcing each into the top-k."""
    # A scatter, not boolean indexing: no data-dependent shape, so no host sync on a GPU.
    forced = torch.where(primary >= 0, float("inf"), 0.0).to(torch.float32)[:, None]  # [R, 1]
    bias = torch.zeros(primary.shape[0], num_experts, device=primary.device)
    return bias.scatter_(1, primary.clamp_min(0)[:, None], forced)


def combo_bias(combo: torch.Tensor) -> torch.Tensor:
    """``[R, E]`` bool expert sets (all False: no override) -> selection bias making the set the top-k."""
    bias = torch.zeros(combo.shape, dtype=torch.float32)
    forced = combo.any(dim=1)
    bias[forced] = torch.where(combo[forced], 0.0, float("-inf"))
    return bias


@dataclass
class LayerStats:
    loads: list[float]  # share of token-assignments per expert, sums to 1
    cv: float  # coefficient of variation of the loads (std / mean); 0 is perfectly balanced
    max_over_mean: float  # 1 is perfectly balanced
    norm_entropy: float  # entropy / log(E); 1 is perfectly balanced


def load_stats(counts: np.ndarray | torch.Tensor) -> LayerStats:
    """Imbalance metrics of one layer's expert counts ``[E]``."""
    c = np.asarray(counts.detach().cpu() if isinstance(counts, torch.Tensor) else counts, dtype=np.float64)
    total = c.sum()
    E = c.shape[0]
    if total <= 0:
        share = np.full(E, 1.0 / E)
    else:
        share = c / total
    mean = share.mean()
    cv = float(share.std() / mean)
    nz = share[share > 0]
    ent = float(-(nz * np.log(nz)).sum() / np.log(E)) if E > 1 else 1.0
    return LayerStats(loads=share.tolist(), cv=cv, max_over_mean=float(share.max() / mean), norm_entropy=ent)
