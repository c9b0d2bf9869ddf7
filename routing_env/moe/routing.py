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
    aux_losses: list[torch.Tensor] = field(default_factory=list)
    loads: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> [E] float64 counts
    row_probs: dict[int, torch.Tensor] = field(default_factory=dict)  # group -> [R, E] sum over modules
    row_counts: dict[int, torch.Tensor] = field(default_factory=dict)  # group -> [R, E] assignments
    row_modules: dict[int, int] = field(default_factory=dict)  # group -> modules that added to row_probs

    def reset_records(self) -> None:
        """Forget what earlier forwards recorded (keeps the settings)."""
        self.aux_losses = []
        self.loads = {}
        self.row_probs, self.row_counts, self.row_modules = {}, {}, {}

    def clear(self) -> None:
        """Back to plain learned routing with nothing recorded."""
        self.token_mask = None
        self.selection_bias = {}
        self.compute_aux = self.record_loads = self.record_rows = False
        self.reset_records()

    def group_mean_probs(self, group: int) -> torch.Tensor:
        """``[R, E]`` router probabilities of the group, averaged over its modules and real tokens."""
        return self.row_probs[group] / self.row_modules[group]


def primary_bias(primary: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[R]`` expert ids (-1: no override) -> ``[R, E]`` selection bias forcing each into the top-k."""
    bias = torch.zeros(primary.shape[0], num_experts)
    rows = torch.nonzero(primary >= 0).squeeze(1)
    bias[rows, primary[rows]] = float("inf")
    return bias


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
