"""Balancing strategies: each one's defining property, the combination rules, and the model around them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from routing_env.moe import MoEConfig, build_model, load_checkpoint, moe_layers, save_checkpoint
from routing_env.moe.balancing import STRATEGIES, make_strategy, sinkhorn_plan, topk_mask
from routing_env.moe.kernels import lora_moe_naive
from routing_env.moe.routing import RoutingContext, load_stats
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
        st.update(layer, logits, probs, chosen, torch.ones(logits.shape[0]))
    assert cvs[0] > 0.3 and np.mean(cvs[-20:]) < 0.1  # measured: 0.5 -> ~0.03
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
    ctx = model.routing
    ctx.compute_aux = True
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        ctx.reset_records()
        loss = torch.nn.functional.cross_entropy(model(batch), batch.labels)
        extra = ctx.aux_losses + ctx.balance_losses
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
    from routing_env import finetune

    with pytest.raises(ValueError, match="valid: aux, z-loss, loss-free, top-p, sinkhorn"):
        finetune.check_config(finetune.Config(balance="switch"))
