"""``bip``: balanced routing as a binary integer program (after Sun, 2025).

Routing as the assignment ``max sum_te s_te x_te`` with ``k`` distinct experts per token and at
most ``ceil(T / E)`` tokens per expert in each of the ``k`` rounds of choices (``s``: router
probabilities minus the layer's price vector ``q``). Each round is solved by deferred acceptance
(tokens propose to their best remaining expert, experts keep their best proposals up to capacity,
proposal rounds of tensor ops until every token is held), so when ``E`` divides ``T`` every expert
gets exactly ``T / E`` tokens per round with ``k = 1``; with ``k > 1`` a few tokens a later round
leaves out take their best remaining expert above capacity (near-exact balance). The prices ``q`` (the per-layer dual vector re-ordering the
top-k) move after each training forward toward the experts the unconstrained top-k overloads, so
the router's own choice drifts toward the balanced one. In evaluation tokens take the top-k of
``s - q``. Gates stay the router's probabilities over the chosen experts. No loss term.
"""

from __future__ import annotations

from typing import Any

import torch

from routing_env.moe.balancing.base import Strategy, topk_mask

__all__ = ["BIP", "balanced_assignment"]


def balanced_assignment(scores: torch.Tensor, k: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``[T, E]`` 0/1: ``k`` distinct experts per (weighted) token, each expert at most ``ceil(n / E)``
    tokens per round of choices (``n`` real tokens), maximising the summed scores greedily per round.

    Tokens with weight 0 (padding) take their plain top-k and do not use capacity.
    """
    T, E = scores.shape
    real = torch.ones(T, dtype=torch.bool, device=scores.device) if weight is None else weight > 0
    cap = -(-int(real.sum()) // E) if T else 0
    chosen = torch.zeros(T, E, dtype=torch.bool, device=scores.device)
    neg = torch.finfo(scores.dtype).min
    for _ in range(min(k, E)):
        rejected = chosen.clone()  # an expert already chosen in an earlier round is off the table
        held = torch.zeros_like(chosen)
        for _ in range(E * E):  # until every token is held (a displaced token proposes again, to its next choice)
            free = real & ~held.any(1) & ~rejected.all(1)  # [T]
            if not bool(free.any()):  # a host read per proposal round: BIP trades that for exact balance
                break
            pref = scores.masked_fill(rejected, neg)
            proposal = torch.zeros_like(chosen).scatter_(1, pref.argmax(1, keepdim=True), True) & free[:, None]
            cand = held | proposal
            # Each expert keeps its `cap` best candidates (rank by score among its candidates).
            ranked = scores.masked_fill(~cand, neg).argsort(dim=0, descending=True).argsort(dim=0)  # [T, E] ranks
            keep = cand & (ranked < cap)
            rejected |= cand & ~keep
            held = keep
        # Deferred acceptance finds a stable assignment, not always a complete one once earlier rounds
        # exclude experts: a token left out (measured: 0.5% at T=4096, k=2) takes its best remaining expert.
        left = real & ~held.any(1)
        best = torch.zeros_like(chosen).scatter_(1, scores.masked_fill(chosen, neg).argmax(1, keepdim=True), True)
        chosen |= held | (best & left[:, None])
    if not real.all():
        chosen = torch.where(real[:, None], chosen, topk_mask(scores, k).bool())
    return chosen.to(scores.dtype)


class BIP(Strategy):
    name = "bip"
    selects = True

    def __init__(self, rate: float = 1e-3) -> None:
        self.rate = rate

    def attach(self, layer: Any) -> None:
        layer.register_buffer("balance_q", torch.zeros(layer.num_experts, device=layer.lora_A.device))

    def select(self, layer: Any, logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        net = probs - layer.balance_q
        if layer.training and torch.is_grad_enabled():
            return balanced_assignment(net.detach(), layer.top_k, layer.context.token_weight(probs.shape[0], probs))
        return topk_mask(net, layer.top_k)

    def update(self, layer: Any, x: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor,
               w: torch.Tensor) -> None:
        # The price of an expert rises while the unconstrained choice would overload it.
        free = w @ topk_mask(probs - layer.balance_q, layer.top_k)  # [E]
        layer.balance_q.add_(self.rate * torch.sign(free - free.mean()))
