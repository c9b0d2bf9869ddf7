"""``aux``: the Switch Transformer / GShard auxiliary balance loss, ``E * sum_e f_e * P_e``.

``f_e`` is the share of (token, slot) assignments routed to expert ``e``, ``P_e`` its mean router
probability, both over real tokens; scaled by ``--aux-loss-coef``. Today's ``lora-moe``.
"""

from __future__ import annotations

from typing import Any

import torch

from routing_env.moe.balancing.base import Strategy

__all__ = ["SwitchAux"]


class SwitchAux(Strategy):
    name = "aux"
    loss_kind = "aux"

    def loss(self, layer: Any, logits: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor,
             w: torch.Tensor) -> torch.Tensor:
        n = w.sum().clamp_min(1.0)
        f = (w @ chosen) / (n * layer.top_k)
        P = (w @ probs) / n
        return layer.num_experts * (f * P).sum()
