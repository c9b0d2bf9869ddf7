"""Argument checks of the envs: a bad number or device refused up front, naming the argument."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch

__all__ = ["check_device", "check_env_args", "check_number"]


def check_number(owner: str, name: str, value: Any, *, integer: bool = False, low: float | None = None,
                 high: float | None = None, optional: bool = False) -> None:
    """Refuse a bad numeric argument up front: a ``ValueError`` naming it, its value and the valid range.

    Without this, ``cache_mb=-5`` is accepted, ``balance_weight=nan`` turns every reward into NaN, and
    ``max_examples=0`` or ``obs_proj_dim=-1`` fail deep inside numpy after a model has loaded (or a
    demo warm-up has trained). A number is a real, finite, non-bool value; an integer an integral one.
    """
    if optional and value is None:
        return
    if integer:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    else:
        ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        kind = "an integer" if integer else "a finite number"
        if low is not None and high is not None:
            bounds = f" in [{low:g}, {high:g}]"
        else:
            bounds = f" >= {low:g}" if low is not None else f" <= {high:g}" if high is not None else ""
        raise ValueError(f"{owner}: {name} must be {kind}{bounds}{' (or None)' if optional else ''}, got {value!r}")


def check_env_args(balance_weight: Any, num_groups: Any, group_sizes: Any, max_examples: Any, obs_proj_dim: Any,
                   projection_seed: Any, cache_mb: Any, num_experts: Any) -> None:
    """``RoutingEnv``'s numeric arguments' valid ranges; those that need the model (num_groups at most
    the layer count, group_sizes summing to it) are checked again once it has loaded."""
    check_number("RoutingEnv", "balance_weight", balance_weight)  # any sign; 0 turns the balance term off
    check_number("RoutingEnv", "num_groups", num_groups, integer=True, low=1, optional=True)
    if group_sizes is not None and not (isinstance(group_sizes, (list, tuple)) and group_sizes and all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in group_sizes)):
        raise ValueError(f"RoutingEnv: group_sizes must be a list of integers >= 1 (or None), got {group_sizes!r}")
    check_number("RoutingEnv", "max_examples", max_examples, integer=True, low=1, optional=True)
    check_number("RoutingEnv", "obs_proj_dim", obs_proj_dim, integer=True, low=0)  # 0: no hidden-state features
    check_number("RoutingEnv", "projection_seed", projection_seed, integer=True, low=0)  # numpy seeds are >= 0
    check_number("RoutingEnv", "cache_mb", cache_mb, low=0)  # 0 keeps only the newest entry (slow, still right)
    check_number("RoutingEnv", "num_experts", num_experts, integer=True, low=1, optional=True)


def check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"RoutingEnv: device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"RoutingEnv: device {device!r} asked for, but torch sees no CUDA device; use device='cpu'")
    return dev
