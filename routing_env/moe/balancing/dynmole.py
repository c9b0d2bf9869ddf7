"""``dynmole``: DynMoLE's Tsallis-entropy hybrid routing and loss.

The Tsallis entropy (``q = 2``: ``1 - sum_e p_e^2``) of each token's router distribution measures
its uncertainty. Confident tokens (entropy below ``threshold`` times its maximum ``1 - 1/E``) take
their top-k experts; uncertain ones take ``k + 1`` (softer routing, gates still the router's
renormalised probabilities). The auxiliary loss ``coef * mean Tsallis entropy`` over real tokens
asks the router to become decisive.
"""

from __future__ import annotations

from typing import Any

import torch

from routing_env.moe.balancing.base import Strategy, topk_mask

__all__ = ["TsallisRouting", "tsallis_entropy"]


def tsallis_entropy(probs: torch.Tensor, q: float = 2.0) -> torch.Tensor:
    """``[T]`` Tsallis entropy ``(1 - sum_e p_e^q) / (q - 1)`` of each row."""
    return (1.0 - probs.pow(q).sum(-1)) / (q - 1.0)


class TsallisRouting(Strategy):
    name = "dynmole"
    selects = True
    variable_k = True

    def __init__(self, threshold: float = 0.9, coef: float = 1e-3) -> None:
        self.threshold, self.coef = threshold, coef

    def select(self, layer: Any, logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        E, k = layer.num_experts, layer.top_k
        base = topk_mask(logits, k)
        if k >= E:
            return base
        uncertain = tsallis_entropy(probs) > self.threshold * (1.0 - 1.0 / E)  # [T]
        return torch.where(uncertain[:, None], topk_mask(logits, k + 1), base)

    def loss(self, layer: Any, logits: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor,
             w: torch.Tensor) -> torch.Tensor:
        return self.coef * (w @ tsallis_entropy(probs)) / w.sum().clamp_min(1.0)
