"""Which implementation of the expert ops runs where, and the tiling constants a kernel shares with its reference.

* ``triton_enabled``: Triton is installed and not switched off (``ROUTING_GYM_TRITON=0``); the ops
  take their Triton kernels for CUDA tensors only then.
* ``fused_enabled`` / ``fused_everywhere``: whether the layers take the fused low-rank ops
  (``kernels.lowrank``): on CUDA with Triton; on a CPU only inside ``fused_everywhere()`` (to count
  the GPU path's launches or test it there; the CPU keeps its composite form, which caches more and
  is bit for bit the numbers of the committed runs).
* ``GATE_BLOCK``: tokens per program of the gate kernels, and per row of their block statistics.

A leaf module (it imports no kernel), so that every kernel file and its reference can import it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Iterator

import torch

__all__ = ["GATE_BLOCK", "fused_enabled", "fused_everywhere", "triton_enabled"]

GATE_BLOCK = 32
_FUSED_ON_CPU = False


@functools.lru_cache(maxsize=1)
def triton_enabled() -> bool:
    """Triton is installed and not switched off (``ROUTING_GYM_TRITON=0`` falls back to the references)."""
    return importlib.util.find_spec("triton") is not None and os.environ.get("ROUTING_GYM_TRITON", "1") != "0"


def fused_enabled(device: torch.device) -> bool:
    """Whether layers on ``device`` run the fused low-rank ops (see the module docstring)."""
    if device.type == "cuda":
        return triton_enabled()
    return _FUSED_ON_CPU


@contextlib.contextmanager
def fused_everywhere() -> Iterator[None]:
    """Run the fused low-rank path on any device (on a CPU: to count its launches, or to test it)."""
    global _FUSED_ON_CPU
    before, _FUSED_ON_CPU = _FUSED_ON_CPU, True
    try:
        yield
    finally:
        _FUSED_ON_CPU = before
