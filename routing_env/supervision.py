"""Process supervision of the routers (stage 3): routing targets -> a loss on each group's router.

The loss compares, per example and layer group, the router's distribution averaged over the group's
adapted modules and the example's real tokens (``RoutingContext.example_group_probs``) with the
target distribution of that group: ``KL(target || router)``. Averaged, not per token, because a
target is a per-example decision for the whole group (in the MDP one expert is forced into *every*
token's top-k); a per-token loss would pull all tokens onto one expert and erase the token-level
specialisation the router learned in the warm-up, while the averaged loss only moves the group's
overall preference. Examples without a target (search ran on a subset) contribute no routing loss.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from routing_env.targets import RoutingTargets, check_compatible

__all__ = ["WEIGHTINGS", "TargetTable", "routing_loss", "group_agreement"]

#: How each (example, group) term is weighted: equally, or by how much the search said the choice
#: mattered (the spread of its process values, max Q - min Q, normalised to mean 1 over the file).
WEIGHTINGS = ("none", "value-gap")


def routing_loss(probs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of ``KL(targets || probs)`` over (example, group) terms with weight > 0.

    ``probs``, ``targets`` ``[B, G, E]``; ``weights [B, G]`` (0 = no target). Zero exactly when the
    router already matches the targets wherever a target is given.
    """
    t = targets.to(probs.dtype)
    kl = (torch.xlogy(t, t) - t * torch.log(probs.clamp_min(1e-12))).sum(-1)  # [B, G]
    w = weights.to(probs.dtype)
    return (kl * w).sum() / w.sum().clamp_min(1e-12)


def group_agreement(probs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[G]`` share of targeted examples whose router argmax is the target's argmax, per group."""
    has = (weights > 0).to(probs.dtype)  # [B, G]
    same = (probs.argmax(-1) == targets.argmax(-1)).to(probs.dtype)
    return (same * has).sum(0) / has.sum(0).clamp_min(1.0)


class TargetTable:
    """Targets of a file, checked against the model, looked up by example id for training batches."""

    def __init__(self, targets: RoutingTargets, expected: dict, weighting: str = "none") -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown routing-loss weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
        check_compatible(targets.header, expected)
        if targets.header.get("action_mode", "primary") != "primary":
            raise ValueError("stage 3 needs per-expert targets (a search with action_mode='primary')")
        self.G, self.E = targets.header["num_groups"], targets.header["num_experts"]
        self.targets = {k: r["targets"] for k, r in targets.records.items()}
        gaps = {k: self._gap(r["values"]) for k, r in targets.records.items()}
        mean_gap = np.mean([g for v in gaps.values() for g in v if g > 0] or [1.0])
        self.weights = {k: (g / mean_gap if weighting == "value-gap" else np.ones(self.G)) for k, g in gaps.items()}

    @staticmethod
    def _gap(values: np.ndarray) -> np.ndarray:  # [G]: max Q - min Q over estimated actions (0 if < 2)
        out = np.zeros(values.shape[0])
        for g, row in enumerate(values):
            est = row[~np.isnan(row)]
            out[g] = est.max() - est.min() if len(est) > 1 else 0.0
        return out

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``targets [B, G, E]`` and ``weights [B, G]`` (zeros for examples without a target)."""
        t, w = np.zeros((len(ids), self.G, self.E)), np.zeros((len(ids), self.G))
        for b, i in enumerate(ids):
            if i in self.targets:
                t[b], w[b] = self.targets[i], self.weights[i]
        return torch.from_numpy(t).float(), torch.from_numpy(w).float()
