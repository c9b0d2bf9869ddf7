"""``top-p``: dynamic routing ("Harder Tasks Need More Experts").

Each token takes experts in order of router probability until their cumulative probability
reaches ``p``: the smallest such prefix (at least one expert), so confident tokens use one expert
and uncertain ones more. The number of experts per token depends on the data (``--top-k`` is not
used); combine with ``aux`` for balance, as the paper does.
"""

from __future__ import annotations

from typing import Any

import torch

from routing_env.moe.balancing.base import Strategy

__all__ = ["TopP"]


class TopP(Strategy):
    name = "top-p"
    selects = True
    variable_k = True

    def __init__(self, p: float = 0.5) -> None:
        if not 0 < p <= 1:
            raise ValueError(f"top-p threshold must be in (0, 1], got {p}")
        self.p = p

    def select(self, layer: Any, logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # [T, E]
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the experts ranked above each one
        keep = (before < self.p).to(probs.dtype)  # in the prefix until the mass reaches p (the first always)
        return probs.new_zeros(probs.shape).scatter_(1, order, keep)
