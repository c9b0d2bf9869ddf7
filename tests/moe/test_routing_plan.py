"""Routing passed as values: a plan installed for a ``with`` block, a recorder handed back, nothing left behind."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

from routing_env.moe import MoEConfig, RoutingPlan, build_model, moe_layers, primary_bias
from routing_env.moe.routing import NO_PLAN
from routing_env.moe.stepper import GroupStepper
from tests.conftest import random_pairs_batch, tiny_bert

kernels = importlib.import_module("routing_env.moe.kernels.lora_moe")  # the module (the package exports the function)


@pytest.fixture
def model():
    m = build_model("lora-moe", backbone_module=tiny_bert(), moe=MoEConfig(num_groups=2, num_experts=4, top_k=2))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # experts and routers that differ, so an override changes the logits
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    m.chunk_rows = 3  # several chunks: row_index / num_rows are set per chunk
    return m.eval()


def _left_clean(model) -> None:
    ctx = model.routing
    assert ctx.plan is NO_PLAN and ctx.recorder is None
    s = ctx.state
    assert s.token_mask is None and s.row_index is None and s.num_rows is None and s.row_example is None
    assert s.router_state is None


def _full_plan(rows: int) -> RoutingPlan:
    bias = primary_bias(torch.full((rows,), 3), 4)
    return RoutingPlan(selection_bias={1: bias}, compute_aux=True, record_loads=True, collect_route=True)


def test_a_plan_is_a_frozen_value():
    plan = RoutingPlan(record_loads=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.record_loads = False  # type: ignore[misc]
    assert plan.records and not RoutingPlan().records
    model = build_model("lora-moe", backbone_module=tiny_bert(), moe=MoEConfig(num_groups=2))
    with pytest.raises(TypeError, match="RoutingPlan"):
        with model.routed({"record_loads": True}):  # type: ignore[arg-type]
            pass


def test_a_forward_that_raises_inside_the_block_leaves_no_plan_and_no_records(model):
    batch = random_pairs_batch(B=2, C=3)
    rows = int(batch.choice_mask.sum())

    def boom(mod, args, out):
        raise RuntimeError("boom")

    hook = moe_layers(model)[-1].register_forward_hook(boom)  # the last module: after every other recorded
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), model.routed(_full_plan(rows)) as rec:
            model(batch)
    hook.remove()
    assert rec.loads and rec.route_sum  # the block's own recorder got the records, and it alone
    _left_clean(model)
    with torch.no_grad():
        plain = model(batch)
        with model.routed(RoutingPlan()) as fresh:
            again = model(batch)
    assert torch.equal(plain, again)  # the override did not outlive its block
    assert not (fresh.loads or fresh.row_counts or fresh.route_sum or fresh.aux_losses or fresh.balance_losses)


def test_consecutive_forwards_with_different_plans_do_not_leak(model):
    batch = random_pairs_batch(B=2, C=3)
    rows = int(batch.choice_mask.sum())
    with torch.no_grad():
        free = model(batch)
        with model.routed(_full_plan(rows)) as first:
            forced = model(batch)
        _left_clean(model)
        loads = {k: v.clone() for k, v in first.loads.items()}
        with model.routed(RoutingPlan(record_loads=True)) as second:
            after = model(batch)
    _left_clean(model)
    assert not torch.equal(forced, free)  # the first plan's override changed the forward ...
    assert torch.equal(after, free)  # ... and not the second's
    assert first.aux_losses and first.route_sum
    assert not (second.aux_losses or second.route_sum or second.row_counts)  # the second recorded loads only
    assert set(second.loads) == set(loads)
    for name, counts in second.loads.items():  # its own counts, not added to the first block's
        assert float(counts.sum()) == float(loads[name].sum())
        assert torch.equal(first.loads[name], loads[name])  # the first recorder untouched by the second block
    forced_group = [m.name for m in moe_layers(model) if m.group == 1]
    assert any(not torch.equal(second.loads[n], loads[n]) for n in forced_group)


def test_nested_plan_replaces_the_outer_for_its_block_only(model):
    batch = random_pairs_batch(B=2, C=3)
    model.one_pass = True  # per-row records need every row in one pass
    with torch.no_grad(), model.routed(RoutingPlan(record_loads=True)) as outer:
        with model.routed(RoutingPlan(record_rows=True)) as inner:
            model(batch)
        assert model.routing.plan.record_loads and model.routing.recorder is outer
        model(batch)
    assert inner.row_counts and not inner.loads
    assert outer.loads and not outer.row_counts
    _left_clean(model)


def test_stepper_leaves_no_plan_behind(model):
    stepper = GroupStepper(model)
    batch = random_pairs_batch(B=1, C=3)
    from routing_env.moe.stepper import Rows

    rows = Rows(batch.input_ids[0], batch.attention_mask[0], batch.token_type_ids[0])
    h = stepper.embed(rows)
    bias = primary_bias(torch.full((3,), 1), 4)
    out, counts = stepper.run_group_counts(h, rows.attention_mask, 0, bias)
    _left_clean(model)
    assert counts.shape == (3, 4) and bool((counts[:, 1] > 0).all())
    torch.testing.assert_close(stepper.run_group(h, rows.attention_mask, 0, bias), out, rtol=0, atol=0)
    _left_clean(model)


def test_layer_and_kernel_ask_one_dispatch_rule(model, monkeypatch):
    layer = moe_layers(model)[0]
    E, r, d_in = layer.lora_A.shape
    assert kernels.use_lowrank(E, r, d_in) == (E * r * 4 <= d_in)  # on a CPU (the GPU's rule: test_lowrank_kernels)
    x = torch.randn(2, 5, d_in, generator=torch.Generator().manual_seed(1))
    asked = []
    import routing_env.moe.layer as layer_module

    for form in (True, False):
        monkeypatch.setattr(layer_module, "use_lowrank", lambda *a, form=form: asked.append(a) or form)
        monkeypatch.setattr(kernels, "use_lowrank", lambda *a, form=form: asked.append(a) or form)
        with torch.no_grad():
            y = layer(x)
        if form:
            lowrank = y
    torch.testing.assert_close(y, lowrank, rtol=1e-5, atol=1e-5)  # the two forms compute the same op
    # lowrank: the layer; sorted: layer, then lora_moe; each with the device and dtype the op runs in
    assert asked == [(E, r, d_in, x.device, x.dtype)] * 3
