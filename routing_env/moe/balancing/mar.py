"""``mar``: Memory-Aware Routing (Hou et al., 2026).

Each expert keeps a memory of what it has processed: an exponential moving average of the
(normalised) inputs routed to it, a buffer of the layer. Routing scores add ``strength`` times the
cosine similarity of a token to each memory, so an input keeps going to the expert that has been
taking inputs like it (its long-term preference) instead of drifting as loads are evened out
("pseudo-balance"). It changes scores only: combine it with a balancing term (``mar+aux``) for
global balance, as the paper does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from routing_env.moe.balancing.base import Strategy

__all__ = ["MemoryAwareRouting"]


class MemoryAwareRouting(Strategy):
    name = "mar"

    def __init__(self, strength: float = 1.0, momentum: float = 0.05) -> None:
        self.strength, self.momentum = strength, momentum

    def attach(self, layer: Any) -> None:
        layer.register_buffer("balance_memory", torch.zeros(layer.num_experts, layer.lora_A.shape[-1],
                                                            device=layer.lora_A.device))

    def scores(self, layer: Any, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        memory = F.normalize(layer.balance_memory, dim=-1)  # [E, d] (zeros until an expert has seen tokens)
        return logits + self.strength * (F.normalize(x.float(), dim=-1) @ memory.t())  # [T, E]

    def update(self, layer: Any, x: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor,
               w: torch.Tensor) -> None:
        weight = chosen * w[:, None]  # [T, E]
        seen = weight.sum(0)  # [E]
        mean_in = (weight.t() @ F.normalize(x.float(), dim=-1)) / seen.clamp_min(1.0)[:, None]  # [E, d]
        step = self.momentum * (seen > 0).to(mean_in.dtype)[:, None]  # experts with no token keep their memory
        layer.balance_memory.mul_(1 - step).add_(step * mean_in)
