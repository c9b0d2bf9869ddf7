"""``route_shrink`` and ``adapter_dx`` as Triton kernels (references and custom ops: ``route_shrink.py``).

* ``_route_shrink``: a ``[BM, BN]`` tile of ``z = [x Wr^T | dropout(x) A^T]`` per program, walking
  ``d`` in ``BK`` steps; the weight tile's rows come from ``Wr`` for the first ``E`` columns and from
  ``A`` after (no concatenated copy of the two), zeros elsewhere, so one accumulator serves both.
  The dropout mask is ``tl.rand(seed + salt, t * d + i) >= p`` (Philox: the backward draws it again);
  the programs of the first column tile also store ``xd`` when asked.
* ``_adapter_dx``: a ``[BM, BD]`` tile of ``dx += mask * (dh A) / (1 - p) + dlogits Wr`` per program,
  reading and writing ``dx`` once (the base layer's ``dout W`` is already in it).

Offsets are int32: ``T * d < 2^31`` (a 32768-token batch of width 4096 is 2^27).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from routing_env.moe.kernels.backend import interpreter_upcast

__all__ = ["KERNELS", "adapter_dx_triton", "compile_report", "route_shrink_triton"]

KERNELS = ("route_shrink", "adapter_dx")
BM, BN, BK = 64, 64, 32  # route_shrink tiles (BK 64 needs all 255 registers)
BD, BR = 64, 32  # adapter_dx: d tile, and the step over the E*r (and E) reduction
NUM_WARPS = 8  # at 4 warps a 64 x 64 tile with its dropout draw runs out of registers


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """``tl.dot(a, b)`` with fp32 accumulation; ``UPCAST``: in fp32 (Triton's CPU interpreter gets bf16 dots wrong)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision="ieee")  # fp32 exact as the reference; bf16 goes to the tensor cores


@triton.jit
def _route_shrink(x_ptr, wr_ptr, a_ptr, z_ptr, xd_ptr, seed_ptr, salt, T, D, E, NR, p, inv_keep,
                  DROPOUT: tl.constexpr, WRITE_XD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr, UPCAST: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)  # columns of z: router logits, then the E*r rank columns
    in_m = offs_m < T
    is_r = offs_n < E
    is_a = (offs_n >= E) & (offs_n < E + NR)
    a_row = tl.where(is_a, offs_n - E, 0)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if DROPOUT:
        seed = tl.load(seed_ptr) + salt
    for k0 in range(0, D, BK):
        offs_k = k0 + tl.arange(0, BK)
        in_k = offs_k < D
        xk = tl.load(x_ptr + offs_m[:, None] * D + offs_k[None, :], mask=in_m[:, None] & in_k[None, :], other=0.0)
        wr = tl.load(wr_ptr + offs_n[:, None] * D + offs_k[None, :], mask=is_r[:, None] & in_k[None, :], other=0.0)
        wa = tl.load(a_ptr + a_row[:, None] * D + offs_k[None, :], mask=is_a[:, None] & in_k[None, :], other=0.0)
        if DROPOUT:
            u = tl.rand(seed, offs_m[:, None] * D + offs_k[None, :])
            xdk = tl.where(u >= p, xk.to(tl.float32) * inv_keep, 0.0).to(xk.dtype)
            if WRITE_XD:
                if pid_n == 0:  # one column tile stores it
                    tl.store(xd_ptr + offs_m[:, None] * D + offs_k[None, :], xdk, mask=in_m[:, None] & in_k[None, :])
            acc += _dot(xk, tl.trans(wr), UPCAST) + _dot(xdk, tl.trans(wa), UPCAST)
        else:  # one input: the two weight tiles are disjoint, so their sum is the tile of [Wr; A]
            acc += _dot(xk, tl.trans(wr + wa), UPCAST)
    tl.store(z_ptr + offs_m[:, None] * (E + NR) + offs_n[None, :], acc.to(z_ptr.dtype.element_ty),
             mask=in_m[:, None] & (offs_n < E + NR)[None, :])


@triton.jit
def _adapter_dx(dx_ptr, dh_ptr, a_ptr, dl_ptr, wr_ptr, seed_ptr, salt, T, D, E, NR, STRIDE_DL, p, inv_keep,
                DROPOUT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, UPCAST: tl.constexpr):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_d = tl.program_id(1) * BD + tl.arange(0, BD)
    in_m, in_d = offs_m < T, offs_d < D
    acc = tl.zeros((BM, BD), dtype=tl.float32)
    for r0 in range(0, NR, BR):  # dh @ A over the E*r rank columns
        offs_r = r0 + tl.arange(0, BR)
        in_r = offs_r < NR
        dh = tl.load(dh_ptr + offs_m[:, None] * NR + offs_r[None, :], mask=in_m[:, None] & in_r[None, :], other=0.0)
        a = tl.load(a_ptr + offs_r[:, None] * D + offs_d[None, :], mask=in_r[:, None] & in_d[None, :], other=0.0)
        acc += _dot(dh, a, UPCAST)
    if DROPOUT:
        u = tl.rand(tl.load(seed_ptr) + salt, offs_m[:, None] * D + offs_d[None, :])
        acc = tl.where(u >= p, acc * inv_keep, 0.0)
    for e0 in range(0, E, BR):  # + dlogits @ Wr
        offs_e = e0 + tl.arange(0, BR)
        in_e = offs_e < E
        dl = tl.load(dl_ptr + offs_m[:, None] * STRIDE_DL + offs_e[None, :], mask=in_m[:, None] & in_e[None, :],
                     other=0.0)
        wr = tl.load(wr_ptr + offs_e[:, None] * D + offs_d[None, :], mask=in_e[:, None] & in_d[None, :], other=0.0)
        acc += _dot(dl, wr, UPCAST)
    at = dx_ptr + offs_m[:, None] * D + offs_d[None, :]
    both = in_m[:, None] & in_d[None, :]
    tl.store(at, (tl.load(at, mask=both, other=0.0).to(tl.float32) + acc).to(dx_ptr.dtype.element_ty), mask=both)


def _seed(seed: torch.Tensor | None, p: float, placeholder: torch.Tensor) -> torch.Tensor:
    """The seed pointer; without dropout the kernels never read it, so any tensor will do (no allocation
    and fill, which on a GPU would be one more launch per call)."""
    if p > 0 and seed is None:
        raise ValueError("dropout needs a seed tensor (int64 [1]) on the device")
    return seed if p > 0 else placeholder


def _check_offsets(T: int, D: int) -> None:
    if T * D >= 2**31:  # the dropout draw and the loads index with int32
        raise ValueError(f"{T} tokens x {D} features is past the int32 offsets of these kernels; split the batch")


def route_shrink_triton(x: torch.Tensor, router_w: torch.Tensor, a_flat: torch.Tensor, seed: torch.Tensor | None,
                        salt: int, p: float, keep_xd: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x, router_w, a_flat = x.contiguous(), router_w.contiguous(), a_flat.contiguous()
    T, D = x.shape
    E, NR = router_w.shape[0], a_flat.shape[0]
    _check_offsets(T, D)
    z = torch.empty(T, E + NR, dtype=x.dtype, device=x.device)
    dropout = p > 0
    xd = torch.empty(T if keep_xd and dropout else 0, D, dtype=x.dtype, device=x.device)
    if T:
        grid = (triton.cdiv(T, BM), triton.cdiv(E + NR, BN))
        _route_shrink[grid](x, router_w, a_flat, z, xd if xd.numel() else z, _seed(seed, p, z), salt, T, D, E, NR,
                            float(p), 1.0 / (1.0 - p), DROPOUT=dropout, WRITE_XD=bool(xd.numel()), BM=BM, BN=BN,
                            BK=BK, UPCAST=interpreter_upcast(x), num_warps=NUM_WARPS)
    return z, xd


def adapter_dx_triton(dx: torch.Tensor, dh: torch.Tensor, a_flat: torch.Tensor, dlogits: torch.Tensor,
                      router_w: torch.Tensor, seed: torch.Tensor | None, salt: int, p: float) -> None:
    if not dx.is_contiguous():
        raise ValueError("adapter_dx accumulates into a contiguous dx")
    T, D = dx.shape
    _check_offsets(T, D)
    E, NR = router_w.shape[0], a_flat.shape[0]
    dh, a_flat, router_w = dh.contiguous(), a_flat.contiguous(), router_w.contiguous()
    if dlogits.stride(1) != 1:
        dlogits = dlogits.contiguous()
    if T:
        _adapter_dx[(triton.cdiv(T, BM), triton.cdiv(D, BD))](
            dx, dh, a_flat, dlogits, router_w, _seed(seed, p, dx), salt, T, D, E, NR, dlogits.stride(0), float(p),
            1.0 / (1.0 - p), DROPOUT=p > 0, BM=BM, BD=BD, BR=BR, UPCAST=interpreter_upcast(dx), num_warps=NUM_WARPS)


def compile_report(kernel: str, dtype: str = "bf16", arch: int = 90) -> dict[str, int]:
    """Compile one kernel ahead of time for ``sm_<arch>`` (no GPU needed): registers, shared memory, spills.

    Needs Triton not in interpreter mode (``TRITON_INTERPRET`` unset or 0 when Triton is first imported).
    """
    from routing_env.moe.kernels.aot import cubin_usage, signature

    fn = {"route_shrink": _route_shrink, "adapter_dx": _adapter_dx}[kernel]
    consts = {"DROPOUT": True, "WRITE_XD": True, "BM": BM, "BN": BN, "BK": BK, "UPCAST": False} \
        if kernel == "route_shrink" else {"DROPOUT": True, "BM": BM, "BD": BD, "BR": BR, "UPCAST": False}
    sig = signature(fn, consts, dtype, {"seed_ptr": "i64"}, ("p", "inv_keep"))
    return cubin_usage(fn, sig, consts, arch, num_warps=NUM_WARPS)
