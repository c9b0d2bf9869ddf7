"""``z-loss``: ST-MoE's router z-loss, ``coef * mean_t (logsumexp_e logits_te)^2`` over real tokens.

Keeps router logits small (numerically stable softmax) without touching balance; combine it with
any other strategy (``aux+z-loss``).
"""

from __future__ import annotations

from typing import Any

import torch

from routing_env.moe.balancing.base import Strategy

__all__ = ["ZLoss"]


class ZLoss(Strategy):
    name = "z-loss"

    def __init__(self, coef: float = 1e-3) -> None:
        self.coef = coef

    def loss(self, layer: Any, logits: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor,
             w: torch.Tensor) -> torch.Tensor:
        z = torch.logsumexp(logits, dim=-1)  # [T]
        return self.coef * (w @ z.square()) / w.sum().clamp_min(1.0)
