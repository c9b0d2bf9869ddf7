"""Which implementation of the expert ops runs where, and the tiling constants a kernel shares with its reference.

* ``triton_enabled``: Triton is installed and not switched off (``ROUTING_GYM_TRITON=0``);
  ``use_triton(t)``: an op on ``t`` takes its Triton kernel (CUDA tensors, Triton enabled), else its
  PyTorch reference; ``interpreter_upcast(t)``: a kernel run by Triton's CPU interpreter on bf16
  takes its dots in fp32 (the interpreter's bf16 ``tl.dot`` is wrong).
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

__all__ = ["GATE_BLOCK", "fused_enabled", "fused_everywhere", "interpreter_upcast", "triton_enabled", "use_triton"]

GATE_BLOCK = 32
_FUSED_ON_CPU = False


@functools.lru_cache(maxsize=1)
def triton_enabled() -> bool:
    """Triton is installed and not switched off (``ROUTING_GYM_TRITON=0`` falls back to the references)."""
    return importlib.util.find_spec("triton") is not None and os.environ.get("ROUTING_GYM_TRITON", "1") != "0"


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on ``t`` runs its Triton kernel (a CUDA tensor, Triton enabled) rather than its reference."""
    return t.is_cuda and triton_enabled()


def interpreter_upcast(t: torch.Tensor) -> bool:
    """Whether a kernel on ``t`` takes its dots in fp32: off the GPU Triton's interpreter runs the kernels, and
    its ``tl.dot`` on bf16 operands is wrong (measured: error 2.5e10 on a 16 x 16 product, triton 3.9); on
    the GPU bf16 operands go to the tensor cores as they are."""
    return t.device.type != "cuda" and t.dtype != torch.float32


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
