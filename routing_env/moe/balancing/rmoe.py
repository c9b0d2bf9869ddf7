"""``rmoe``: layerwise recurrent router (Qiu et al., "Layerwise Recurrent Router for Mixture-of-Experts").

A GRU carries a per-token routing state from one MoE module to the next, in forward order, so each
module's choice depends on the routing below it. Module ``m`` computes

    h_m = GRU_m(P_m x, h_{m-1}),   logits_m = W_m x + O_m h_m

with ``h_0 = 0`` at the start of every pass. ``O_m`` starts at zero, so a fresh model routes
exactly like the plain router and the recurrent part grows from the task gradient (and the
balance term it is combined with, ``rmoe+aux``). Every adapted linear of LoRA-MoE is its own
MoE module with its own router, so the recurrence runs through all of them (in BERT: query, key,
value, attention output, intermediate, output of layer 0, then layer 1, ...).

The state lives in the pass's ``PassState.router_state`` (``[T, H]``, float32): reset by a pre-hook on
the input embeddings (``attach_reset_hook``), cached by the env with the hidden states at each
group boundary, so a search runs on top of a recurrent router exactly as on any other.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from routing_env.moe.balancing.base import Strategy

__all__ = ["RecurrentRouter", "attach_reset_hook"]


class RecurrentRouter(Strategy):
    name = "rmoe"
    state_dim = 16  # small: the state only has to say where the token was routed below

    def attach(self, layer: Any) -> None:
        d_in, H, E = layer.lora_A.shape[-1], self.state_dim, layer.num_experts
        kw = {"dtype": layer.lora_A.dtype, "device": layer.lora_A.device}
        layer.balance_proj = nn.Linear(d_in, H, bias=False, **kw)  # P_m: the token's own contribution
        layer.balance_gru = nn.GRUCell(H, H, **kw)
        layer.balance_out = nn.Linear(H, E, bias=False, **kw)  # O_m: zero, so routing starts as the plain router
        nn.init.zeros_(layer.balance_out.weight)

    def scores(self, layer: Any, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        state = layer.context.state
        prev = state.router_state
        if prev is None:  # the pass's first module
            prev = torch.zeros(x.shape[0], self.state_dim, device=x.device)
        elif prev.shape[0] != x.shape[0]:
            raise RuntimeError(f"{layer.name}: the routing state holds {prev.shape[0]} tokens, the input {x.shape[0]}; "
                               f"a pass started without resetting it (see rmoe.attach_reset_hook)")
        h = layer.balance_gru(layer.balance_proj(x), prev.to(x.dtype)).float()  # [T, H]
        state.router_state = h
        return logits + layer.balance_out(h.to(x.dtype)).float()


def attach_reset_hook(model: nn.Module) -> None:
    """Start every pass of ``model`` (an ``MCModel``) with an empty routing state: a pre-hook on the
    backbone's input embeddings, which every forward (and the env's ``embed``) runs first."""
    state = model.routing.state

    def reset(module: nn.Module, args: Any) -> None:
        state.router_state = None

    model.backbone.get_input_embeddings().register_forward_pre_hook(reset)
