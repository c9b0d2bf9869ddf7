"""The expert gate of the low-rank LoRA-MoE form as two Triton kernels: forward and backward.

One program handles ``BT`` tokens and every expert (``E`` padded to a power of two ``EP``):

* forward: softmax of the router logits, top-k of ``logits + selection bias`` (ties to the lower
  expert id), the chosen experts' probabilities (renormalised for top-k > 1), and ``hg = h * gate *
  scale`` written over the ``E * r`` rank columns of the shrink output ``h``, each element read and
  written once; also ``pc [T, 2E]`` (probabilities, then 0/1 choices); when asked, the weighted
  expert counts added into a float64 ``loads [E]`` (integers: exact in any order, so the atomics
  give the same sums every run) and each block's weighted sums of probabilities and choices,
  ``stats [num_blocks, 2E]`` (plain stores; the caller sums the blocks, for all layers at once);
* backward: ``dh = dhg * gate * scale`` and the router-logit gradient through the renormalisation
  and the softmax, adding the gradients of ``probs`` that the caller's statistics send back
  (``dprobs [T, E]``, and ``w [T]`` times the gradient of each block's ``stats`` row).

The PyTorch reference and the custom ops are in ``expert_gate.py``; tests compare the two on CPU
through ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from routing_env.moe.kernels.backend import GATE_BLOCK as BLOCK_T

__all__ = ["KERNELS", "compile_report", "gate_backward_triton", "gate_forward_triton"]

KERNELS = ("gate_fwd", "gate_bwd")


@triton.jit
def _column(tile, offs_e, e):
    """``tile[:, e]`` of a ``[BT, EP]`` register tile, as ``[BT]``."""
    return tl.sum(tl.where(offs_e[None, :] == e, tile, 0.0), axis=1)


@triton.jit
def _gates(p, c, RENORM: tl.constexpr):
    """The chosen experts' probabilities, renormalised over them when ``RENORM`` (``[BT, EP]``)."""
    g = p * c
    if RENORM:
        s = tl.sum(g, axis=1)
        g = g / tl.where(s > 0, s, 1.0)[:, None]  # 0 only on the masked rows past T
    return g


@triton.jit
def _gate_fwd(logit_ptr, h_ptr, bias_ptr, w_ptr, loads_ptr, stats_ptr, hg_ptr, pc_ptr, T, E, R, ROWS_PER_BIAS, STRIDE_L,
              STRIDE_H, scale, HAS_BIAS: tl.constexpr, HAS_LOADS: tl.constexpr, HAS_STATS: tl.constexpr, TOP_K: tl.constexpr, RENORM: tl.constexpr,
              EP: tl.constexpr, RP: tl.constexpr, BT: tl.constexpr):
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    in_t = offs_t < T
    offs_e = tl.arange(0, EP)
    in_e = offs_e < E
    both = in_t[:, None] & in_e[None, :]
    logits = tl.load(logit_ptr + offs_t[:, None] * STRIDE_L + offs_e[None, :], mask=both, other=0.0).to(tl.float32)
    z = tl.where(in_e[None, :], logits, float("-inf"))
    ex = tl.exp(z - tl.max(z, axis=1)[:, None])
    p = ex / tl.sum(ex, axis=1)[:, None]  # [BT, EP] softmax over the real experts
    sel = z
    if HAS_BIAS:
        row = offs_t // ROWS_PER_BIAS  # the row (sequence) of each token: a bias is per row
        sel += tl.load(bias_ptr + row[:, None] * E + offs_e[None, :], mask=both, other=0.0)
    chosen = offs_e[None, :] < 0  # [BT, EP] all False
    for _ in tl.static_range(TOP_K):
        v = tl.where(chosen, float("-inf"), sel)
        best = tl.max(v, axis=1)
        # The lowest-numbered unchosen real expert at the maximum (also when all that is left is -inf).
        cand = (v == best[:, None]) & ~chosen & in_e[None, :]
        pick = tl.min(tl.where(cand, offs_e[None, :], EP), axis=1)
        chosen = chosen | (offs_e[None, :] == pick[:, None])
    c = chosen.to(tl.float32)
    g = _gates(p, c, RENORM) * scale
    pc_row = pc_ptr + offs_t[:, None] * (2 * E) + offs_e[None, :]
    tl.store(pc_row, p, mask=both)
    tl.store(pc_row + E, c, mask=both)
    offs_r = tl.arange(0, RP)
    cols = in_t[:, None] & (offs_r[None, :] < R)
    for e in range(E):
        ge = _column(g, offs_e, e)  # [BT]
        col = e * R + offs_r[None, :]
        h = tl.load(h_ptr + offs_t[:, None] * STRIDE_H + col, mask=cols, other=0.0).to(tl.float32)
        tl.store(hg_ptr + offs_t[:, None] * (E * R) + col, (h * ge[:, None]).to(hg_ptr.dtype.element_ty), mask=cols)
    if HAS_LOADS or HAS_STATS:
        w = tl.load(w_ptr + offs_t, mask=in_t, other=0.0)
        counts = tl.sum(c * w[:, None], axis=0)  # [EP] this block's weighted counts
        if HAS_LOADS:
            tl.atomic_add(loads_ptr + offs_e, counts.to(tl.float64), mask=in_e)
        if HAS_STATS:
            row = stats_ptr + tl.program_id(0) * (2 * E) + offs_e
            tl.store(row, tl.sum(p * w[:, None], axis=0), mask=in_e)
            tl.store(row + E, counts, mask=in_e)


