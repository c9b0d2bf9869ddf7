"""A whole LoRA-MoE linear layer in the low-rank regime, in as few kernels as its algebra allows.

``y = x W^T + b + sum_e gate_e(x) * scale * B_e A_e dropout(x)`` for every token, every expert's
down-projection computed at once and gated in the rank dimension. While ``E * r`` is small this moves
less memory than sorting tokens by expert and has no data-dependent shape (``use_lowrank`` says when;
``lora_moe.py`` has the sorted form). Kernels of one layer (each aten op is one launch on a GPU, each
``routing_env::`` custom op one Triton kernel):

* forward (4): the base ``addmm``; ``route_shrink`` (router logits and all down-projections of the
  dropped-out input from one pass over ``x``); ``expert_gate`` (top-k, gates, ``hg``, and the loads
  or the Switch statistics per block of tokens); the expand ``addmm_`` into the base output (``B`` is
  stored so that all experts' up-projections are one matrix, see ``LoRAMoELinear``).
* backward (7, written out in ``LowRankExperts.backward``): ``dhg`` and ``dB`` (two GEMMs),
  ``expert_gate_backward``, ``dWr`` and ``dA`` (two GEMMs), the base ``dout W`` that ``dx`` starts
  from, and ``adapter_dx`` adding the router's and the adapter's terms to it (the dropout mask drawn
  again from its seed).
"""

from __future__ import annotations

import torch

from routing_env.moe.kernels.expert_gate import expert_gate, expert_gate_backward
from routing_env.moe.kernels.route_shrink import adapter_dx, route_shrink

__all__ = ["LowRankExperts", "lowrank_experts", "use_lowrank"]

#: Largest ``E * r`` for which the all-experts form is taken on a GPU, by element size. Its two thin GEMMs
#: do about ``E r`` FLOP per byte of ``x`` in bf16 (``E r / 2`` in fp32); they stay memory-bound, so
#: computing every expert costs no time, below the ridge of peak FLOP/s over bandwidth: H100/H200
#: ~990 TFLOP/s bf16 / ~4.8 TB/s ~ 200 (issue 26 estimated 150-256), fp32 without TF32 ~67 / 4.8 ~ 14.
#: Beyond it the unchosen experts' FLOPs start to show and the sorted kernels win.
GPU_LOWRANK_MAX = {2: 256, 4: 32}


