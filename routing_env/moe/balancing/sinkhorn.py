"""``sinkhorn``: Selective Sinkhorn Routing.

Token-to-expert assignment as optimal transport: the Sinkhorn plan of the router probabilities
with uniform marginals (each token one unit of mass, each expert ``T / E``) is a balanced soft
assignment; the selected tokens take their top-k experts from the plan. Applied selectively (a
``fraction`` of the real tokens of each training forward, drawn from torch's generator, so the run
stays seeded) to keep it cheap; evaluation and unselected tokens route by plain top-k. No loss term.
"""

from __future__ import annotations

from typing import Any

import torch

from routing_env.moe.balancing.base import Strategy, topk_mask

__all__ = ["SelectiveSinkhorn", "sinkhorn_plan"]


def sinkhorn_plan(probs: torch.Tensor, weight: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """``[T, E]`` transport plan ~ ``probs`` with row sums ``weight`` and equal column sums.

    ``weight [T]`` is 1 for tokens that take part (0: padding); columns each get ``sum(weight) / E``.
    """
    T, E = probs.shape
    plan = probs.clamp_min(1e-9) * weight[:, None]
    col_target = weight.sum() / E
    for _ in range(iters):
        plan = plan * (col_target / plan.sum(0).clamp_min(1e-12))[None, :]  # columns
        plan = plan * (weight / plan.sum(1).clamp_min(1e-12))[:, None]  # rows
    return plan


class SelectiveSinkhorn(Strategy):
    name = "sinkhorn"
    selects = True

    def __init__(self, fraction: float = 0.25, iters: int = 30) -> None:
        if not 0 <= fraction <= 1:
            raise ValueError(f"sinkhorn fraction must be in [0, 1], got {fraction}")
        self.fraction, self.iters = fraction, iters

    def select(self, layer: Any, logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        chosen = topk_mask(logits, layer.top_k)
        if not (layer.training and torch.is_grad_enabled()) or self.fraction == 0:
            return chosen
        w = layer.context.token_weight(probs.shape[0], probs)
        picked = (torch.rand(probs.shape[0], device=probs.device) < self.fraction).to(probs.dtype) * w  # [T]
        plan = sinkhorn_plan(probs.detach(), picked, self.iters)
        balanced = topk_mask(plan, layer.top_k)
        return torch.where(picked[:, None] > 0, balanced, chosen)
