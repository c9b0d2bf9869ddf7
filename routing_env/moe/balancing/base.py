"""The interface every routing / balancing strategy implements, and their combination.

A LoRA-MoE layer asks its model's strategy, on every forward:

1. ``scores(layer, x, logits)``: the router variant (default: the linear router's logits);
2. ``select(layer, logits, probs)``: which experts each token uses, ``[T, E]`` of 0/1 (default:
   top-k). The env's routing override bypasses it: an action forces experts into the top-k, so a
   search runs on top of any strategy with the same action semantics;
3. ``loss(layer, logits, probs, chosen, w)``: a balancing term for training (``None``: none);
4. ``update(layer, x, logits, probs, chosen, w)``: state changes after a training forward (no gradient).

A strategy with ``state_dim > 0`` (``rmoe``) carries a per-token state through the pass in
``PassState.router_state`` (``routing.py``), which the env caches with the hidden states at group boundaries.

Gates are always the router's probabilities renormalised over the chosen experts. State a strategy
keeps per layer lives in buffers named ``balance_*`` on the layer, saved with checkpoints.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

__all__ = ["Strategy", "Combination", "topk_mask"]


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``[T, E]`` 1.0 at each row's ``k`` largest scores, 0.0 elsewhere."""
    return scores.new_zeros(scores.shape).scatter_(1, scores.topk(k, dim=-1).indices, 1.0)


class Strategy:
    """One routing or balancing method (the defaults: plain top-k routing, no balancing term)."""

    name: ClassVar[str] = ""
    #: replaces the top-k selection rule (at most one such strategy per combination)
    selects: ClassVar[bool] = False
    #: ``aux``: the loss is scaled by ``--aux-loss-coef`` (the Switch loss); ``balance``: already weighted
    loss_kind: ClassVar[str] = "balance"
    #: may choose another number of experts than ``top_k`` for a token
    variable_k: ClassVar[bool] = False
    #: width ``H`` of a per-token routing state carried from module to module in a pass (0: none)
    state_dim: ClassVar[int] = 0

    def attach(self, layer: Any) -> None:
        """Register this strategy's per-layer state on ``layer`` (buffers named ``balance_*``)."""

    def scores(self, layer: Any, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def select(self, layer: Any, logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return topk_mask(logits, layer.top_k)

    def loss(self, layer: Any, logits: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor,
             w: torch.Tensor) -> torch.Tensor | None:
        return None

    def update(self, layer: Any, x: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor,
               w: torch.Tensor) -> None:
        """After a training forward, without gradient (``x [T, d]``: the layer's input; ``w [T]``: 1 for real tokens)."""

    def __repr__(self) -> str:
        return self.name


class Combination(Strategy):
    """Several strategies at once (``aux+z-loss``): scores chained, one selection rule, every loss."""

    def __init__(self, parts: list[Strategy]) -> None:
        self.parts = parts
        self.name = "+".join(p.name for p in parts)  # type: ignore[misc]
        choosers = [p for p in parts if p.selects]
        self.chooser = choosers[0] if choosers else None
        self.selects = self.chooser is not None  # type: ignore[misc]
        self.variable_k = any(p.variable_k for p in parts)  # type: ignore[misc]
        self.state_dim = max((p.state_dim for p in parts), default=0)  # type: ignore[misc]

    def attach(self, layer: Any) -> None:
        for p in self.parts:
            p.attach(layer)

    def scores(self, layer: Any, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        for p in self.parts:
            logits = p.scores(layer, x, logits)
        return logits

    def select(self, layer: Any, logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return (self.chooser or super()).select(layer, logits, probs)

    def losses(self, layer: Any, logits: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor,
               w: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        out = []
        for p in self.parts:
            value = p.loss(layer, logits, probs, chosen, w)
            if value is not None:
                out.append((p.loss_kind, value))
        return out

    def update(self, layer: Any, x: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor,
               w: torch.Tensor) -> None:
        for p in self.parts:
            p.update(layer, x, logits, probs, chosen, w)
