"""Balancing strategies: each one's defining property, the combination rules, and the model around them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from routing_env.moe import MoEConfig, build_model, load_checkpoint, moe_layers, save_checkpoint
from routing_env.moe.balancing import STRATEGIES, make_strategy, sinkhorn_plan, topk_mask
from routing_env.moe.kernels import lora_moe_naive
from routing_env.moe.routing import RoutingContext, RoutingPlan, load_stats
from tests.conftest import random_pairs_batch, tiny_bert


class _Layer(nn.Module):
    """What a strategy sees of a layer: experts, k, training flag, the shared context."""

    def __init__(self, E: int = 4, k: int = 2) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.lora_A = E, k, torch.zeros(1)
        self.context = RoutingContext()


def _skewed(T: int = 256, E: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, E, generator=g) + torch.linspace(2.0, 0.0, E)  # expert 0 preferred


def test_unknown_names_and_clashes_are_errors_listing_the_valid_ones():
    with pytest.raises(ValueError, match="unknown balancing strategy bogus; valid: aux, z-loss, loss-free"):
        make_strategy("aux+bogus")
    with pytest.raises(ValueError, match="loss-free and top-p both choose the experts"):
        make_strategy("loss-free+top-p")
    with pytest.raises(ValueError, match="names one strategy twice"):
        make_strategy("aux+aux")
    assert make_strategy("loss-free+z-loss").selects and not make_strategy("aux+z-loss").selects


def test_z_loss_is_the_mean_squared_logsumexp_and_combines_with_aux():
    layer = _Layer()
    logits = _skewed(8)
    probs, w = logits.softmax(-1), torch.ones(8)
    chosen = topk_mask(logits, 2)
    losses = dict(make_strategy("aux+z-loss").losses(layer, logits, probs, chosen, w))
    expected = 1e-3 * torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(losses["balance"], expected)
    f, P = chosen.mean(0) / 2, probs.mean(0)
    torch.testing.assert_close(losses["aux"], 4 * (f * P).sum())


def test_loss_free_bias_moves_a_skewed_router_to_uniform_load_and_leaves_gates_alone():
    st, layer = make_strategy("loss-free"), _Layer()
    st.attach(layer)
    st.parts[0].rate = 0.02
    cvs = []
    for step in range(150):
        logits = _skewed(seed=step)
        probs = logits.softmax(-1)
        chosen = st.select(layer, logits, probs)
        cvs.append(load_stats(chosen.sum(0)).cv)
        st.update(layer, None, logits, probs, chosen, torch.ones(logits.shape[0]))
    assert cvs[0] > 0.3 and np.mean(cvs[-20:]) < 0.1  # measured: 0.57 -> 0.07
    assert layer.balance_bias[0] < 0 < layer.balance_bias[-1]  # the favourite pushed down, the last up


def test_loss_free_layer_gates_are_the_router_probabilities_of_the_biased_choice():
    model = build_model("lora-moe", backbone_module=tiny_bert(), moe=MoEConfig(num_groups=2, balance="loss-free"))
    layer = moe_layers(model)[0]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
        layer.balance_bias.copy_(torch.tensor([3.0, -3.0, 0.0, 0.0]))
    layer.eval()
    x = torch.randn(5, layer.base.in_features, generator=g)
    with torch.no_grad():
        got = layer(x)
        probs = layer.router(x).softmax(-1)
        idx = (layer.router(x) + layer.balance_bias).topk(2, -1).indices
        gates = probs.gather(1, idx) / probs.gather(1, idx).sum(-1, keepdim=True)  # unbiased probabilities
        want = layer.base(x) + lora_moe_naive(x, layer.lora_A, layer.lora_B, idx, gates, layer.scale)
    assert (idx == 0).any(dim=1).all() and not (idx == 1).any()  # the bias decided the choice
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_top_p_takes_the_smallest_prefix_reaching_p():
    st = make_strategy("top-p")
    probs = torch.tensor([[0.6, 0.3, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4], [0.35, 0.3, 0.2, 0.15]])
    for p, want in ((0.5, [[1, 0, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0]]), (0.8, [[1, 1, 0, 0], [0, 1, 1, 1], [1, 1, 1, 0]]),
                    (0.99, [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]])):
        st.parts[0].p = p
        assert st.select(_Layer(), probs.log(), probs).tolist() == want


@pytest.mark.parametrize("rank", [2, 8])  # the low-rank form and the grouped one
def test_top_p_layer_uses_a_varying_number_of_experts(rank):
    model = build_model("lora-moe", backbone_module=tiny_bert(), moe=MoEConfig(num_groups=2, rank=rank, balance="top-p"))
    layer = moe_layers(model)[0].eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
        layer.router.weight.copy_(0.2 * torch.randn(layer.router.weight.shape, generator=g))  # spread, not one-hot
        x = torch.randn(9, layer.base.in_features, generator=g)
        probs = layer.router(x).softmax(-1)
        chosen = model.routing.strategy.select(layer, layer.router(x), probs)
        counts = chosen.sum(-1)
        idx = (chosen * 2 + probs).topk(4, -1).indices
        gates = probs.gather(1, idx) * chosen.gather(1, idx)
        want = layer.base(x) + lora_moe_naive(x, layer.lora_A, layer.lora_B, idx, gates / gates.sum(-1, keepdim=True),
                                               layer.scale)
        got = layer(x)
        _, route_idx, route_gates = layer.route(x)  # the public router reports the strategy's choice too
    torch.testing.assert_close(route_gates, gates / gates.sum(-1, keepdim=True))
    assert torch.equal(route_idx, idx)
    assert counts.min() >= 1 and counts.max() > counts.min()  # confident tokens fewer experts
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sinkhorn_plan_has_the_required_marginals_and_balances_the_choice():
    probs = _skewed(200).softmax(-1)
    w = torch.ones(200)
    w[-20:] = 0  # padding takes no part
    plan = sinkhorn_plan(probs, w, iters=50)
    torch.testing.assert_close(plan.sum(1), w, atol=1e-4, rtol=0)  # each real token one unit
    torch.testing.assert_close(plan.sum(0), torch.full((4,), 45.0), atol=1e-2, rtol=0)  # 180 tokens / 4 experts
    st, layer = make_strategy("sinkhorn"), _Layer()
    st.parts[0].fraction = 1.0
    layer.train()
    with torch.enable_grad():
        balanced = st.select(layer, probs.log(), probs)
    assert load_stats(balanced.sum(0)).cv < 0.5 * load_stats(topk_mask(probs, 2).sum(0)).cv
    layer.eval()
    assert torch.equal(st.select(layer, probs.log(), probs), topk_mask(probs.log(), 2))  # evaluation: plain top-k


@pytest.mark.parametrize("name", list(STRATEGIES) + ["loss-free+z-loss"])
def test_every_strategy_trains_saves_and_reloads(name, tmp_path):
    module, kind = tiny_bert()
    model = build_model("lora-moe", backbone_module=(module, kind), moe=MoEConfig(num_groups=2, balance=name))
    batch = random_pairs_batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        with model.routed(RoutingPlan(compute_aux=True)) as rec:
            loss = torch.nn.functional.cross_entropy(model(batch), batch.labels)
        extra = rec.aux_losses + rec.balance_losses
        if extra:
            loss = loss + torch.stack(extra).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        before = model(batch)
    save_checkpoint(model, tmp_path / "ck")
    again = load_checkpoint(tmp_path / "ck", backbone_module=tiny_bert()).eval()  # seeded: the same backbone
    assert again.moe_config.balance == name
    with torch.no_grad():
        assert torch.equal(again(batch), before)  # state (e.g. the loss-free bias) came back too


def test_finetune_refuses_an_unknown_strategy_before_any_work():
    from routing_env.training import finetune
    with pytest.raises(ValueError, match="valid: aux, z-loss, loss-free, top-p, sinkhorn"):
        finetune.check_config(finetune.Config(balance="switch"))


def test_loramoe_balances_within_groups_only():
    layer, st = _Layer(E=4), make_strategy("loramoe")
    w = torch.ones(4)

    def loss(p):
        probs = torch.tensor(p).repeat(4, 1)
        return dict(st.losses(layer, probs.log(), probs, topk_mask(probs, 2), w))["balance"]

    # Group {0, 1} takes 80% of the mass, group {2, 3} 20%: balanced inside each, so no penalty.
    assert loss([0.4, 0.4, 0.1, 0.1]) == 0
    # The same split between groups, unbalanced inside one: penalised (plain aux would treat both alike).
    assert loss([0.7, 0.1, 0.1, 0.1]) == pytest.approx(0.01 * 0.5625 / 2)  # cv^2 of (2.8, 0.4) / 2 groups
    with pytest.raises(ValueError, match="divisible by 2"):
        dict(make_strategy("loramoe").losses(_Layer(E=3), torch.zeros(2, 3), torch.full((2, 3), 1 / 3),
                                             torch.zeros(2, 3), torch.ones(2)))


def test_dynmole_gives_uncertain_tokens_more_experts_and_a_tsallis_loss():
    from routing_env.moe.balancing.dynmole import tsallis_entropy

    st, layer = make_strategy("dynmole"), _Layer(E=4, k=2)
    probs = torch.tensor([[0.97, 0.01, 0.01, 0.01], [0.26, 0.25, 0.25, 0.24], [0.5, 0.3, 0.1, 0.1]])
    chosen = st.select(layer, probs.log(), probs)
    assert chosen.sum(-1).tolist() == [2, 3, 2]  # only the near-uniform token gets k + 1
    torch.testing.assert_close(tsallis_entropy(probs), 1 - probs.square().sum(-1))
    loss = dict(st.losses(layer, probs.log(), probs, chosen, torch.ones(3)))["balance"]
    torch.testing.assert_close(loss, 1e-3 * (1 - probs.square().sum(-1)).mean())


def test_mar_keeps_a_repeated_input_on_one_expert_more_often_than_aux():
    """Routers drift from step to step (as training evens loads out); memory holds the repeated input."""
    g = torch.Generator().manual_seed(0)
    d, E = 16, 4
    DRIFT = 0.05  # per-step router change; logits grow to a few units, the memory bonus is at most 1
    x0 = torch.randn(1, d, generator=g)

    def changes(spec: str) -> int:
        st, layer = make_strategy(spec), _Layer(E=E, k=1)
        layer.lora_A = torch.zeros(E, 1, d)
        st.attach(layer)
        router = torch.randn(E, d, generator=torch.Generator().manual_seed(1)) * 0.1
        last, n = None, 0
        for step in range(60):
            router = router + DRIFT * torch.randn(E, d, generator=torch.Generator().manual_seed(100 + step))  # drift
            x = torch.cat([x0, torch.randn(31, d, generator=torch.Generator().manual_seed(200 + step))])
            logits = st.scores(layer, x, x @ router.t())
            probs = logits.softmax(-1)
            chosen = st.select(layer, logits, probs)
            st.update(layer, x, logits, probs, chosen, torch.ones(32))
            top = int(chosen[0].argmax())
            n += last is not None and top != last
            last = top
        return n

    assert changes("mar+aux") < changes("aux") / 2  # measured: 1 vs 12 switches of the repeated input


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bip_assignment_is_exactly_balanced_when_capacity_allows(seed):
    from routing_env.moe.balancing.bip import balanced_assignment

    probs = _skewed(T=120, E=4, seed=seed).softmax(-1)
    one = balanced_assignment(probs, 1)
    assert one.sum(0).tolist() == [30.0] * 4 and one.sum(1).eq(1).all()  # k = 1: exactly T / E each
    big = _skewed(T=4096, E=4, seed=seed).softmax(-1)
    two = balanced_assignment(big, 2)
    loads = two.sum(0)
    assert two.sum(1).eq(2).all() and loads.max() / loads.mean() < 1.02  # k = 2: two distinct experts, near-exact
    assert load_stats(topk_mask(big, 2).sum(0)).cv > 0.3  # what plain top-k does with these scores
    w = torch.ones(120)
    w[:20] = 0  # padding neither uses capacity nor changes its plain choice
    padded = balanced_assignment(probs, 1, w)
    assert padded[20:].sum(0).tolist() == [25.0] * 4 and torch.equal(padded[:20], topk_mask(probs[:20], 1))


def _rmoe_model() -> tuple[nn.Module, list]:
    module, kind = tiny_bert()
    model = build_model("lora-moe", backbone_module=(module, kind), moe=MoEConfig(num_groups=2, balance="rmoe")).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in moe_layers(model):
            m.balance_out.weight.normal_(0.0, 2.0, generator=g)
            m.lora_B.normal_(0.0, 0.5, generator=g)  # experts that differ, and a head that reads them
        model.head.weight.normal_(0.0, 1.0, generator=g)
    return model, moe_layers(model)


def _record_choices(layers: list) -> dict[str, list[torch.Tensor]]:
    """Each module's chosen experts ``[T, E]`` per forward, as its forward used them."""
    seen: dict[str, list[torch.Tensor]] = {m.name: [] for m in layers}
    for m in layers:
        route = m._route

        def wrapped(x, route=route, name=m.name):
            out = route(x)
            seen[name].append(out[2].clone())
            return out

        m._route = wrapped
    return seen


