"""Routing state shared by all LoRA-MoE layers of one model: overrides in, statistics out.

Every ``LoRAMoELinear`` of a model holds the same ``RoutingContext``. Callers set what the next forward
should do (token mask, per-row overrides per layer group, what to record) and read what it did
(expert loads per layer, per-row router probabilities per group, auxiliary losses), all from the one
forward pass; no second pass is needed for statistics.

Overrides are expressed as one *selection bias* per layer group, ``[R, E]`` for the ``R`` sequences in
the batch, added to the router logits for top-k *selection only*; gates stay the router's
probabilities renormalised over the chosen experts. The three action modes are special cases:

* ``primary`` expert ``a``: ``+inf`` at ``a``, 0 elsewhere, so ``a`` is in every token's top-k and the
  router fills the other ``k - 1`` slots;
* ``combo`` set ``S`` (``|S| = k``): 0 on ``S``, ``-inf`` elsewhere, so the top-k is exactly ``S``;
* ``bias`` vector ``b``: ``b`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "RoutingContext",
    "primary_bias",
    "combo_bias",
    "load_stats",
    "LayerStats",
]


@dataclass
class RoutingContext:
    token_mask: torch.Tensor | None = None  # [R, S] bool: real tokens (padding is routed but not counted)
    selection_bias: dict[int, torch.Tensor] = field(default_factory=dict)  # group -> [R, E_g]
    compute_aux: bool = False  # collect the Switch balance loss of each layer into ``aux_losses``
    record_loads: bool = False  # accumulate expert counts per module into ``loads``
    record_rows: bool = False  # per-row, per-group router probabilities and expert counts
    collect_route: bool = False  # per-row, per-group router probability sums *with gradient* (stage 3)
    # Those sums' gradient reaches the routers' weights only, not the router inputs (and so not the
    # adapters below): stage 3's --route-loss-grad router.
    route_grad_router_only: bool = False
    row_index: torch.Tensor | None = None  # [r] rows of the model's batch that the current pass holds
    num_rows: int | None = None  # rows in the model's batch (chunked encoders run them in parts)
    row_example: torch.Tensor | None = None  # [rows] example of each row (set by MCModel.forward)
    aux_losses: list[torch.Tensor] = field(default_factory=list)  # Switch loss per module (x --aux-loss-coef)
    balance_losses: list[torch.Tensor] = field(default_factory=list)  # other strategies' weighted terms per module
    strategy: Any = None  # the model's balancing strategy (None: top-k + the Switch loss, the default)
    # [T, H] routing state a recurrent strategy (rmoe) passes from module to module within one pass;
    # None at the start of every pass (a pre-hook on the input embeddings resets it), or set by the
    # env's stepper to the state cached at a group boundary.
    router_state: torch.Tensor | None = None
    loads: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> [E] float64 counts
    row_probs: dict[int, torch.Tensor] = field(default_factory=dict)  # group -> [R, E] sum over modules
    row_counts: dict[int, torch.Tensor] = field(default_factory=dict)  # group -> [R, E] assignments
    row_modules: dict[int, int] = field(default_factory=dict)  # group -> modules that added to row_probs
    route_sum: dict[int, torch.Tensor] = field(default_factory=dict)  # group -> [rows, E] sum of probs (grad)
    route_count: dict[int, torch.Tensor] = field(default_factory=dict)  # group -> [rows] (module, token) pairs
    route_logsum: dict[int, torch.Tensor] = field(default_factory=dict)  # group -> [rows, E] sum of log probs (grad)

    def token_weight(self, num_tokens: int, like: torch.Tensor) -> torch.Tensor:
        """``[T]`` 1.0 for the real tokens of the current pass (``token_mask``), 0.0 for padding.

        Computed once per mask and shared by every layer of the pass (one conversion, not one per module).
        """
        mask = self.token_mask
        if mask is None or mask.numel() != num_tokens:
            return like.new_ones(num_tokens)
        cached = self.__dict__.get("_weight")
        if cached is None or cached[0] is not mask or cached[1].device != like.device or cached[1].dtype != like.dtype:
            cached = (mask, mask.reshape(-1).to(like.device, like.dtype))
            self.__dict__["_weight"] = cached
        return cached[1]

    def reset_records(self) -> None:
        """Forget what earlier forwards recorded (keeps the settings)."""
        self.aux_losses, self.balance_losses = [], []
        self.loads = {}
        self.row_probs, self.row_counts, self.row_modules = {}, {}, {}
        self.route_sum, self.route_count, self.route_logsum = {}, {}, {}

    def clear(self) -> None:
        """Back to plain learned routing with nothing recorded."""
        self.token_mask = None
        self.selection_bias = {}
        self.compute_aux = self.record_loads = self.record_rows = self.collect_route = False
        self.route_grad_router_only = False
        self.row_index = self.num_rows = self.row_example = self.router_state = None
        self.reset_records()

    def add_route(self, group: int, prob_sum: torch.Tensor, count: torch.Tensor, logprob_sum: torch.Tensor) -> None:
        """Accumulate a module's per-row router probability sums ``[r, E]``, token counts ``[r]`` and
        log-probability sums ``[r, E]`` (for the per-token routing loss)."""
        rows = self.row_index if self.row_index is not None else torch.arange(prob_sum.shape[0], device=prob_sum.device)
        n = self.num_rows if self.num_rows is not None else prob_sum.shape[0]
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
            raise RuntimeError("no routing was collected: set collect_route before the forward of an MCModel")
        out = []
        for g in groups:
            ex = self.row_example.to(self.route_sum[g].device)
            src = self.route_logsum[g] if log else self.route_sum[g]
            s = src.new_zeros(num_examples, src.shape[1]).index_add(0, ex, src)
            n = self.route_count[g].new_zeros(num_examples).index_add(0, ex, self.route_count[g])
            out.append(s / n.clamp_min(1.0)[:, None])
        E = max(o.shape[1] for o in out)
        return torch.stack([torch.nn.functional.pad(o, (0, E - o.shape[1])) for o in out], 1)

    def group_mean_probs(self, group: int) -> torch.Tensor:
        """``[R, E]`` router probabilities of the group, averaged over its modules and real tokens."""
        return self.row_probs[group] / self.row_modules[group]


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
