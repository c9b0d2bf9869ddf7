"""``loramoe``: LoRAMoE's localized balancing.

The experts are split into contiguous groups (default 2, e.g. world-knowledge vs task experts),
and balance is asked only *within* each group: the loss is the mean over groups of the squared
coefficient of variation of the experts' importance (summed router probability over real
tokens) inside the group. How much the token mass favours one group over another is left to the
task, so some experts can stay close to the backbone's knowledge.
"""

from __future__ import annotations

from typing import Any

import torch

from routing_env.moe.balancing.base import Strategy

__all__ = ["LocalizedBalance"]


class LocalizedBalance(Strategy):
    name = "loramoe"

    def __init__(self, groups: int = 2, coef: float = 0.01) -> None:
        self.groups, self.coef = groups, coef

    def loss(self, layer: Any, logits: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor,
             w: torch.Tensor) -> torch.Tensor:
        E = layer.num_experts
        if E % self.groups or E // self.groups < 2:
            raise ValueError(f"loramoe splits the {E} experts into {self.groups} groups of at least 2 equal ones; "
                             f"use a number of experts divisible by {self.groups} (>= {2 * self.groups})")
        importance = (w @ probs).view(self.groups, E // self.groups)  # [groups, E / groups]
        cv2 = importance.var(dim=1, unbiased=False) / importance.mean(dim=1).square().clamp_min(1e-12)
        return self.coef * cv2.mean()
