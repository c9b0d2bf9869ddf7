"""The grouped LoRA-MoE expert op as Triton kernels: forward, backward, launcher, autograd function.

``y[t] = scale * sum_j gate[t, j] * B[e_tj] @ (A[e_tj] @ x[t])`` with ``x [T, d_in]``,
``A [E, r, d_in]``, ``B [E, d_out, r]``, ``expert_idx / gate [T, k]``; its PyTorch reference is
``lora_moe_reference`` (``lora_moe.py``), which the tests compare outputs and all four gradients
(x, A, B, gate) against, on CPU through ``TRITON_INTERPRET=1`` and on the GPU.

Layout (as in MoE kernels such as vLLM's fused_moe): the ``N = T * k`` (token, slot) assignments are
sorted by expert and each expert's run is padded to a multiple of ``BLOCK_M``, so one program
handles ``BLOCK_M`` assignments of one expert (``ids [num_blocks * BLOCK_M]``, -1 = padding;
``block_expert [num_blocks]``, -1 = unused block). Everything is computed on the device with a
static upper bound on the number of blocks, so the op needs no host synchronisation.

A program computes its rows' rank-``r`` activations ``h = x @ A_e^T`` once (``r`` padded to a power
of two of at least 16, the smallest ``tl.dot``), then walks ``d_out`` in tiles; a token's ``k``
contributions come from ``k`` programs, so outputs and ``dx`` / ``dA`` / ``dB`` are accumulated
with fp32 atomics (on the GPU their order varies run to run: float rounding only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["BLOCK_M", "LoRAMoETriton", "align_assignments", "compile_report", "lora_moe_triton"]

BLOCK_M = 16  # assignments per program (tl.dot needs >= 16)
BLOCK_K = 32  # d_in tile
BLOCK_N = 32  # d_out tile


@triton.jit
def _mm(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot(a, b)``; ``UPCAST`` computes it in fp32 (Triton's CPU interpreter gets bf16 dots wrong)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


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
                     mask=(offs_r[:, None] < R) & in_k, other=0.0)
        h += _mm(xk, tl.trans(ak), PREC, UPCAST)
    return h


@triton.jit
def _fwd_kernel(x_ptr, a_ptr, b_ptr, y_ptr, ids_ptr, block_expert_ptr, w_ptr, D_IN, D_OUT, R, TOP_K,
                BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr, PREC: tl.constexpr,
                UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    e = tl.load(block_expert_ptr + pid)
    if e >= 0:
        ids = tl.load(ids_ptr + pid * BM + tl.arange(0, BM))  # [BM] assignment t * k + j, or -1
        valid = ids >= 0
        safe = tl.where(valid, ids, 0)
        tok = safe // TOP_K
        w = tl.load(w_ptr + safe, mask=valid, other=0.0)  # [BM] gate * scale
        h = _down(x_ptr, a_ptr, tok, valid, e, D_IN, R, RP, BM, BK, PREC, UPCAST) * w[:, None]  # [BM, RP]
        h = h.to(b_ptr.dtype.element_ty)
        offs_r = tl.arange(0, RP)
        for n0 in range(0, D_OUT, BN):
            offs_n = n0 + tl.arange(0, BN)
            in_n = offs_n < D_OUT
            bn = tl.load(b_ptr + e * D_OUT * R + offs_n[:, None] * R + offs_r[None, :],
                         mask=in_n[:, None] & (offs_r[None, :] < R), other=0.0)  # [BN, RP]
            out = _mm(h, tl.trans(bn), PREC, UPCAST)  # [BM, BN]
            tl.atomic_add(y_ptr + tok[:, None] * D_OUT + offs_n[None, :], out, mask=valid[:, None] & in_n[None, :])


@triton.jit
def _bwd_kernel(x_ptr, a_ptr, b_ptr, dy_ptr, ids_ptr, block_expert_ptr, w_ptr, dx_ptr, da_ptr, db_ptr, dw_ptr,
                D_IN, D_OUT, R, TOP_K, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr,
                PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    e = tl.load(block_expert_ptr + pid)
    if e >= 0:
        ids = tl.load(ids_ptr + pid * BM + tl.arange(0, BM))
        valid = ids >= 0
        safe = tl.where(valid, ids, 0)
        tok = safe // TOP_K
        w = tl.load(w_ptr + safe, mask=valid, other=0.0)
        offs_r = tl.arange(0, RP)
        in_r = offs_r < R
        dtype = a_ptr.dtype.element_ty
        h = _down(x_ptr, a_ptr, tok, valid, e, D_IN, R, RP, BM, BK, PREC, UPCAST)  # [BM, RP] A_e x
        g = tl.zeros((BM, RP), dtype=tl.float32)  # [BM, RP] B_e^T dy
        for n0 in range(0, D_OUT, BN):
            offs_n = n0 + tl.arange(0, BN)
            in_n = offs_n < D_OUT
            dyn = tl.load(dy_ptr + tok[:, None] * D_OUT + offs_n[None, :], mask=valid[:, None] & in_n[None, :], other=0.0)
            bn = tl.load(b_ptr + e * D_OUT * R + offs_n[:, None] * R + offs_r[None, :],
                         mask=in_n[:, None] & in_r[None, :], other=0.0)
            g += _mm(dyn, bn, PREC, UPCAST)
        # d y / d w for w = gate * scale: one value per assignment, so a plain store.
        tl.store(dw_ptr + safe, tl.sum(g * h, axis=1), mask=valid)
        wg = (g * w[:, None]).to(dtype)  # [BM, RP]
        wh = (h * w[:, None]).to(dtype)  # [BM, RP]
        for k0 in range(0, D_IN, BK):
            offs_k = k0 + tl.arange(0, BK)
            in_k = offs_k < D_IN
            ak = tl.load(a_ptr + e * R * D_IN + offs_r[:, None] * D_IN + offs_k[None, :],
                         mask=in_r[:, None] & in_k[None, :], other=0.0)  # [RP, BK]
            dxk = _mm(wg, ak, PREC, UPCAST)  # [BM, BK]
            tl.atomic_add(dx_ptr + tok[:, None] * D_IN + offs_k[None, :], dxk, mask=valid[:, None] & in_k[None, :])
            xk = tl.load(x_ptr + tok[:, None] * D_IN + offs_k[None, :], mask=valid[:, None] & in_k[None, :], other=0.0)
            dak = _mm(tl.trans(wg), xk, PREC, UPCAST)  # [RP, BK]
            tl.atomic_add(da_ptr + e * R * D_IN + offs_r[:, None] * D_IN + offs_k[None, :], dak,
                          mask=in_r[:, None] & in_k[None, :])
        for n0 in range(0, D_OUT, BN):
            offs_n = n0 + tl.arange(0, BN)
            in_n = offs_n < D_OUT
            dyn = tl.load(dy_ptr + tok[:, None] * D_OUT + offs_n[None, :], mask=valid[:, None] & in_n[None, :], other=0.0)
            dbn = _mm(tl.trans(dyn), wh, PREC, UPCAST)  # [BN, RP]
            tl.atomic_add(db_ptr + e * D_OUT * R + offs_n[:, None] * R + offs_r[None, :], dbn,
                          mask=in_n[:, None] & in_r[None, :])


def align_assignments(expert_idx: torch.Tensor, num_experts: int, block_m: int = BLOCK_M
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids [num_blocks * block_m]`` (assignments sorted by expert, each expert padded to whole
    blocks, -1 = padding) and ``block_expert [num_blocks]`` (-1 = unused), on the device, no sync.

    ``num_blocks`` is the static bound ``ceil((N + E * (block_m - 1)) / block_m)`` for ``N`` assignments.
    """
    flat = expert_idx.reshape(-1)  # [N]
    N, E, dev = flat.numel(), num_experts, flat.device
    counts = torch.zeros(E, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))  # [E]
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    ends = torch.cumsum(padded, 0)  # [E] end of each expert's padded run
    order = torch.argsort(flat, stable=True)  # [N]
    sorted_e = flat[order]
    rank = torch.arange(N, device=dev) - (torch.cumsum(counts, 0) - counts)[sorted_e]  # place within its expert
    num_blocks = max(1, -(-(N + E * (block_m - 1)) // block_m))
    ids = torch.full((num_blocks * block_m,), -1, dtype=torch.long, device=dev)
    ids[(ends - padded)[sorted_e] + rank] = order
    block_expert = torch.searchsorted(ends, torch.arange(num_blocks, device=dev) * block_m, right=True)
    return ids, torch.where(block_expert < E, block_expert, -1)


def _rank_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 exact as the reference; tf32 is unused for bf16


def _upcast(x: torch.Tensor) -> bool:
    # Off the GPU the kernels run in Triton's interpreter, whose tl.dot on bf16 operands is wrong
    # (measured: error 2.5e10 on a 16 x 16 product, triton 3.9); there the dots run in fp32 on the
    # bf16 values. On the GPU bf16 operands go to the tensor cores as they are.
    return x.device.type != "cuda" and x.dtype != torch.float32


class LoRAMoETriton(torch.autograd.Function):
    """Autograd function over the kernels: gradients for ``x``, ``A``, ``B`` and ``gates``."""

    @staticmethod
    def forward(ctx, x, A, B, expert_idx, gates, scale: float):  # type: ignore[override]
        x, A, B = x.contiguous(), A.contiguous(), B.contiguous()
        T, d_in = x.shape
        E, r, _ = A.shape
        d_out, k = B.shape[1], expert_idx.shape[1]
        ids, block_expert = align_assignments(expert_idx, E)
        w = (gates.reshape(-1).float() * scale).contiguous()  # [N] gate * scale
        y = torch.zeros(T, d_out, dtype=torch.float32, device=x.device)
        if T:
            _fwd_kernel[(block_expert.numel(),)](x, A, B, y, ids, block_expert, w, d_in, d_out, r, k, BM=BLOCK_M,
                                                BK=BLOCK_K, BN=BLOCK_N, RP=_rank_pad(r), PREC=_precision(x.dtype),
                                                UPCAST=_upcast(x))
        ctx.save_for_backward(x, A, B, ids, block_expert, w)
        ctx.shape, ctx.scale, ctx.gates_dtype = (T, k), scale, gates.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, A, B, ids, block_expert, w = ctx.saved_tensors
        (T, k), (E, r, d_in), d_out = ctx.shape, A.shape, B.shape[1]
        dy = dy.to(x.dtype).contiguous()
        dx = torch.zeros(T, d_in, dtype=torch.float32, device=x.device)
        dA = torch.zeros(A.shape, dtype=torch.float32, device=x.device)
        dB = torch.zeros(B.shape, dtype=torch.float32, device=x.device)
        dw = torch.zeros(T * k, dtype=torch.float32, device=x.device)
        if T:
            _bwd_kernel[(block_expert.numel(),)](x, A, B, dy, ids, block_expert, w, dx, dA, dB, dw, d_in, d_out, r, k,
                                                BM=BLOCK_M, BK=BLOCK_K, BN=BLOCK_N, RP=_rank_pad(r),
                                                PREC=_precision(x.dtype), UPCAST=_upcast(x))
        dgates = (dw * ctx.scale).view(T, k).to(ctx.gates_dtype)
        return dx.to(x.dtype), dA.to(A.dtype), dB.to(B.dtype), None, dgates, None


def lora_moe_triton(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, expert_idx: torch.Tensor,
                    gates: torch.Tensor, scale: float) -> torch.Tensor:
    """The op through the Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    return LoRAMoETriton.apply(x, A, B, expert_idx, gates, scale)


def compile_report(kernel: str, dtype: str = "bf16", rank_pad: int = 16, arch: int = 90) -> dict[str, int]:
    """Compile one kernel ahead of time for an ``sm_<arch>`` GPU (no GPU needed) and read its resources.

    Returns registers per thread, static and dynamic shared memory and local memory (register
    spills), read from the cubin with the ``cuobjdump`` that ships with Triton. Needs Triton not in
    interpreter mode (``TRITON_INTERPRET`` unset or 0 when Triton is first imported).
    """
    import subprocess
    import tempfile
    from pathlib import Path

    import triton.backends.nvidia as nv
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = {"fwd": _fwd_kernel, "bwd": _bwd_kernel}[kernel]
    ptrs = {"x_ptr": dtype, "a_ptr": dtype, "b_ptr": dtype}
    ptrs |= {"y_ptr": "fp32"} if kernel == "fwd" else {"dy_ptr": dtype}
    ptrs |= {"ids_ptr": "i64", "block_expert_ptr": "i64", "w_ptr": "fp32"}
    if kernel == "bwd":
        ptrs |= {"dx_ptr": "fp32", "da_ptr": "fp32", "db_ptr": "fp32", "dw_ptr": "fp32"}
    consts = {"BM": BLOCK_M, "BK": BLOCK_K, "BN": BLOCK_N, "RP": rank_pad, "PREC": _precision(
        torch.float32 if dtype == "fp32" else torch.bfloat16), "UPCAST": False}
    signature = ({k: "*" + v for k, v in ptrs.items()} | {k: "i32" for k in ("D_IN", "D_OUT", "R", "TOP_K")}
                 | {k: "constexpr" for k in consts})
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", arch, 32))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([str(Path(nv.__file__).parent / "bin" / "cuobjdump"), "-res-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    usage = dict(field.split(":") for field in next(ln for ln in out.splitlines() if "REG:" in ln).split())
    return {"registers": int(usage["REG"]), "static_shared": int(usage["SHARED"]),
            "dynamic_shared": int(compiled.metadata.shared), "spill_bytes": int(usage["LOCAL"])}