def use_lowrank(num_experts: int, rank: int, d_in: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> bool:
    """Whether an expert op of ``num_experts`` experts of rank ``rank`` on ``d_in``-wide inputs takes the
    low-rank all-experts form rather than the sorted grouped one, on ``device`` in ``dtype``.

    On a CPU the sorted form's cost is gathering and scattering ``d``-wide rows, so the low-rank form
    wins while all ranks together stay well below the width (``E r 4 <= d``, measured on MiniLM). On
    a GPU it wins while ``E r`` is below ``GPU_LOWRANK_MAX`` (see there), whatever ``d`` is.
    """
    if torch.device(device).type == "cpu":
        return num_experts * rank * 4 <= d_in
    return num_experts * rank <= GPU_LOWRANK_MAX.get(torch.finfo(dtype).bits // 8, 128)


def _forward(x, weight, bias, router_w, a_flat, b_flat, seed, salt, sel_bias, w, loads, top_k, renorm, scale, p_drop,
             want_stats, keep_xd):
    """The forward kernels; returns ``(out, pc, stats, xd, h, hg)``."""
    E = router_w.shape[0]
    out = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()  # [T, d_out]
    z, xd = route_shrink(x, router_w, a_flat, seed, salt, p_drop, keep_xd)  # [T, E + E*r]
    logits, h = z[:, :E], z[:, E:]
    hg, pc, stats = expert_gate(logits, h, sel_bias, w, loads, top_k, renorm, scale, want_stats)
    out.addmm_(hg, b_flat)  # the expand, accumulated into the base output
    return out, pc, stats, xd, h, hg


class LowRankExperts(torch.autograd.Function):
    """The layer's forward and its hand-written backward (gradients for x, router, A and flat B)."""

    @staticmethod
    def forward(ctx, x, weight, bias, router_w, a_flat, b_flat, seed, salt, sel_bias, w, loads, top_k, renorm, scale,
                p_drop, want_stats):  # type: ignore[override]
        keep_xd = p_drop > 0 and a_flat.requires_grad
        out, pc, stats, xd, h, hg = _forward(x, weight, bias, router_w, a_flat, b_flat, seed, salt, sel_bias, w, loads,
                                             top_k, renorm, scale, p_drop, want_stats, keep_xd)
        ctx.save_for_backward(x, xd if keep_xd else None, h, hg, pc, weight, router_w, a_flat, b_flat, seed, w)
        ctx.info = (salt, renorm, scale, p_drop, router_w.dtype)
        ctx.set_materialize_grads(False)  # an unused pc or stats gets no zero-filled gradient (a launch each)
        return out, pc, stats

    @staticmethod
    def backward(ctx, dout, dpc, dstats):  # type: ignore[override]
        x, xd, h, hg, pc, weight, router_w, a_flat, b_flat, seed, w = ctx.saved_tensors
        salt, renorm, scale, p_drop, logit_dtype = ctx.info
        E = router_w.shape[0]
        need = ctx.needs_input_grad
        if dout is None:  # only pc or stats were used: the layer's output carries no gradient
            dout = torch.zeros(x.shape[0], b_flat.shape[1], dtype=x.dtype, device=x.device)
        dhg = dout @ b_flat.t()  # [T, E*r]
        db = hg.t() @ dout if need[5] else None  # [E*r, d_out]
        dprobs = dpc[:, :E] if dpc is not None else None  # the choices carry no gradient
        dlogits, dh = expert_gate_backward(dhg, h, pc, dprobs, w if dstats is not None else None, dstats, renorm, scale,
                                           logit_dtype)
        dr = dlogits.t() @ x if need[3] else None  # [E, d_in]
        da = dh.t() @ (xd if xd is not None else x) if need[4] else None  # [E*r, d_in]
        dx = None
        if need[0]:
            dx = dout @ weight  # [T, d_in]: the base layer's term; the router's and the adapter's added in place
            adapter_dx(dx, dh, a_flat, dlogits, router_w, seed, salt, p_drop)
        return dx, None, None, dr, da, db, None, None, None, None, None, None, None, None, None, None


def lowrank_experts(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, router_w: torch.Tensor,
                    a_flat: torch.Tensor, b_flat: torch.Tensor, *, seed: torch.Tensor | None = None, salt: int = 0,
                    sel_bias: torch.Tensor | None = None, w: torch.Tensor | None = None,
                    loads: torch.Tensor | None = None, top_k: int, renorm: bool, scale: float, p_drop: float = 0.0,
                    want_stats: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out [T, d_out], pc [T, 2E] fp32, stats [num_blocks, 2E] fp32)`` of flat tokens ``x [T, d_in]``.

    ``weight [d_out, d_in]`` / ``bias``: the frozen base; ``router_w [E, d_in]``; ``a_flat [E*r, d_in]``;
    ``b_flat [E*r, d_out]``; ``seed`` (int64 ``[1]``, on the device) and ``salt``: the dropout draw when
    ``p_drop > 0``; ``sel_bias [R, E]``: the selection bias per row of ``T // R`` tokens; ``w [T]``: token
    weights (statistics, loads); ``loads [E]`` float64: the weighted counts are added into it;
    ``stats`` (``want_stats``, else empty): per block of tokens the weighted sums of the probabilities
    (differentiable) and of the choices; ``pc``: the probabilities (differentiable), then the 0/1 choices.
    """
    if torch.is_grad_enabled() and (router_w.requires_grad or a_flat.requires_grad or b_flat.requires_grad
                                    or x.requires_grad):
        out, pc, stats = LowRankExperts.apply(x, weight, bias, router_w, a_flat, b_flat, seed, salt, sel_bias, w, loads,
                                              top_k, renorm, scale, p_drop, want_stats)
        return out, pc, stats
    out, pc, stats, _, _, _ = _forward(x, weight, bias, router_w, a_flat, b_flat, seed, salt, sel_bias, w, loads,
                                       top_k, renorm, scale, p_drop, want_stats, False)
    return out, pc, stats
