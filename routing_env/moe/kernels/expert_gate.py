"""The expert gate of the low-rank LoRA-MoE form: top-k routing applied in the rank dimension.

Given the router logits ``[T, E]`` and every expert's down-projection ``h [T, E*r]`` (one GEMM for all
experts), the gate computes the routing (softmax, top-k of ``logits + selection bias``, the chosen
experts' probabilities renormalised over them for top-k > 1) and multiplies each expert's ``r``
columns of ``h`` by its gate times the LoRA scale: ``hg [T, E*r]``, which one more GEMM with all
experts' up-projections turns into the adapter output. No sort, no gather, fixed shapes.

* ``expert_gate_reference``: PyTorch, differentiable; the definition the kernels are tested against.
* ``routing_env::expert_gate`` / ``routing_env::expert_gate_backward``: ``torch.library`` custom ops,
  one Triton kernel each on CUDA (``expert_gate_triton.py``), the reference elsewhere; with fake
  (meta) implementations, so ``torch.compile`` traces around them. The forward adds into ``loads``
  in place, so it has no autograd formula of its own: ``kernels.lowrank.LowRankExperts`` is the
  differentiable op, whose backward calls ``expert_gate_backward``.

Outputs: ``hg``, ``pc [T, 2E]`` float32 (probabilities, then 0/1 choices) and, with ``stats``, the
``w``-weighted sums of both over each block of ``BLOCK_T`` tokens, ``[num_blocks, 2E]`` (their sum over
blocks is what the Switch loss needs: the caller sums every layer's blocks in one launch); with ``w [T]``
and ``loads [E]`` float64, the ``w``-weighted expert counts are added into ``loads`` in place (what
evaluation records).
"""

from __future__ import annotations

from typing import Optional

import torch

from routing_env.moe.kernels.backend import GATE_BLOCK, use_triton

__all__ = ["BLOCK_T", "block_sums", "expert_gate", "expert_gate_backward", "expert_gate_reference", "gate_values"]

BLOCK_T = GATE_BLOCK  # tokens per program of the kernels, and per row of their block statistics


def gate_values(probs: torch.Tensor, chosen: torch.Tensor, renorm: bool) -> torch.Tensor:
    """``[T, E]`` the gates: the chosen experts' probabilities, renormalised over them when ``renorm``."""
    g = probs * chosen
    return g / g.sum(dim=-1, keepdim=True) if renorm else g