@triton.jit
def _gate_bwd(dhg_ptr, h_ptr, pc_ptr, dprobs_ptr, w_ptr, dstats_ptr, dlogit_ptr, dh_ptr, T, E, R, STRIDE_H, STRIDE_DP,
              STRIDE_DS, scale, HAS_DPROBS: tl.constexpr, HAS_DSTATS: tl.constexpr, RENORM: tl.constexpr, EP: tl.constexpr,
              RP: tl.constexpr, BT: tl.constexpr):
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    in_t = offs_t < T
    offs_e = tl.arange(0, EP)
    in_e = offs_e < E
    both = in_t[:, None] & in_e[None, :]
    pc_row = pc_ptr + offs_t[:, None] * (2 * E) + offs_e[None, :]
    p = tl.load(pc_row, mask=both, other=0.0)
    c = tl.load(pc_row + E, mask=both, other=0.0)
    g = _gates(p, c, RENORM)
    offs_r = tl.arange(0, RP)
    cols = in_t[:, None] & (offs_r[None, :] < R)
    u = tl.zeros((BT, EP), dtype=tl.float32)  # dL / d gate_e
    for e in range(E):
        ge = _column(g, offs_e, e) * scale
        at = offs_t[:, None] * (E * R) + e * R + offs_r[None, :]
        dhg = tl.load(dhg_ptr + at, mask=cols, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + offs_t[:, None] * STRIDE_H + e * R + offs_r[None, :], mask=cols, other=0.0).to(tl.float32)
        tl.store(dh_ptr + at, (dhg * ge[:, None]).to(dh_ptr.dtype.element_ty), mask=cols)
        u += tl.where(offs_e[None, :] == e, (scale * tl.sum(dhg * h, axis=1))[:, None], 0.0)
    if RENORM:  # g = p c / sum(p c): dp_m = c_m / S (u_m - sum_e u_e g_e)
        s = tl.sum(p * c, axis=1)
        dp = c / tl.where(s > 0, s, 1.0)[:, None] * (u - tl.sum(u * g, axis=1)[:, None])
    else:
        dp = c * u
    if HAS_DPROBS:
        dp += tl.load(dprobs_ptr + offs_t[:, None] * STRIDE_DP + offs_e[None, :], mask=both, other=0.0)
    if HAS_DSTATS:  # this block's row of stats is sum_t w_t probs[t]: its gradient spread back to the tokens
        w = tl.load(w_ptr + offs_t, mask=in_t, other=0.0)
        ds = tl.load(dstats_ptr + tl.program_id(0) * STRIDE_DS + offs_e, mask=in_e, other=0.0)
        dp += w[:, None] * ds[None, :]
    dz = p * (dp - tl.sum(p * dp, axis=1)[:, None])  # softmax backward
    tl.store(dlogit_ptr + offs_t[:, None] * E + offs_e[None, :], dz.to(dlogit_ptr.dtype.element_ty), mask=both)


def _pow2(n: int, least: int = 2) -> int:
    return max(least, triton.next_power_of_2(n))


