"""The grouped LoRA-MoE expert operation.

``y[t] = scale * sum_j gate[t, j] * B[e_tj] @ (A[e_tj] @ x[t])`` for every token ``t`` and its top-k
experts ``e_tj``, with ``A [E, r, d_in]`` and ``B [E, d_out, r]``.

* ``lora_moe_reference``: tokens sorted by expert, one matmul pair per expert over a contiguous slice
  of its tokens (no per-token loop, no "every expert on every token"). This is the algorithm a GPU
  kernel implements and the oracle it is tested against; autograd differentiates it for x, A, B, gates.
* ``lora_moe_lowrank``: the same sum computed as ``(gate-weighted [x A_1^T, ..., x A_E^T]) @ [B_1 .. B_E]^T``.
  It does ``E / k`` times the reference's down-projection FLOPs, but never gathers or scatters
  ``d``-wide rows; with ``E * r`` much smaller than ``d`` (4 experts of rank 8 against d = 384 on
  MiniLM) that memory traffic is what costs on a CPU, so this form is about 3x faster there.
* ``lora_moe_triton`` (``lora_moe_triton.py``): the sorted grouped form as Triton kernels, forward and
  backward, for CUDA tensors.
* ``use_lowrank`` (``lowrank.py``): the one rule, by device and dtype, choosing the low-rank form over
  the sorted one (``lora_moe`` and the layer both ask it).
* ``lora_moe``: the one function every layer calls; picks between them.
"""

from __future__ import annotations

import torch

from routing_env.moe.kernels.backend import triton_enabled, use_triton
from routing_env.moe.kernels.lowrank import use_lowrank

__all__ = ["lora_moe", "lora_moe_reference", "lora_moe_lowrank", "lora_moe_naive", "triton_enabled", "use_lowrank"]


def lora_moe_reference(
    x: torch.Tensor,  # [T, d_in]
    A: torch.Tensor,  # [E, r, d_in]
    B: torch.Tensor,  # [E, d_out, r]
    expert_idx: torch.Tensor,  # [T, k] long
    gates: torch.Tensor,  # [T, k]
    scale: float,
) -> torch.Tensor:  # [T, d_out]
    T, k = expert_idx.shape
    E, d_out = A.shape[0], B.shape[1]
    flat_expert = expert_idx.reshape(-1)  # [T*k]
    # A stable sort keeps each expert's tokens in token order, so the result does not depend on ties.
    order = torch.argsort(flat_expert, stable=True)  # [T*k]
    token_of = order // k  # [T*k] source token of each sorted assignment
    counts = torch.bincount(flat_expert, minlength=E).tolist()  # [E]
    x_sorted = x.index_select(0, token_of)  # [T*k, d_in]
    weight = (gates.reshape(-1).index_select(0, order) * scale).to(x.dtype)  # [T*k]
    out = x.new_zeros(T, d_out)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = slice(start, start + n)
        # Gate the rank-r activations rather than the d_out-wide outputs: r multiplies instead of d_out.
        h = (x_sorted[rows] @ A[e].transpose(0, 1)) * weight[rows].unsqueeze(1)  # [n, r]
        out.index_add_(0, token_of[rows], (h @ B[e].transpose(0, 1)).to(out.dtype))  # [n, d_out] summed into tokens
        start += n
    return out


def lora_moe_lowrank(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, expert_idx: torch.Tensor, gates: torch.Tensor, scale: float
) -> torch.Tensor:
    T = x.shape[0]
    E, r, d_in = A.shape
    h = (x @ A.reshape(E * r, d_in).transpose(0, 1)).view(T, E, r)  # [T, E, r] every expert's down-projection
    dense_gates = x.new_zeros(T, E).scatter_add(1, expert_idx, (gates * scale).to(x.dtype))  # [T, E], 0 if unchosen
    h = (h * dense_gates.unsqueeze(-1)).reshape(T, E * r)  # [T, E*r]
    return h @ B.permute(0, 2, 1).reshape(E * r, -1)  # [T, d_out]


def lora_moe_naive(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, expert_idx: torch.Tensor, gates: torch.Tensor, scale: float
) -> torch.Tensor:
    """Per-token, per-expert loop: the definition itself. Slow; for tests only."""
    T, k = expert_idx.shape
    rows = []
    for t in range(T):
        acc = x.new_zeros(B.shape[1])
        for j in range(k):
            e = int(expert_idx[t, j])
            acc = acc + gates[t, j] * (B[e] @ (A[e] @ x[t]))
        rows.append(acc * scale)
    return torch.stack(rows) if rows else x.new_zeros(0, B.shape[1])


def lora_moe(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, expert_idx: torch.Tensor, gates: torch.Tensor, scale: float
) -> torch.Tensor:
    """The one entry point every LoRA-MoE layer calls.

    Low-rank form while all experts' ranks together stay well below the input width (there it moves
    less memory than sorting, see the module docstring); the sorted grouped form otherwise (many or
    wide experts, where computing every expert's down-projection would waste real FLOPs): the
    Triton kernels for CUDA tensors when Triton is installed, else the PyTorch reference.
    """
    E, r, d_in = A.shape
    if use_lowrank(E, r, d_in, x.device, x.dtype):
        return lora_moe_lowrank(x, A, B, expert_idx, gates, scale)
    if use_triton(x):
        from routing_env.moe.kernels.lora_moe_triton import lora_moe_triton  # imports triton: GPU path only

        return lora_moe_triton(x, A, B, expert_idx, gates, scale)
    return lora_moe_reference(x, A, B, expert_idx, gates, scale)
