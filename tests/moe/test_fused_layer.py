"""The GPU's fused low-rank path of ``LoRAMoELinear`` (``kernels.lowrank``) against the CPU's composite path.

Both paths compute the same layer; here the fused one runs its ops' PyTorch references on the CPU
(``fused_everywhere``). Same weights, same batch: equal logits, loads, Switch losses, stage 3's route
sums and all gradients, up to float32 summation order (other GEMM shapes); the experts chosen and
the loads exactly. A changed expert moves the logits by ~1e-1 here, far above the tolerances.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from routing_env.common.opcount import OpCounter
from routing_env.moe import MoEConfig, RoutingPlan, build_model, moe_layers
from routing_env.moe.kernels.backend import fused_everywhere
from routing_env.moe.routing import combo_bias, primary_bias
from tests.conftest import random_pairs_batch, tiny_bert, tiny_moe_with_distinct_experts


def _model(moe: MoEConfig = MoEConfig(num_groups=2, rank=2), dropout: float = 0.0, seed: int = 0):
    model = tiny_moe_with_distinct_experts(moe, seed)
    for m in moe_layers(model):
        m.dropout = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()
    model.one_pass = True
    return model


def _fused(on: bool):
    return fused_everywhere() if on else contextlib.nullcontext()


def _forward(model, batch, plan: RoutingPlan, fused: bool):
    with _fused(fused), model.routed(plan) as rec:
        logits = model(batch)
    return logits, rec


@pytest.mark.parametrize("moe", [MoEConfig(num_groups=2, rank=2), MoEConfig(num_groups=2, rank=2, top_k=1),
                                 MoEConfig(num_groups=2, rank=2, num_experts=[2, 2, 3, 3])])
def test_eval_forward_gives_the_composite_logits_and_exactly_its_loads(moe):
    a, b = _model(moe).eval(), _model(moe).eval()
    batch = random_pairs_batch(B=4, C=4, T=9)
    with torch.no_grad():
        la, ra = _forward(a, batch, RoutingPlan(record_loads=True, record_rows=True), False)
        lb, rb = _forward(b, batch, RoutingPlan(record_loads=True, record_rows=True), True)
    real = batch.choice_mask
    torch.testing.assert_close(lb[real], la[real], rtol=1e-4, atol=1e-4)
    assert ra.loads.keys() == rb.loads.keys()
    assert all(torch.equal(ra.loads[n], rb.loads[n]) for n in ra.loads)  # integer counts: exact
    assert ra.row_counts.keys() == rb.row_counts.keys() and ra.row_counts
    for g in ra.row_counts:
        assert torch.equal(ra.row_counts[g], rb.row_counts[g])


@pytest.mark.parametrize("mode", ["primary", "combo"])
def test_selection_bias_forces_the_same_experts(mode):
    a, b = _model().eval(), _model().eval()
    batch = random_pairs_batch(B=2, C=4, T=9)
    R = batch.choice_mask.numel()
    if mode == "primary":
        bias = primary_bias(torch.tensor([3, -1, 0, 2, 1, 1, -1, 0]), 4)
    else:
        sets = torch.zeros(R, 4, dtype=torch.bool)
        sets[::2, 1] = sets[::2, 2] = True
        bias = combo_bias(sets)
    plan = RoutingPlan(selection_bias={0: bias, 1: bias}, record_rows=True)
    with torch.no_grad():
        la, ra = _forward(a, batch, plan, False)
        lb, rb = _forward(b, batch, plan, True)
    torch.testing.assert_close(lb[batch.choice_mask], la[batch.choice_mask], rtol=1e-4, atol=1e-4)
    assert all(torch.equal(ra.row_counts[g], rb.row_counts[g]) for g in ra.row_counts)


def test_training_losses_and_all_gradients_equal_the_composite():
    a, b = _model().train(), _model().train()
    batch = random_pairs_batch(B=4, C=4, T=9)
    plan = RoutingPlan(compute_aux=True, collect_route=True)
    losses = []
    for model, fused in ((a, False), (b, True)):
        logits, rec = _forward(model, batch, plan, fused)
        aux = torch.stack(rec.aux_losses).mean()
        route = rec.example_group_probs(len(batch.ids)).square().mean()  # stage 3's per-example group routes
        loss = F.cross_entropy(logits, batch.labels) + aux + route
        loss.backward()
        losses.append((aux.detach(), route.detach()))
        assert len(rec.aux_losses) == len(moe_layers(model))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4 * float(p.grad.abs().max()) + 1e-7,
                                       msg=name)


def test_dropout_is_drawn_from_torchs_seed_and_off_in_evaluation():
    model = _model(dropout=0.5).train()
    batch = random_pairs_batch(B=2, C=4, T=9)
    out = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        with fused_everywhere():
            out.append(model(batch))
    assert torch.equal(out[0], out[1]) and not torch.equal(out[0], out[2])  # seeded runs repeat
    with torch.no_grad(), fused_everywhere():
        model.eval()
        x = torch.randn(5, 32)
        layer = moe_layers(model)[0]
        torch.manual_seed(0)
        assert torch.equal(layer(x), layer(x))  # no dropout in evaluation


def test_strategies_and_router_only_route_gradients_take_the_composite_path():
    model = build_model("lora-moe", backbone_module=tiny_bert(), moe=MoEConfig(num_groups=2, rank=2, balance="loss-free"),
                        seed=0).eval()
    model.one_pass = True
    with torch.no_grad(), fused_everywhere(), model.routed(RoutingPlan(record_loads=True)), OpCounter() as ops:
        model(random_pairs_batch())
    assert "expert_gate" not in ops.ops  # a strategy's own selection: the composite form
    plain = _model().train()
    with fused_everywhere(), plain.routed(RoutingPlan(collect_route=True, route_grad_router_only=True)), OpCounter() as ops:
        plain(random_pairs_batch())
    assert "expert_gate" not in ops.ops


def test_fused_forward_and_backward_issue_no_sync_op_and_compile_without_graph_breaks():
    import torch._dynamo

    model = _model(dropout=0.1).train()
    batch = random_pairs_batch()
    with fused_everywhere(), OpCounter() as ops:
        with model.routed(RoutingPlan(compute_aux=True, collect_route=True)) as rec:
            logits = model(batch)
        loss = F.cross_entropy(logits, batch.labels) + torch.stack(rec.aux_losses).mean() + \
            rec.example_group_probs(len(batch.ids)).square().mean()
        loss.backward()
    assert ops.syncs == {} and ops.ops["adapter_dx"] > 0
    model.eval()
    torch._dynamo.reset()
    with torch.no_grad(), fused_everywhere(), model.routed(RoutingPlan(record_loads=True)):
        explained = torch._dynamo.explain(model)(batch)
    assert explained.graph_break_count == 0, explained.break_reasons
