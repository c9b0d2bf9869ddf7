"""The grouped LoRA-MoE expert op as Triton kernels, without atomics, registered as a custom op.

``y[t] = scale * sum_j gate[t, j] * B[e_tj] @ (A[e_tj] @ x[t])`` with ``x [T, d_in]``,
``A [E, r, d_in]``, ``B [E, d_out, r]``, ``expert_idx / gates [T, k]``; its PyTorch reference is
``lora_moe_reference`` (``lora_moe.py``), which the tests compare outputs and all four gradients
(x, A, B, gates) against, on CPU through ``TRITON_INTERPRET=1`` and on the GPU.

Four kernels (``KERNELS``), each element of each output written by exactly one program:

* ``align`` (one launch, a program per 1024 or more assignments): the ``N = T * k`` (token, slot)
  assignments sorted by expert, each expert's run padded to whole blocks of ``BLOCK_M`` (``ids``,
  -1 = padding), the expert of each block (``block_expert``, -1 = unused) and each expert's first
  block (``block_start [E + 1]``), in one int32 buffer, the "plan". The number of blocks has a
  static bound, so nothing syncs the host.
* ``fwd`` (a program per block): gathers its rows of ``x``, computes the rank activations
  ``h = x A_e^T`` once, scales them by gate * scale, and stores ``h B_e^T`` tile by tile into a
  per-slot output ``[N, d_out]``; the ``k`` slots of a token are summed by one reduction after.
* ``bwd_dx`` (a program per block): ``dgate``, the per-slot ``dx [N, d_in]`` (summed over k after)
  and the gated rank activations ``w * x A_e^T`` and ``w * dy B_e`` of its rows, kept for ``bwd_dw``.
* ``bwd_dw`` (a program per expert and d_in or d_out tile): walks its expert's blocks and sums
  ``dA_e`` or ``dB_e`` for its tile in fp32 registers, then stores it once (zero for an empty expert).

The kernels read ``B`` rank-major (``[E, r, d_out]`` in memory, as ``LoRAMoELinear`` stores it, so the
layer's ``B`` goes in without a copy and ``dB`` comes out in its layout; along ``d_out`` the loads
are contiguous). Without atomics the results are the same run to run. ``r`` is padded to a power of two of at least 16
(the smallest ``tl.dot``), up to 64 compiled without register spills at these tile sizes.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from routing_env.moe.kernels.backend import interpreter_upcast

__all__ = ["BLOCK_M", "KERNELS", "align_assignments", "compile_report", "lora_moe_sorted", "lora_moe_triton"]

BLOCK_M = 64  # assignments per program of fwd / bwd_dx (tl.dot needs >= 16)
BLOCK_K = 64  # d_in tile
BLOCK_N = 64  # d_out tile
KERNELS = ("align", "fwd", "bwd_dx", "bwd_dw")
# Measured by compile_report (sm_90, triton 3.9): at 4 warps fwd / bwd_dx sit at the 255-register cap
# even for bf16 at rank 16 (gathered [BM, BK] row tiles); at 8 warps they take 123-255, with no spills.
NUM_WARPS = {"align": 4, "fwd": 8, "bwd_dx": 8, "bwd_dw": 4}


@triton.jit
def _mm(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot(a, b)``; ``UPCAST`` computes it in fp32 (Triton's CPU interpreter gets bf16 dots wrong)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _align_kernel(eid_ptr, ids_ptr, bexp_ptr, bstart_ptr, N, E, NB, BM: tl.constexpr, EP: tl.constexpr,
                  CN: tl.constexpr, CS: tl.constexpr, CH: tl.constexpr, CB: tl.constexpr):
    # Program p scatters assignments [p * CS, (p + 1) * CS). Without atomics it needs every expert's
    # count and the counts before its chunk, so each program histograms all N (CN at a time): the
    # latency of one pass over N ids, the scatter itself spread over the programs.
    pid = tl.program_id(0)
    start = pid * CS
    offs_e = tl.arange(0, EP)
    counts = tl.zeros((EP,), dtype=tl.int32)  # [EP] assignments per expert
    before = tl.zeros((EP,), dtype=tl.int32)  # [EP] of those, before this program's chunk
    for c0 in range(0, N, CN):
        offs = c0 + tl.arange(0, CN)
        e = tl.load(eid_ptr + offs, mask=offs < N, other=0).to(tl.int32)
        h = tl.histogram(e, EP, mask=offs < N)
        counts += h
        before += tl.where(c0 < start, h, 0)  # CN divides CS: a chunk lies wholly before or not
    nblk = (counts + BM - 1) // BM  # [EP] whole blocks per expert (0 for an empty one)
    bend = tl.cumsum(nblk, axis=0)  # [EP] one past each expert's last block
    bstart = bend - nblk
    if pid == 0:
        tl.store(bstart_ptr + offs_e, bstart, mask=offs_e < E)
        tl.store(bstart_ptr + E, tl.sum(nblk, axis=0))
    # Each block's expert and how many of its rows are real: the rest (and unused blocks) get -1.
    # These positions are disjoint from the ones the scatter below writes, so no barrier is needed.
    rows = tl.arange(0, BM)
    for b0 in range(pid * CB, NB, tl.num_programs(0) * CB):
        offs_b = b0 + tl.arange(0, CB)  # [CB]
        own = (offs_b[:, None] >= bstart[None, :]) & (offs_b[:, None] < bend[None, :])  # [CB, EP] one-hot
        used = tl.sum(own.to(tl.int32), axis=1) > 0
        expert = tl.sum(tl.where(own, offs_e[None, :], 0), axis=1)
        fill = tl.sum(tl.where(own, counts[None, :] - (offs_b[:, None] - bstart[None, :]) * BM, 0), axis=1)
        tl.store(bexp_ptr + offs_b, tl.where(used, expert, -1), mask=offs_b < NB)
        tl.store(ids_ptr + offs_b[:, None] * BM + rows[None, :], tl.full((CB, BM), -1, tl.int32),
                 mask=(rows[None, :] >= fill[:, None]) & (offs_b[:, None] < NB))
    # Scatter: assignment n goes to its expert's next free row; sub-chunks in order keep the sort stable.
    seen = bstart * BM + before  # [EP] next free row of each expert
    for c0 in range(start, tl.minimum(start + CS, N), CH):
        offs = c0 + tl.arange(0, CH)
        e = tl.load(eid_ptr + offs, mask=offs < N, other=-1).to(tl.int32)
        hot = (e[:, None] == offs_e[None, :]).to(tl.int32)  # [CH, EP]
        earlier = tl.cumsum(hot, axis=0) - hot  # same-expert assignments earlier in the sub-chunk
        tl.store(ids_ptr + tl.sum(hot * (earlier + seen[None, :]), axis=1), offs, mask=offs < N)
        seen += tl.sum(hot, axis=0)


@triton.jit
def _rows(ids_ptr, blk, TOP_K, BM: tl.constexpr):
    """A block's assignments: ``slot [BM]`` (t * k + j, 0 for padding), ``tok [BM]``, ``valid [BM]``."""
    ids = tl.load(ids_ptr + blk * BM + tl.arange(0, BM))
    valid = ids >= 0
    slot = tl.where(valid, ids, 0).to(tl.int64)  # int64: slot * d can pass 2^31
    return slot, slot // TOP_K, valid


