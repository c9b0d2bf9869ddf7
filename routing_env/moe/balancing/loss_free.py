"""``loss-free``: auxiliary-loss-free balancing (DeepSeek; ALF-LB).

A per-expert bias ``b`` is added to the routing scores for top-k *selection only*; gates stay the
router's probabilities over the chosen experts. After each training forward the bias of every
expert moves by ``rate * sign(mean load - its load)``: overloaded experts down, underloaded up.
No loss term, so the task gradient is untouched.
"""

from __future__ import annotations

from typing import Any

import torch

from routing_env.moe.balancing.base import Strategy, topk_mask

__all__ = ["LossFree"]


class LossFree(Strategy):
    name = "loss-free"
    selects = True

    def __init__(self, rate: float = 1e-3) -> None:
        self.rate = rate

    def attach(self, layer: Any) -> None:
        layer.register_buffer("balance_bias", torch.zeros(layer.num_experts, device=layer.lora_A.device))

    def select(self, layer: Any, logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return topk_mask(logits + layer.balance_bias, layer.top_k)

    def update(self, layer: Any, x: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor,
               w: torch.Tensor) -> None:
        load = w @ chosen  # [E] assignments of real tokens
        layer.balance_bias.add_(self.rate * torch.sign(load.mean() - load))
