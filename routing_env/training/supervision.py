"""Process supervision of the routers (stage 3): routing targets -> a loss on each group's router.

The loss compares, per example and layer group, the router's distribution averaged over the group's
adapted modules and the example's real tokens (``RoutingRecorder.example_group_probs``) with the
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

from routing_env.common.configs import GRANULARITIES, WEIGHTINGS  # the choices, declared once
from routing_env.targets import (TARGET_BALANCING, TARGET_FORMS, RoutingTargets, balance_targets,
                                        check_compatible, target_form)

__all__ = ["GRANULARITIES", "WEIGHTINGS", "TargetTable", "routing_loss", "group_agreement", "forced_route_bias"]



def routing_loss(probs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                 log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean of ``KL(targets || probs)`` over (example, group) terms with weight > 0.

    ``probs``, ``targets`` ``[B, G, E]``; ``weights [B, G]`` (0 = no target). Zero exactly when the
    router already matches the targets wherever a target is given. With ``log_probs [B, G, E]``
    (the tokens' mean log probabilities, ``example_group_probs(log=True)``) it is the mean over
    tokens of the per-token KL instead, which asks *every* token to follow the target.
    """
    t = targets.to(probs.dtype)
    logp = log_probs if log_probs is not None else torch.log(probs.clamp_min(1e-12))
    kl = (torch.xlogy(t, t) - t * logp).sum(-1)  # [B, G]
    w = weights.to(probs.dtype)
    return (kl * w).sum() / w.sum().clamp_min(1e-12)


def group_agreement(probs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[G]`` share of targeted examples whose router argmax is the target's argmax, per group."""
    has = (weights > 0).to(probs.dtype)  # [B, G]
    same = (probs.argmax(-1) == targets.argmax(-1)).to(probs.dtype)
    return (same * has).sum(0) / has.sum(0).clamp_min(1.0)


def forced_route_bias(paths: torch.Tensor, row_example: torch.Tensor,
                      group_experts: int | Sequence[int]) -> dict[int, torch.Tensor]:
    """Teacher forcing: ``paths [B, G]`` (-1 = free) -> per group a ``[R, E_g]`` selection bias for the batch's rows.

    ``group_experts``: the experts of every group (one number), or of each (a MoLA model).

    ``row_example [R]`` is the example of each (question, choice) row; a forced row puts its
    example's searched expert into every token's top-k in that group, as the env's primary action does.
    """
    from routing_env.moe.routing import primary_bias

    per_row = paths[row_example]  # [R, G]
    G = paths.shape[1]
    widths = [group_experts] * G if isinstance(group_experts, int) else list(group_experts)
    return {g: primary_bias(per_row[:, g], widths[g]) for g in range(G)}


class TargetTable:
    """Targets of a file, checked against the model, looked up by example id for training batches."""

    def __init__(self, targets: RoutingTargets, expected: dict, weighting: str = "none", balancing: str = "none",
                 form: str = "file", temperature: float = 1.0) -> None:
        if form not in TARGET_FORMS:
            raise ValueError(f"unknown target form {form!r}; valid: {', '.join(TARGET_FORMS)}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown routing-loss weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
        if balancing not in TARGET_BALANCING:
            raise ValueError(f"unknown target balancing {balancing!r}; valid: {', '.join(TARGET_BALANCING)}")
        check_compatible(targets.header, expected)
        self.header = targets.header
        if targets.header.get("action_mode", "primary") != "primary":
            raise ValueError("stage 3 needs per-expert targets (a search with action_mode='primary')")
        self.G, self.E = targets.header["num_groups"], targets.header["num_experts"]
        #: experts per group (MoLA: fewer in lower groups; their targets are 0 beyond)
        self.group_experts = list(targets.header.get("group_experts") or [self.E] * self.G)
        self.targets = {k: target_form(r, form, temperature) for k, r in targets.records.items()}
        self.paths = {k: np.asarray(r["path"], dtype=int) for k, r in targets.records.items()}
        if balancing == "sinkhorn" and self.targets:
            keys = list(self.targets)
            stacked = np.stack([self.targets[k] for k in keys])  # [N, G, E]
            for g, w in enumerate(self.group_experts):
                stacked[:, g, :w] = balance_targets(stacked[:, g, :w])
            self.targets = dict(zip(keys, stacked))
        gaps = {k: self._gap(r["values"]) for k, r in targets.records.items()}
        if weighting == "value-gap" and gaps and not any(g.any() for g in gaps.values()):
            # Every weight would be 0: the routing loss identically zero, stage 3 = the base run.
            raise ValueError(f"--route-weighting value-gap needs process values, but the targets of agent "
                             f"{targets.header.get('agent')!r} have none (no two estimated actions in any group); "
                             "use --route-weighting none, or targets from an agent with values (mcts, exhaustive)")
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

    def histogram(self) -> np.ndarray:
        """``[G, E]`` mean target mass per expert over the file's questions (uniform = 1/E each).

        What stage 3 asks of each group's router on average: a skewed row here becomes a skewed
        expert load after training."""
        if not self.targets:
            return np.full((self.G, self.E), np.nan)
        return np.mean(np.stack(list(self.targets.values())), axis=0)

    def batch_paths(self, ids: Sequence[str]) -> torch.Tensor:
        """``[B, G]`` searched paths (-1 rows for examples without a target)."""
        return torch.tensor(np.stack([self.paths.get(i, np.full(self.G, -1)) for i in ids]), dtype=torch.long)

    def batch(self, ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``targets [B, G, E]`` and ``weights [B, G]`` (zeros for examples without a target)."""
        t, w = np.zeros((len(ids), self.G, self.E)), np.zeros((len(ids), self.G))
        for b, i in enumerate(ids):
            if i in self.targets:
                t[b], w[b] = self.targets[i], self.weights[i]
        return torch.from_numpy(t).float(), torch.from_numpy(w).float()
