"""The two thin GEMMs around the expert gate of the low-rank LoRA-MoE form, each reading its wide operand once.

* ``routing_env::route_shrink``: ``z = [x Wr^T | dropout(x) A^T]``, ``[T, E + E*r]``: the router logits
  and every expert's down-projection from one pass over ``x`` (the adapter input's dropout drawn inside,
  from a counter-based generator keyed by ``seed + salt``, so the backward draws the same mask again
  instead of storing it); ``xd = dropout(x)`` too when asked (the ``A`` gradient needs it).
* ``routing_env::adapter_dx``: the backward's ``dx += dropout'(dh A) + dlogits Wr``, in place, the same
  mask again; the base layer's ``dout W`` is the cuBLAS GEMM that ``dx`` starts from.

One Triton kernel each on CUDA (``route_shrink_triton.py``); elsewhere the PyTorch references below,
whose mask comes from a ``torch.Generator`` seeded with ``seed + salt`` (another stream than the
GPU's: each device's forward and backward agree with themselves, which is what dropout needs).
Keep probability: ``u >= p`` for ``u`` uniform in [0, 1), kept values scaled by ``1 / (1 - p)``.
"""

from __future__ import annotations

from typing import Optional

import torch

from routing_env.moe.kernels.backend import use_triton

__all__ = ["adapter_dx", "adapter_dx_reference", "dropout_keep", "route_shrink", "route_shrink_reference"]


def dropout_keep(shape: tuple[int, int], seed: torch.Tensor, salt: int, p: float, device: torch.device) -> torch.Tensor:
    """``[T, d]`` bool: the elements dropout keeps (the references' mask, a function of ``seed + salt``)."""
    g = torch.Generator(device=device).manual_seed(int(seed.reshape(-1)[0]) + salt)
    return torch.rand(shape, generator=g, device=device) >= p


def route_shrink_reference(x: torch.Tensor, router_w: torch.Tensor, a_flat: torch.Tensor,
                           keep: torch.Tensor | None, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z [T, E + E*r], xd [T, d])`` with the dropout mask ``keep`` (None: no dropout); differentiable."""
    xd = x if keep is None else torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros((), dtype=x.dtype))
    return torch.cat([x @ router_w.t(), xd @ a_flat.t()], dim=1), xd


def adapter_dx_reference(dh: torch.Tensor, a_flat: torch.Tensor, dlogits: torch.Tensor, router_w: torch.Tensor,
                         keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """``[T, d]`` what ``adapter_dx`` adds to ``dx``."""
    da = (dh.float() @ a_flat.float())
    if keep is not None:
        da = torch.where(keep, da * (1.0 / (1.0 - p)), 0.0)
    return da + dlogits.float() @ router_w.float()


@torch.library.custom_op("routing_env::route_shrink", mutates_args=())
def route_shrink(x: torch.Tensor, router_w: torch.Tensor, a_flat: torch.Tensor, seed: Optional[torch.Tensor], salt: int,
                 p: float, keep_xd: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z [T, E + E*r], xd [T, d] or [0, d])``: router logits and down-projections of dropout(x) in one
    pass over ``x``; ``seed`` (int64 ``[1]``) is needed when ``p > 0``. See the module docstring."""
    if use_triton(x):
        from routing_env.moe.kernels.route_shrink_triton import route_shrink_triton

        return route_shrink_triton(x, router_w, a_flat, seed, salt, p, keep_xd)
    keep = dropout_keep(tuple(x.shape), seed, salt, p, x.device) if p > 0 else None
    with torch.no_grad():
        z, xd = route_shrink_reference(x, router_w, a_flat, keep, p)
    return z, (xd.clone() if keep_xd and p > 0 else x.new_empty(0, x.shape[1]))


@route_shrink.register_fake
def _(x, router_w, a_flat, seed, salt, p, keep_xd):
    rows = x.shape[0] if keep_xd and p > 0 else 0
    return x.new_empty(x.shape[0], router_w.shape[0] + a_flat.shape[0]), x.new_empty(rows, x.shape[1])


@torch.library.custom_op("routing_env::adapter_dx", mutates_args=("dx",))
def adapter_dx(dx: torch.Tensor, dh: torch.Tensor, a_flat: torch.Tensor, dlogits: torch.Tensor, router_w: torch.Tensor,
               seed: Optional[torch.Tensor], salt: int, p: float) -> None:
    """``dx += dropout'(dh @ A) + dlogits @ Wr`` in place (the mask of ``route_shrink`` with the same seed)."""
    if use_triton(dx):
        from routing_env.moe.kernels.route_shrink_triton import adapter_dx_triton

        adapter_dx_triton(dx, dh, a_flat, dlogits, router_w, seed, salt, p)
        return
    keep = dropout_keep(tuple(dx.shape), seed, salt, p, dx.device) if p > 0 else None
    dx.add_(adapter_dx_reference(dh, a_flat, dlogits, router_w, keep, p).to(dx.dtype))


@adapter_dx.register_fake
def _(dx, dh, a_flat, dlogits, router_w, seed, salt, p):
    return None
