"""``LoRAMoELinear``: a frozen linear layer plus a top-k routed mixture of LoRA experts."""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from routing_env.moe.balancing.aux import SwitchAux
from routing_env.moe.kernels import lora_moe, use_lowrank
from routing_env.moe.kernels.backend import fused_enabled
from routing_env.moe.kernels.lowrank import lowrank_experts
from routing_env.moe.routing import RoutingContext

__all__ = ["LoRAMoELinear"]

_SWITCH = SwitchAux()  # the default balancing term (models without a strategy)


class LoRAMoELinear(nn.Module):
    """``y = base(x) + scale * sum_{e in topk(x)} gate_e(x) * B_e A_e dropout(x)``.

    ``A_e`` starts Kaiming-uniform and ``B_e`` at zero (as in LoRA), so a fresh layer returns exactly
    ``base(x)``. The router is a bias-free linear map to ``E`` logits; gates are its softmax
    probabilities renormalised over the selected experts (top-1: the raw probability, as in Switch),
    so the router gets gradient from the task loss.
    """

    def __init__(
        self,
        base: nn.Linear,
        *,
        num_experts: int,
        top_k: int,
        rank: int,
        alpha: float,
        dropout: float,
        layer: int,
        group: int,
        name: str,
        context: RoutingContext,
    ) -> None:
        super().__init__()
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} is larger than num_experts={num_experts} in {name}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        d_in, d_out = base.in_features, base.out_features
        self.num_experts, self.top_k, self.rank = num_experts, top_k, rank
        self.scale = alpha / rank
        self.layer, self.group, self.name = layer, group, name
        # Keys this layer's dropout draw in the fused path (seed + salt): a stable number per module name.
        self.salt = zlib.crc32(name.encode()) & 0x3FFFFFFF
        dtype, device = base.weight.dtype, base.weight.device
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, d_in, dtype=dtype, device=device))  # [E, r, d_in]
        # [E, d_out, r], stored rank-major ([E, r, d_out] in memory): all experts' up-projections are then
        # one [E*r, d_out] matrix as a view, with no copy in the forward and a gradient in the same layout
        # (so none in the backward either). Values, checkpoints and optimiser steps are unchanged by it.
        self.lora_B = nn.Parameter(torch.zeros(num_experts, rank, d_out, dtype=dtype, device=device).transpose(1, 2))
        self.router = nn.Linear(d_in, num_experts, bias=False, dtype=dtype, device=device)  # [E, d_in]
        for e in range(num_experts):
            nn.init.kaiming_uniform_(self.lora_A.data[e], a=math.sqrt(5))
        # A small router init keeps early routing near uniform, so no expert is starved before it learns.
        nn.init.normal_(self.router.weight, std=0.02)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Not a submodule: the context is shared by every layer of the model and holds no parameters.
        object.__setattr__(self, "context", context)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, rank={self.rank}, layer={self.layer}, group={self.group}"

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router for flat tokens ``x [T, d_in]`` -> ``(probs [T, E], expert_idx [T, k], gates [T, k])``.

        The choice ``forward`` makes (strategy and overrides included); a strategy that picks a
        varying number of experts gives ``k = E`` slots, the unchosen at gate 0.
        """
        _, probs, chosen, expert_idx = self._route(x)
        return probs, *self._sparse_gates(probs, chosen, expert_idx)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, E]`` routing logits of flat tokens ``x [T, d_in]``: the linear router, then the strategy's variant.

        A recurrent strategy (``rmoe``) also advances the pass's routing state here, so calling it
        out of a forward's module order changes the state the next module reads.
        """
        logits = self.router(x).float()  # [T, E]
        strategy = self.context.strategy
        return logits if strategy is None else strategy.scores(self, x, logits)

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(logits [T, E], probs [T, E], chosen [T, E] of 0/1, expert_idx [T, k] or None)`` of flat tokens."""
        logits = self.scores(x)
        strategy = self.context.strategy
        probs = logits.softmax(dim=-1)
        if strategy is None or not strategy.selects or self.group in self.context.plan.selection_bias:
            # Top-k (an env override forces experts into it, whatever the strategy).
            expert_idx = self._select(logits)  # [T, k]
            return logits, probs, probs.new_zeros(probs.shape).scatter_(1, expert_idx, 1.0), expert_idx
        return logits, probs, strategy.select(self, logits, probs), None  # possibly not k per token (top-p)

    def _sparse_gates(self, probs: torch.Tensor, chosen: torch.Tensor,
                      expert_idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(expert_idx [T, k], gates [T, k])``: the chosen experts' probabilities, renormalised."""
        if expert_idx is None:  # a strategy's selection as [T, k_max] ids, unchosen slots at gate 0
            k = self.num_experts if self.context.strategy.variable_k else self.top_k
            expert_idx = (chosen * 2 + probs).topk(k, dim=-1).indices
        gates = probs.gather(1, expert_idx) * chosen.gather(1, expert_idx)
        if not self._renormalise():
            return expert_idx, gates  # Switch's top-1 gate: see ``_renormalise``
        return expert_idx, gates / gates.sum(dim=-1, keepdim=True)

    def _renormalise(self) -> bool:
        """Whether the chosen experts' probabilities are renormalised to sum to 1 (every top-k > 1).

        Not for top-1 (Switch Transformer's gate): renormalised, a single expert's gate is p / p = 1
        whatever the router says, so the task loss gives the router no gradient at all and a top-1
        router would learn only from the balance loss. Its raw probability keeps the gradient.
        """
        return not (self.top_k == 1 and (self.context.strategy is None or not self.context.strategy.variable_k))

    def _select(self, logits: torch.Tensor) -> torch.Tensor:
        """``[T, k]`` the experts each token uses: top-k of the logits plus the group's selection bias."""
        select = logits
        bias = self.context.plan.selection_bias.get(self.group)
        if bias is not None:
            state = self.context.state
            if state.row_index is not None and bias.shape[0] == state.num_rows:
                bias = bias[state.row_index.to(bias.device)]  # a chunked pass holds only these rows of the batch
            T, R = logits.shape[0], bias.shape[0]
            if T % R:
                raise ValueError(f"{self.name}: {T} tokens do not split into the override's {R} rows")
            # Every row's tokens are contiguous in the flattened [R, S, d] input; a broadcast, not
            # repeat_interleave, so no op depends on data.
            select = (logits.view(R, T // R, -1) + bias.to(logits.device)[:, None, :]).view(T, -1)
        return select.topk(self.top_k, dim=-1).indices  # [T, k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T, d_in], T = R * S
        E, r, d_in = self.lora_A.shape
        dev = flat.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else flat.dtype
        lowrank = use_lowrank(E, r, d_in, flat.device, dt)
        if lowrank and self._fusable(flat):
            return self._forward_fused(flat, dt, shape).view(*shape[:-1], -1)
        out = self.base(flat)  # [T, d_out]
        logits, probs, chosen, expert_idx = self._route(flat)  # chosen [T, E]: 1 where a token uses an expert
        strategy = self.context.strategy
        if lowrank:  # the low-rank form (see kernels.lora_moe): every op has a fixed shape
            dense = probs * chosen
            if self._renormalise():
                dense = dense / dense.sum(dim=-1, keepdim=True)  # [T, E] gates renormalised over the chosen, 0 elsewhere
            a_t, b_flat, spread = self._flat_weights()
            h = self.dropout(flat) @ a_t  # [T, E*r] every expert's down-projection
            h = h * (dense.to(h.dtype) @ spread)  # gate each expert's r columns (spread: [E, E*r] of 0/1)
            out = torch.addmm(out, h, b_flat.to(h.dtype), alpha=self.scale)  # out + scale * h @ B
        else:
            expert_idx, gates = self._sparse_gates(probs, chosen, expert_idx)
            # Under autocast the grouped op (a custom kernel, which autocast does not see) runs in its dtype.
            delta = lora_moe(self.dropout(flat).to(dt), self.lora_A.to(dt), self.lora_B.to(dt), expert_idx, gates.to(dt),
                             self.scale)
            out = out + delta.to(out.dtype)
        ctx = self.context
        if ctx.plan.records:
            # Statistics in fp32 under bf16 autocast too: bf16 counts stop being exact integers at 256.
            with torch.autocast(probs.device.type, enabled=False):
                self._record(logits, probs, chosen, shape, self._route_probs(flat, logits, probs))
        if strategy is not None and self.training and torch.is_grad_enabled():
            with torch.no_grad():  # the strategy's state (loss-free bias, ...) learns from this forward
                strategy.update(self, flat, logits, probs, chosen, ctx.token_weight(probs.shape[0], probs))
        return out.view(*shape[:-1], -1)

    def _fusable(self, flat: torch.Tensor) -> bool:
        """Whether this forward takes the fused low-rank ops (``kernels.lowrank``): on their device, for the
        learned top-k router (a strategy's own scores, selection and losses run the composite form), and
        not for a route loss whose gradient must stop at the router (that needs the router's own map), and with
        the base layer frozen (its backward computes no gradient for the base)."""
        plan = self.context.plan
        return (fused_enabled(flat.device) and self.context.strategy is None and not self.base.weight.requires_grad
                and not (plan.collect_route and plan.route_grad_router_only))

    def _forward_fused(self, flat: torch.Tensor, dt: torch.dtype, shape: torch.Size) -> torch.Tensor:
        """The low-rank forward as ``lowrank_experts``: base GEMM, ``route_shrink``, the gate kernel and the
        expand into the base output; loads and Switch statistics come out of the gate kernel itself."""
        ctx, E, T = self.context, self.num_experts, flat.shape[0]
        plan, rec = ctx.plan, ctx.recorder
        w = ctx.token_weight(T, torch.empty((), device=flat.device)) if plan.records else None  # [T] fp32
        loads = None
        if plan.record_loads:  # float64 counts on the device, added to by the gate kernel itself
            loads = rec.loads.get(self.name)
            if loads is None:
                loads = rec.loads[self.name] = torch.zeros(E, dtype=torch.float64, device=flat.device)
        p_drop = self.dropout.p if self.training and isinstance(self.dropout, nn.Dropout) else 0.0
        base = self.base
        r, d_in = self.rank, self.lora_A.shape[2]
        with torch.autocast(flat.device.type, enabled=False):  # every operand is cast to ``dt`` here
            out, pc, stats = lowrank_experts(
                flat.to(dt), base.weight.to(dt), None if base.bias is None else base.bias.to(dt),
                self.router.weight.to(dt), self.lora_A.to(dt).reshape(E * r, d_in),
                self.lora_B.to(dt).permute(0, 2, 1).reshape(E * r, -1),  # a view: see __init__
                seed=ctx.state.dropout_seed(flat.device) if p_drop > 0 else None, salt=self.salt,
                sel_bias=self._row_bias(T), w=w, loads=loads, top_k=self.top_k, renorm=self._renormalise(),
                scale=self.scale, p_drop=p_drop, want_stats=plan.compute_aux)
        if plan.compute_aux:
            rec.switch_stats.append((stats, self.top_k))
        if plan.record_rows or plan.collect_route:
            with torch.autocast(flat.device.type, enabled=False):
                self._record_rows_and_route(pc[:, :E], pc[:, E:], shape, w, pc[:, :E])
        return out

    def _row_bias(self, T: int) -> torch.Tensor | None:
        """``[R, E]`` the group's selection bias for this pass's rows (None: no override)."""
        bias = self.context.plan.selection_bias.get(self.group)
        if bias is None:
            return None
        state = self.context.state
        if state.row_index is not None and bias.shape[0] == state.num_rows:
            bias = bias[state.row_index.to(bias.device)]
        if T % bias.shape[0]:
            raise ValueError(f"{self.name}: {T} tokens do not split into the override's {bias.shape[0]} rows")
        return bias.to(device=self.lora_A.device, dtype=torch.float32).contiguous()  # the gate reads [R, E] rows

    def _flat_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``A^T [d_in, E*r]``, ``B [E*r, d_out]`` and the gate spreader ``[E, E*r]``.

        With gradients these are views and one copy of B, part of the graph. Without (evaluation, the
        env, search) they are cached until the weights change, so a forward does not copy B again.
        """
        A, B = self.lora_A, self.lora_B
        E, r, d_in = A.shape
        # A compiled graph does its own caching (and cannot trace data-pointer checks).
        cached = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        key = (A._version, B._version, A.data_ptr(), B.data_ptr(), A.dtype) if cached else None
        cache = self.__dict__.get("_flat_cache")
        if cached and cache is not None and cache[0] == key:
            return cache[1]
        spread = torch.eye(E, dtype=A.dtype, device=A.device)[:, :, None].expand(E, E, r).reshape(E, E * r)  # [E, E*r]
        flat = (A.reshape(E * r, d_in).t(), B.permute(0, 2, 1).reshape(E * r, -1), spread)
        if cached:
            self.__dict__["_flat_cache"] = (key, flat)
        return flat

    def _route_probs(self, flat: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """``probs [T, E]`` as the routing loss sees them: the same values; with ``route_grad_router_only``
        a gradient that reaches the router's weights but not its input.

        Why: a routing loss that can reshape the hidden states fits a sharp target by moving the
        adapters below the router (the routing control: the router fits the designed route exactly and
        the task loss stalls at chance). ``lin - lin.detach()`` is 0 in value, so the probabilities,
        and with them every statistic recorded from them, are bit for bit the forward's.
        """
        plan = self.context.plan
        if not (plan.collect_route and plan.route_grad_router_only and torch.is_grad_enabled()):
            return probs
        # [T, E] the router's own linear map on its detached input (in the router's dtype: this runs
        # with autocast off, and under bf16 autocast ``flat`` is bf16); only its gradient is used.
        lin = self.router(flat.detach().to(self.router.weight.dtype)).float()
        return (logits.detach() + (lin - lin.detach())).softmax(dim=-1)

    def _record(self, logits: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor, shape: torch.Size,
                route_probs: torch.Tensor) -> None:
        """Statistics of this call (``chosen [T, E]``: 1 where a token uses an expert), kept on the device.

        ``route_probs``: ``probs`` as the routing loss sees them (``_route_probs``).
        """
        ctx = self.context
        plan, rec, state = ctx.plan, ctx.recorder, ctx.state
        T = probs.shape[0]
        w = state.token_weight(T, probs)  # [T] 1 for real tokens
        if plan.compute_aux:  # the strategy's terms; by default the Switch loss alone
            terms = ctx.strategy.losses(self, logits, probs, chosen, w) if ctx.strategy is not None else \
                [("aux", _SWITCH.loss(self, logits, probs, chosen, w))]
            for kind, value in terms:
                (rec.aux_terms if kind == "aux" else rec.balance_losses).append(value)
        if plan.record_loads:
            # Accumulated in float64 on the model's device; read once per evaluation (no host sync here).
            counts = w @ chosen.detach()  # [E]
            prev = rec.loads.get(self.name)
            rec.loads[self.name] = counts.double() if prev is None else prev.add_(counts)
        self._record_rows_and_route(probs, chosen, shape, w, route_probs)

    def _record_rows_and_route(self, probs: torch.Tensor, chosen: torch.Tensor, shape: torch.Size, w: torch.Tensor,
                               route_probs: torch.Tensor) -> None:
        """Stage 3's per-row route sums (with gradient, from ``route_probs``) and the env's per-row statistics."""
        ctx, E = self.context, self.num_experts
        plan, rec, state = ctx.plan, ctx.recorder, ctx.state
        T = probs.shape[0]
        if plan.collect_route:
            R = shape[0] if len(shape) == 3 else T
            wr = w.reshape(R, -1, 1)  # [R, S, 1]
            logp = torch.log(route_probs.clamp_min(1e-12)).reshape(R, -1, E)
            rec.add_route(self.group, (route_probs.reshape(R, -1, E) * wr).sum(1), wr.sum((1, 2)), (logp * wr).sum(1),
                          state.row_index, state.num_rows)
        if plan.record_rows:  # what the env reads of a group step: 3 launches per module on a GPU
            R = shape[0] if len(shape) == 3 else T
            c_row = (chosen.detach().reshape(R, -1, E) * w.reshape(R, -1, 1)).sum(1)  # [R, E]
            g = self.group
            rec.row_counts[g] = rec.row_counts[g] + c_row if g in rec.row_counts else c_row