def test_rmoe_choice_at_a_layer_changes_when_the_state_from_the_layer_below_changes():
    model, layers = _rmoe_model()
    batch = random_pairs_batch()
    seen = _record_choices(layers)
    with torch.no_grad():
        a = model(batch)
        assert torch.equal(model(batch), a)  # every pass starts from an empty state (the embedding hook)
    # Perturb only the state leaving the last module of transformer layer 1, once.
    last = [m for m in layers if m.layer == 1][-1]
    state = model.routing.state

    def nudge(mod, args, out):
        state.router_state = state.router_state + torch.randn(state.router_state.shape, generator=torch.Generator().manual_seed(0))

    hook = last.register_forward_hook(nudge)
    with torch.no_grad():
        b = model(batch)
    hook.remove()
    for m in layers:
        first, perturbed = seen[m.name][0], seen[m.name][2]
        if m.layer <= 1:  # at and below the perturbation: the same choices
            assert torch.equal(first, perturbed), m.name
    above = [m for m in layers if m.layer == 2]
    changed = sum(int((seen[m.name][0] != seen[m.name][2]).any(-1).sum()) for m in above)
    assert changed > 0  # layer 2's routers read the state from layer 1: their choices moved
    assert not torch.equal(a, b)


def test_rmoe_starts_as_the_plain_router():
    """``O_m = 0`` at init: the recurrent part adds exactly zero, so routing (and logits) are plain top-k's."""
    batch = random_pairs_batch()
    out = []
    for balance in ("aux", "rmoe"):
        module, kind = tiny_bert()
        model = build_model("lora-moe", backbone_module=(module, kind), moe=MoEConfig(num_groups=2, balance=balance))
        with torch.no_grad():
            for m in moe_layers(model):  # the same non-zero experts in both (B starts at 0)
                m.lora_B.copy_(torch.linspace(-0.5, 0.5, m.lora_B.numel()).reshape(m.lora_B.shape))
            out.append(model.eval()(batch))
    assert torch.equal(out[0], out[1])