def gate_forward_triton(logits: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None, w: torch.Tensor | None,
                        loads: torch.Tensor | None, top_k: int, renorm: bool, scale: float, stats: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hg [T, E*r], pc [T, 2E] fp32, stats [num_blocks, 2E] fp32, empty unless asked)``; adds the
    ``w``-weighted counts into ``loads`` when given."""
    T, E = logits.shape
    R = h.shape[1] // E
    # Rows may be strided (logits and h as column slices of one GEMM's output); columns must be dense.
    if logits.stride(1) != 1 or h.stride(1) != 1:
        logits, h = logits.contiguous(), h.contiguous()
    if bias is not None:  # read as [R, E] rows (an env's bias may be a broadcast view)
        bias = bias.float().contiguous()
    hg = torch.empty(T, E * R, dtype=h.dtype, device=h.device)
    pc = torch.empty(T, 2 * E, dtype=torch.float32, device=h.device)
    blocks = triton.cdiv(T, BLOCK_T)
    block_stats = torch.empty(blocks if stats else 0, 2 * E, dtype=torch.float32, device=h.device)
    rows_per_bias = T // bias.shape[0] if bias is not None and bias.shape[0] else 1
    if T:
        _gate_fwd[(blocks,)](
            logits, h, bias if bias is not None else pc, w if w is not None else pc, loads if loads is not None else pc,
            block_stats if stats else pc, hg, pc, T, E, R, rows_per_bias, logits.stride(0), h.stride(0), float(scale),
            HAS_BIAS=bias is not None, HAS_LOADS=loads is not None and w is not None, HAS_STATS=stats and w is not None,
            TOP_K=top_k, RENORM=renorm, EP=_pow2(E), RP=_pow2(R), BT=BLOCK_T)
    return hg, pc, block_stats


def gate_backward_triton(dhg: torch.Tensor, h: torch.Tensor, pc: torch.Tensor, dprobs: torch.Tensor | None,
                         w: torch.Tensor | None, dstats: torch.Tensor | None, renorm: bool, scale: float,
                         logit_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dlogits [T, E] in logit_dtype, dh [T, E*r])``."""
    T, E = pc.shape[0], pc.shape[1] // 2
    R = h.shape[1] // E
    dlogits = torch.empty(T, E, dtype=logit_dtype, device=h.device)
    if h.stride(1) != 1:
        h = h.contiguous()
    if dprobs is not None and dprobs.stride(1) != 1:
        dprobs = dprobs.contiguous()
    dh = torch.empty(T, E * R, dtype=h.dtype, device=h.device)
    if T:
        has_ds = dstats is not None and w is not None
        if has_ds and dstats.stride(1) != 1:
            dstats = dstats.contiguous()
        _gate_bwd[(triton.cdiv(T, BLOCK_T),)](
            dhg.contiguous(), h, pc, dprobs if dprobs is not None else pc, w if has_ds else pc,
            dstats if has_ds else pc, dlogits, dh, T, E, R, h.stride(0), dprobs.stride(0) if dprobs is not None else E,
            dstats.stride(0) if has_ds else 0, float(scale), HAS_DPROBS=dprobs is not None, HAS_DSTATS=has_ds,
            RENORM=renorm, EP=_pow2(E), RP=_pow2(R), BT=BLOCK_T)
    return dlogits, dh


def compile_report(kernel: str, dtype: str = "bf16", experts: int = 16, rank: int = 16, arch: int = 90
                   ) -> dict[str, int]:
    """Compile one gate kernel ahead of time for ``sm_<arch>`` (no GPU needed) and read its resources:
    registers per thread, static and dynamic shared memory, and local memory (register spills).

    Needs Triton not in interpreter mode (``TRITON_INTERPRET`` unset or 0 when Triton is first imported).
    """
    from routing_env.moe.kernels.aot import cubin_usage, signature

    fn = {"gate_fwd": _gate_fwd, "gate_bwd": _gate_bwd}[kernel]
    consts = {"RENORM": True, "EP": _pow2(experts), "RP": _pow2(rank), "BT": BLOCK_T}
    consts |= {"HAS_BIAS": True, "HAS_LOADS": True, "HAS_STATS": True, "TOP_K": 2} if kernel == "gate_fwd" else \
        {"HAS_DPROBS": True, "HAS_DSTATS": True}
    fp32 = {n: "fp32" for n in ("bias_ptr", "w_ptr", "stats_ptr", "pc_ptr", "dprobs_ptr", "dstats_ptr")}
    return cubin_usage(fn, signature(fn, consts, dtype, fp32 | {"loads_ptr": "fp64"}, ("scale",)), consts, arch)