def _select(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """``[T, E]`` float 0/1: the top-k of ``logits + bias`` (``bias [R, E]`` per row of ``T // R`` tokens)."""
    sel = logits.float()
    if bias is not None:
        R = bias.shape[0]
        sel = (sel.view(R, -1, sel.shape[1]) + bias.to(sel.device, torch.float32)[:, None, :]).view_as(sel)
    return torch.zeros_like(sel).scatter_(1, sel.topk(top_k, dim=-1).indices, 1.0)


def expert_gate_reference(logits: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None, top_k: int, renorm: bool,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hg [T, E*r], probs [T, E] fp32, chosen [T, E] fp32)``, differentiable in ``logits`` and ``h``."""
    T, E = logits.shape
    probs = logits.float().softmax(dim=-1)
    chosen = _select(logits.detach(), bias, top_k)
    g = gate_values(probs, chosen, renorm) * scale  # [T, E]
    hg = (h.float().reshape(T, E, -1) * g[:, :, None]).reshape(T, -1).to(h.dtype)
    return hg, probs, chosen


def block_sums(v: torch.Tensor) -> torch.Tensor:
    """``[num_blocks, C]`` sums of ``v [T, C]`` over consecutive blocks of ``BLOCK_T`` rows (the last one short)."""
    T = v.shape[0]
    blocks = -(-T // BLOCK_T)
    return torch.nn.functional.pad(v, (0, 0, 0, blocks * BLOCK_T - T)).view(blocks, BLOCK_T, -1).sum(1)


@torch.library.custom_op("routing_env::expert_gate", mutates_args=("loads",))
def expert_gate(logits: torch.Tensor, h: torch.Tensor, bias: Optional[torch.Tensor], w: Optional[torch.Tensor],
                loads: Optional[torch.Tensor], top_k: int, renorm: bool, scale: float, stats: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hg [T, E*r] like h, pc [T, 2E] fp32, block stats [num_blocks, 2E] fp32 (empty unless ``stats``))``;
    one kernel on CUDA. See the module docstring."""
    if use_triton(h):
        from routing_env.moe.kernels.expert_gate_triton import gate_forward_triton

        return gate_forward_triton(logits, h, bias, w, loads, top_k, renorm, scale, stats)
    with torch.no_grad():
        hg, probs, chosen = expert_gate_reference(logits, h, bias, top_k, renorm, scale)
        pc = torch.cat([probs, chosen], dim=1)
        if loads is not None and w is not None:
            loads.add_((w.float() @ chosen).to(loads.dtype))
        sums = block_sums(w.float()[:, None] * pc) if stats and w is not None else pc.new_empty(0, pc.shape[1])
    return hg, pc, sums


@expert_gate.register_fake
def _(logits, h, bias, w, loads, top_k, renorm, scale, stats):
    T, E = logits.shape
    blocks = -(-T // BLOCK_T) if stats and w is not None else 0
    return h.new_empty(h.shape), logits.new_empty(T, 2 * E, dtype=torch.float32), \
        logits.new_empty(blocks, 2 * E, dtype=torch.float32)


@torch.library.custom_op("routing_env::expert_gate_backward", mutates_args=())
def expert_gate_backward(dhg: torch.Tensor, h: torch.Tensor, pc: torch.Tensor, dprobs: Optional[torch.Tensor],
                         w: Optional[torch.Tensor], dstats: Optional[torch.Tensor], renorm: bool, scale: float,
                         logit_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dlogits [T, E], dh [T, E*r])`` from ``dhg``, the gradient of the probabilities ``dprobs [T, E]``
    and that of the block statistics ``dstats [num_blocks, 2E]`` (its probability half; rows may be a
    broadcast, stride 0); one kernel on CUDA."""
    if use_triton(h):
        from routing_env.moe.kernels.expert_gate_triton import gate_backward_triton

        return gate_backward_triton(dhg, h, pc, dprobs, w, dstats, renorm, scale, logit_dtype)
    T, E = pc.shape[0], pc.shape[1] // 2
    p, c = pc[:, :E], pc[:, E:]
    g = gate_values(p, c, renorm)  # [T, E]
    dhg3, h3 = dhg.float().reshape(T, E, -1), h.float().reshape(T, E, -1)
    dh = (dhg3 * (g * scale)[:, :, None]).reshape(T, -1)
    u = scale * (dhg3 * h3).sum(-1)  # [T, E] dL / d gate
    # g = p c / S with S = sum p c: dL/dp_m = c_m / S (u_m - sum_e u_e g_e); without renormalising, c_m u_m.
    dp = c / (p * c).sum(-1, keepdim=True) * (u - (u * g).sum(-1, keepdim=True)) if renorm else c * u
    if dprobs is not None:
        dp = dp + dprobs.float()
    if dstats is not None and w is not None:  # row b of the stats sums the tokens of block b
        dp = dp + w.float()[:, None] * dstats[:, :E].float().repeat_interleave(BLOCK_T, 0)[:T]
    dlogits = p * (dp - (p * dp).sum(-1, keepdim=True))  # softmax backward
    return dlogits.to(logit_dtype), dh.to(h.dtype)


@expert_gate_backward.register_fake
def _(dhg, h, pc, dprobs, w, dstats, renorm, scale, logit_dtype):
    return pc.new_empty(pc.shape[0], pc.shape[1] // 2, dtype=logit_dtype), h.new_empty(h.shape)