@triton.jit
def _down(x_ptr, a_ptr, tok, valid, e, D_IN, R, RP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
          PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``h [BM, RP] = x[tok] @ A[e]^T`` in fp32 (rows with ``valid`` False read zeros)."""
    offs_r = tl.arange(0, RP)
    h = tl.zeros((BM, RP), dtype=tl.float32)
    for k0 in range(0, D_IN, BK):
        offs_k = k0 + tl.arange(0, BK)
        in_k = offs_k[None, :] < D_IN
        xk = tl.load(x_ptr + tok[:, None] * D_IN + offs_k[None, :], mask=valid[:, None] & in_k, other=0.0)
        ak = tl.load(a_ptr + e * R * D_IN + offs_r[:, None] * D_IN + offs_k[None, :],
                     mask=(offs_r[:, None] < R) & in_k, other=0.0)  # [RP, BK]
        h += _mm(xk, tl.trans(ak), PREC, UPCAST)
    return h


@triton.jit
def _fwd_kernel(x_ptr, a_ptr, b_ptr, g_ptr, ys_ptr, ids_ptr, bexp_ptr, scale, D_IN, D_OUT, R, TOP_K,
                BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr, PREC: tl.constexpr,
                UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    e = tl.load(bexp_ptr + pid).to(tl.int64)
    if e >= 0:
        slot, tok, valid = _rows(ids_ptr, pid, TOP_K, BM)
        w = tl.load(g_ptr + slot, mask=valid, other=0.0).to(tl.float32) * scale  # [BM]
        # Gate the r-wide activations rather than the d_out-wide outputs: r multiplies instead of d_out.
        h = (_down(x_ptr, a_ptr, tok, valid, e, D_IN, R, RP, BM, BK, PREC, UPCAST) * w[:, None])
        h = h.to(b_ptr.dtype.element_ty)  # [BM, RP]
        offs_r = tl.arange(0, RP)
        for n0 in range(0, D_OUT, BN):
            offs_n = n0 + tl.arange(0, BN)
            in_n = offs_n < D_OUT
            bn = tl.load(b_ptr + e * R * D_OUT + offs_r[None, :] * D_OUT + offs_n[:, None],
                         mask=in_n[:, None] & (offs_r[None, :] < R), other=0.0)  # [BN, RP]
            out = _mm(h, tl.trans(bn), PREC, UPCAST)  # [BM, BN]
            tl.store(ys_ptr + slot[:, None] * D_OUT + offs_n[None, :], out.to(ys_ptr.dtype.element_ty),
                     mask=valid[:, None] & in_n[None, :])


@triton.jit
def _bwd_dx_kernel(x_ptr, a_ptr, b_ptr, g_ptr, dy_ptr, ids_ptr, bexp_ptr, dxs_ptr, dg_ptr, wh_ptr, wg_ptr, scale,
                   D_IN, D_OUT, R, TOP_K, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr,
                   PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    e = tl.load(bexp_ptr + pid).to(tl.int64)
    if e >= 0:
        slot, tok, valid = _rows(ids_ptr, pid, TOP_K, BM)
        w = tl.load(g_ptr + slot, mask=valid, other=0.0).to(tl.float32) * scale  # [BM]
        offs_r = tl.arange(0, RP)
        in_r = offs_r < R
        dtype = a_ptr.dtype.element_ty
        h = _down(x_ptr, a_ptr, tok, valid, e, D_IN, R, RP, BM, BK, PREC, UPCAST)  # [BM, RP] x A_e^T
        g = tl.zeros((BM, RP), dtype=tl.float32)  # [BM, RP] dy B_e
        for n0 in range(0, D_OUT, BN):
            offs_n = n0 + tl.arange(0, BN)
            in_n = offs_n < D_OUT
            dyn = tl.load(dy_ptr + tok[:, None] * D_OUT + offs_n[None, :], mask=valid[:, None] & in_n[None, :],
                          other=0.0)  # [BM, BN]
            bn = tl.load(b_ptr + e * R * D_OUT + offs_r[None, :] * D_OUT + offs_n[:, None],
                         mask=in_n[:, None] & in_r[None, :], other=0.0)  # [BN, RP]
            g += _mm(dyn, bn, PREC, UPCAST)
        tl.store(dg_ptr + slot, (tl.sum(g * h, axis=1) * scale).to(dg_ptr.dtype.element_ty), mask=valid)
        wg = (g * w[:, None]).to(dtype)  # [BM, RP]
        # Padding rows hold zeros (their x and dy rows were read as zeros): bwd_dw may sum them.
        rowp = pid * BM + tl.arange(0, BM)
        tl.store(wh_ptr + rowp[:, None] * RP + offs_r[None, :], (h * w[:, None]).to(dtype))
        tl.store(wg_ptr + rowp[:, None] * RP + offs_r[None, :], wg)
        for k0 in range(0, D_IN, BK):
            offs_k = k0 + tl.arange(0, BK)
            in_k = offs_k < D_IN
            ak = tl.load(a_ptr + e * R * D_IN + offs_r[:, None] * D_IN + offs_k[None, :],
                         mask=in_r[:, None] & in_k[None, :], other=0.0)  # [RP, BK]
            tl.store(dxs_ptr + slot[:, None] * D_IN + offs_k[None, :],
                     _mm(wg, ak, PREC, UPCAST).to(dxs_ptr.dtype.element_ty), mask=valid[:, None] & in_k[None, :])


@triton.jit
def _bwd_dw_kernel(x_ptr, dy_ptr, ids_ptr, bstart_ptr, wh_ptr, wg_ptr, da_ptr, db_ptr, D_IN, D_OUT, R, TOP_K,
                   BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr, PREC: tl.constexpr,
                   UPCAST: tl.constexpr):
    e = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    lo = tl.load(bstart_ptr + e)  # this expert's blocks: [lo, hi)
    hi = tl.load(bstart_ptr + e + 1)
    offs_r = tl.arange(0, RP)
    in_r = offs_r < R
    n_k = tl.cdiv(D_IN, BK)
    if tile < n_k:  # dA_e[:, tile] = sum over the expert's rows of (w g)^T x
        offs_k = tile * BK + tl.arange(0, BK)
        in_k = offs_k < D_IN
        da = tl.zeros((RP, BK), dtype=tl.float32)
        for blk in range(lo, hi):
            slot, tok, valid = _rows(ids_ptr, blk, TOP_K, BM)
            rowp = blk * BM + tl.arange(0, BM)
            wg = tl.load(wg_ptr + rowp[:, None] * RP + offs_r[None, :])  # [BM, RP]
            xk = tl.load(x_ptr + tok[:, None] * D_IN + offs_k[None, :], mask=valid[:, None] & in_k[None, :],
                         other=0.0)  # [BM, BK]
            da += _mm(tl.trans(wg), xk, PREC, UPCAST)
        tl.store(da_ptr + e * R * D_IN + offs_r[:, None] * D_IN + offs_k[None, :],
                 da.to(da_ptr.dtype.element_ty), mask=in_r[:, None] & in_k[None, :])
    else:  # dB_e[tile, :] = sum over the expert's rows of dy^T (w h)
        offs_n = (tile - n_k) * BN + tl.arange(0, BN)
        in_n = offs_n < D_OUT
        db = tl.zeros((BN, RP), dtype=tl.float32)
        for blk in range(lo, hi):
            slot, tok, valid = _rows(ids_ptr, blk, TOP_K, BM)
            rowp = blk * BM + tl.arange(0, BM)
            wh = tl.load(wh_ptr + rowp[:, None] * RP + offs_r[None, :])  # [BM, RP]
            dyn = tl.load(dy_ptr + tok[:, None] * D_OUT + offs_n[None, :], mask=valid[:, None] & in_n[None, :],
                          other=0.0)  # [BM, BN]
            db += _mm(tl.trans(dyn), wh, PREC, UPCAST)
        tl.store(db_ptr + e * R * D_OUT + offs_r[None, :] * D_OUT + offs_n[:, None],
                 db.to(db_ptr.dtype.element_ty), mask=in_n[:, None] & in_r[None, :])


def _num_blocks(n: int, num_experts: int, block_m: int) -> int:
    """Static bound on the blocks: ``sum_e ceil(c_e / BM) <= (N + m (BM - 1)) / BM`` for ``m`` non-empty experts."""
    return max(1, (n + min(n, num_experts) * (block_m - 1)) // block_m)


def _plan_split(plan: torch.Tensor, num_blocks: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """Views of the plan: ``ids [NB * BM]``, ``block_expert [NB]``, ``block_start [E + 1]``."""
    return plan[:num_blocks * block_m], plan[num_blocks * block_m:num_blocks * (block_m + 1)], \
        plan[num_blocks * (block_m + 1):]


def _align_params(num_experts: int, n: int = 0) -> dict[str, int]:
    ep = triton.next_power_of_2(max(num_experts, 2))
    # At most 128 programs (each reads all n ids), each scattering CS >= 1024 of them.
    cs = 1024 * triton.next_power_of_2(max(1, triton.cdiv(n, 1024 * 128)))
    # [CH, EP] and [CB, EP] one-hot tiles of at most 4096 elements: 32 registers a thread at 4 warps.
    return {"EP": ep, "CN": 1024, "CS": cs, "CH": max(16, min(1024, 4096 // ep)), "CB": max(1, min(64, 4096 // ep))}


def _align(expert_idx: torch.Tensor, num_experts: int, block_m: int) -> torch.Tensor:
    """The plan: one int32 buffer holding ``ids``, ``block_expert`` and ``block_start`` (``_plan_split``),
    from one allocation and one launch."""
    flat = expert_idx.reshape(-1)  # [N]
    n = flat.numel()
    nb = _num_blocks(n, num_experts, block_m)
    plan = torch.empty(nb * (block_m + 1) + num_experts + 1, dtype=torch.int32, device=flat.device)
    ids, block_expert, block_start = _plan_split(plan, nb, block_m)
    params = _align_params(num_experts, n)
    _align_kernel[(max(1, triton.cdiv(n, params["CS"])),)](
        flat.contiguous(), ids, block_expert, block_start, n, num_experts, nb,
        BM=block_m, **params, num_warps=NUM_WARPS["align"])
    return plan


def align_assignments(expert_idx: torch.Tensor, num_experts: int, block_m: int = BLOCK_M
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ids [NB * block_m]`` (assignments ``t * k + j`` sorted by expert, stable, each expert padded to
    whole blocks, -1 = padding), ``block_expert [NB]`` (-1 = unused) and ``block_start [E + 1]`` (each
    expert's first block, then the number used), int32, on the device with no sync.
    ``NB = _num_blocks(N, E, block_m)`` depends on shapes only.
    """
    nb = _num_blocks(expert_idx.numel(), num_experts, block_m)
    return _plan_split(_align(expert_idx, num_experts, block_m), nb, block_m)


def _rank_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _consts(x: torch.Tensor, r: int, block_m: int, kernel: str) -> dict[str, object]:
    # fp32: "ieee", exact as the reference; for bf16 the precision flag is unused.
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    return {"BM": block_m, "BK": BLOCK_K, "BN": BLOCK_N, "RP": _rank_pad(r), "PREC": prec, "UPCAST": interpreter_upcast(x),
            "num_warps": NUM_WARPS[kernel]}


def _forward(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, expert_idx: torch.Tensor, gates: torch.Tensor,
             scale: float, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y [T, d_out], plan)``: two launches (align, fwd), and for k > 1 the sum over slots."""
    x, A, gates = x.contiguous(), A.contiguous(), gates.contiguous()
    Bt = B.transpose(1, 2).contiguous()  # [E, r, d_out]: the layer's rank-major B as it is, no copy
    (T, d_in), (E, r, _), d_out, k = x.shape, A.shape, B.shape[1], expert_idx.shape[1]
    plan = _align(expert_idx, E, block_m)
    ids, block_expert, _ = _plan_split(plan, _num_blocks(T * k, E, block_m), block_m)
    ys = torch.empty(T * k, d_out, dtype=x.dtype, device=x.device)  # [T*k, d_out] one row per slot
    if T * k:
        _fwd_kernel[(block_expert.numel(),)](x, A, Bt, gates, ys, ids, block_expert, scale, d_in, d_out, r, k,
                                            **_consts(x, r, block_m, "fwd"))
    y = ys if k == 1 else ys.view(T, k, d_out).sum(1)  # [T, d_out]
    return y, plan


@torch.library.custom_op("routing_env::lora_moe_sorted", mutates_args=())
def lora_moe_sorted(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, expert_idx: torch.Tensor,
                    gates: torch.Tensor, scale: float, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y [T, d_out], plan)``: the op and the alignment plan its backward reuses (x, A, B share a dtype)."""
    return _forward(x, A, B, expert_idx, gates, scale, block_m)


@lora_moe_sorted.register_fake
def _fake_forward(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, expert_idx: torch.Tensor, gates: torch.Tensor,
                  scale: float, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, E = expert_idx.numel(), A.shape[0]
    nb = _num_blocks(n, E, block_m)
    return x.new_empty(x.shape[0], B.shape[1]), x.new_empty(nb * (block_m + 1) + E + 1, dtype=torch.int32)


def _backward_impl(dy: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, expert_idx: torch.Tensor,
                   gates: torch.Tensor, plan: torch.Tensor, scale: float, block_m: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dA, dB, dgates)``: two launches (bwd_dx, bwd_dw), and for k > 1 the sum of dx over slots.
    ``dB`` is rank-major as the layer's ``B`` is (a transposed view), so it accumulates without a copy."""
    x, A, gates = x.contiguous(), A.contiguous(), gates.contiguous()
    Bt = B.transpose(1, 2).contiguous()  # [E, r, d_out]
    dy = dy.to(x.dtype).contiguous()
    (T, d_in), (E, r, _), d_out, k = x.shape, A.shape, B.shape[1], expert_idx.shape[1]
    nb = _num_blocks(T * k, E, block_m)
    ids, block_expert, block_start = _plan_split(plan, nb, block_m)
    dxs = torch.empty(T * k, d_in, dtype=x.dtype, device=x.device)  # [T*k, d_in] one row per slot
    dgates = torch.empty_like(gates)  # [T, k]
    dA, dBt = torch.empty_like(A), torch.empty(E, r, d_out, dtype=B.dtype, device=B.device)
    # [NB * BM, RP] gated rank activations of each sorted row, w * x A_e^T and w * dy B_e
    acts = torch.empty(2, nb * block_m, _rank_pad(r), dtype=x.dtype, device=x.device)
    if T * k:
        _bwd_dx_kernel[(nb,)](x, A, Bt, gates, dy, ids, block_expert, dxs, dgates, acts[0], acts[1], scale, d_in, d_out,
                              r, k, **_consts(x, r, block_m, "bwd_dx"))
    _bwd_dw_kernel[(E, triton.cdiv(d_in, BLOCK_K) + triton.cdiv(d_out, BLOCK_N))](
        x, dy, ids, block_start, acts[0], acts[1], dA, dBt, d_in, d_out, r, k, **_consts(x, r, block_m, "bwd_dw"))
    return (dxs if k == 1 else dxs.view(T, k, d_in).sum(1)), dA, dBt.transpose(1, 2), dgates


@torch.library.custom_op("routing_env::lora_moe_sorted_backward", mutates_args=())
def lora_moe_sorted_backward(dy: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                             expert_idx: torch.Tensor, gates: torch.Tensor, plan: torch.Tensor, scale: float,
                             block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dA, dB, dgates)`` of ``lora_moe_sorted`` for the output gradient ``dy [T, d_out]``."""
    return _backward_impl(dy, x, A, B, expert_idx, gates, plan, scale, block_m)


@lora_moe_sorted_backward.register_fake
def _fake_backward(dy: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, expert_idx: torch.Tensor,
                   gates: torch.Tensor, plan: torch.Tensor, scale: float, block_m: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dB = B.new_empty(B.shape[0], B.shape[2], B.shape[1]).transpose(1, 2)  # rank-major, as the real one
    return x.new_empty(x.shape), A.new_empty(A.shape), dB, gates.new_empty(gates.shape)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, A, B, expert_idx, gates, scale, block_m = inputs
    ctx.save_for_backward(x, A, B, expert_idx, gates, output[1])
    ctx.scale, ctx.block_m = scale, block_m
    ctx.set_materialize_grads(False)  # else autograd fills a zero gradient for the integer plan: one launch


def _autograd_backward(ctx: Any, dy: torch.Tensor, _dplan: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    x, A, B, expert_idx, gates, plan = ctx.saved_tensors
    dx, dA, dB, dgates = lora_moe_sorted_backward(dy, x, A, B, expert_idx, gates, plan, ctx.scale, ctx.block_m)
    return dx, dA, dB, None, dgates, None, None


lora_moe_sorted.register_autograd(_autograd_backward, setup_context=_setup_context)


def lora_moe_triton(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, expert_idx: torch.Tensor,
                    gates: torch.Tensor, scale: float, block_m: int = BLOCK_M) -> torch.Tensor:
    """The op through the Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
    differentiable in ``x``, ``A``, ``B`` and ``gates``; one custom op for ``torch.compile``."""
    return lora_moe_sorted(x, A, B, expert_idx, gates, float(scale), block_m)[0]


def compile_report(kernel: str, dtype: str = "bf16", rank_pad: int = 16, arch: int = 90,
                   num_experts: int = 64) -> dict[str, int]:
    """Compile one kernel of ``KERNELS`` ahead of time for an ``sm_<arch>`` GPU (no GPU needed), at the
    production tile sizes, and read its resources: registers per thread, static and dynamic shared
    memory, and local memory (register spills), from the cubin with the ``cuobjdump`` that ships with
    Triton. ``align`` depends on ``num_experts`` only. Needs Triton not in interpreter mode
    (``TRITON_INTERPRET`` unset or 0 when Triton is first imported).
    """
    from routing_env.moe.kernels.aot import cubin_usage, signature

    fn = {"align": _align_kernel, "fwd": _fwd_kernel, "bwd_dx": _bwd_dx_kernel, "bwd_dw": _bwd_dw_kernel}[kernel]
    consts: dict[str, object] = {"BM": BLOCK_M} | (_align_params(num_experts) if kernel == "align" else {
        "BK": BLOCK_K, "BN": BLOCK_N, "RP": rank_pad, "PREC": "ieee" if dtype == "fp32" else "tf32", "UPCAST": False})
    index_ptrs = {"eid_ptr": "i64", "ids_ptr": "i32", "bexp_ptr": "i32", "bstart_ptr": "i32"}
    return cubin_usage(fn, signature(fn, consts, dtype, index_ptrs, ("scale",)), consts, arch,
                       num_warps=NUM_WARPS[kernel])
