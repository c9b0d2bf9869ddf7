"""LoRA-MoE on real and tiny backbones: exactness at init, routing overrides, statistics, checkpoints, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from routing_env.data import encode_pairs, load_task
from routing_env.moe import (
    MCModel,
    MoEConfig,
    RoutingPlan,
    build_model,
    combo_bias,
    load_backbone,
    load_checkpoint,
    moe_layers,
    primary_bias,
    save_checkpoint,
)
from tests.conftest import random_pairs_batch, random_prompt_batch, tiny_bert, tiny_llama


def _perturb(model: MCModel, seed: int = 0, scale: float = 0.3) -> None:
    """Random trainable weights, so experts differ and round trips are not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def minilm():
    return load_backbone("minilm")


@pytest.fixture(scope="module")
def arc_batch(minilm, data_dir):
    _, tokenizer, _ = minilm
    return encode_pairs(tokenizer, load_task("arc-easy", "dev", data_dir, limit=6))


def test_minilm_lora_moe_at_init_gives_the_backbone_logits_exactly(minilm, arc_batch):
    module, _, kind = minilm
    plain = MCModel(copy.deepcopy(module), kind).eval()
    torch.nn.init.normal_(plain.head.weight)  # a non-zero head, else every logit is 0 on both sides
    moe = build_model("lora-moe", backbone_module=(copy.deepcopy(module), kind)).eval()
    moe.head.load_state_dict(plain.head.state_dict())
    with torch.no_grad():
        expected, got = plain(arc_batch), moe(arc_batch)
    assert torch.isfinite(expected[arc_batch.choice_mask]).all() and expected[arc_batch.choice_mask].std() > 0
    # Bit for bit: same shapes through the same base kernels, and B = 0 experts add exact zeros.
    assert torch.equal(got, expected)


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
def test_both_backbone_kinds_init_exact_and_trainable(make):
    module, kind = make()
    batch = random_pairs_batch() if kind == "encoder" else random_prompt_batch()
    plain = MCModel(copy.deepcopy(module), kind).eval()
    if plain.head is not None:
        torch.nn.init.normal_(plain.head.weight)
    moe = build_model("lora-moe", backbone_module=(module, kind), moe=MoEConfig(num_groups=2)).eval()
    if moe.head is not None:
        moe.head.load_state_dict(plain.head.state_dict())
    with torch.no_grad():
        assert torch.equal(moe(batch), plain(batch))  # B = 0 experts add exact zeros to the same ops
    assert len(moe_layers(moe)) == 4 * (6 if kind == "encoder" else 7)  # q,k,v,o + 2 (BERT) / 3 (Llama) MLP linears
    moe.train()
    F.cross_entropy(moe(batch), batch.labels).backward()
    assert all(p.grad is not None for p in moe.parameters() if p.requires_grad)
    assert all(p.grad is None for p in moe.backbone.parameters() if not p.requires_grad)


def _routes(model: MCModel, batch, plan: RoutingPlan = RoutingPlan()) -> dict[str, torch.Tensor]:
    """Top-k expert ids ``[R, S, k]`` every MoE module chose in one forward, rows in batch order.

    Routed inside a forward hook, while the routing context still says which of the batch's rows
    the pass holds (the encoder runs rows length-sorted in chunks), then put back in batch order.
    """
    out, hooks, ctx = {}, [], model.routing

    def hook(mod, args, _):
        x = args[0]
        _, idx, _ = mod.route(x.reshape(-1, x.shape[-1]))
        idx = idx.reshape(x.shape[0], x.shape[1], -1)  # [r, S, k]
        state = ctx.state
        rows = state.row_index if state.row_index is not None else torch.arange(x.shape[0])
        full = out.setdefault(mod.name, torch.full((state.num_rows or x.shape[0], x.shape[1], idx.shape[-1]), -1))
        if full.shape[1] < idx.shape[1]:  # a later chunk is longer: widen (padding positions stay -1)
            full = out[mod.name] = torch.cat([full, full.new_full((full.shape[0], idx.shape[1] - full.shape[1], full.shape[2]), -1)], 1)
        full[rows, : idx.shape[1]] = idx

    for m in moe_layers(model):
        hooks.append(m.register_forward_hook(hook))
    with torch.no_grad(), model.routed(plan):
        model(batch)
    for h in hooks:
        h.remove()
    return out


@pytest.fixture
def routed_bert():
    module, kind = tiny_bert()
    model = build_model("lora-moe", backbone_module=(module, kind), moe=MoEConfig(num_groups=2, num_experts=4, top_k=2))
    _perturb(model)
    return model.eval()


def test_primary_override_forces_the_expert_in_its_group_and_nowhere_else(routed_bert):
    model = routed_bert
    batch = random_pairs_batch(B=2, C=3)
    rows = int(batch.choice_mask.sum())
    free = _routes(model, batch)
    forced_expert = 2
    primary = torch.full((rows,), forced_expert)
    primary[0] = -1  # row 0 keeps the learned routing
    forced = _routes(model, batch, RoutingPlan(selection_bias={1: primary_bias(primary, 4)}))
    for m in moe_layers(model):
        if m.group == 0:  # the group before the override: untouched
            assert torch.equal(forced[m.name], free[m.name])
        else:
            has = (forced[m.name] == forced_expert).any(-1)  # [R, S]
            assert has[1:].all(), f"{m.name}: forced expert missing from some token's top-k"
            assert torch.equal(forced[m.name][0], free[m.name][0])  # rows never see each other
    # The override must have changed something, or this test proves nothing.
    group1 = [m.name for m in moe_layers(model) if m.group == 1]
    assert not all((free[n][1:] == forced_expert).any(-1).all() for n in group1)


def test_combo_override_is_the_exact_top_k_set(routed_bert):
    model = routed_bert
    batch = random_pairs_batch(B=2, C=3)
    rows = int(batch.choice_mask.sum())
    combo = torch.zeros(rows, 4, dtype=torch.bool)
    combo[:, [0, 3]] = True
    routes = _routes(model, batch, RoutingPlan(selection_bias={0: combo_bias(combo)}))
    for m in moe_layers(model):
        if m.group == 0:
            assert torch.equal(routes[m.name].sort(-1).values, torch.tensor([0, 3]).expand_as(routes[m.name]))


def test_recorded_loads_count_every_real_token_k_times(routed_bert):
    model = routed_bert
    batch = random_pairs_batch()
    with torch.no_grad(), model.routed(RoutingPlan(record_loads=True, record_rows=True)) as rec:
        model(batch)
    real_tokens = int(batch.attention_mask[batch.choice_mask].sum())
    for m in moe_layers(model):
        assert rec.loads[m.name].sum().item() == real_tokens * m.top_k
    rows = batch.attention_mask[batch.choice_mask].sum(1).double()  # [R] real tokens of each real row
    for g in (0, 1):  # each row's counts: its real tokens times k, in every module of the group
        per_token = sum(m.top_k for m in moe_layers(model) if m.group == g)
        counted = rec.row_counts[g].double().sum(-1).sort().values  # rows in the forward's (length) order
        assert torch.equal(counted, (rows * per_token).sort().values)


@pytest.mark.parametrize("method", ["lora-moe", "lora"])
def test_save_load_round_trip_reproduces_logits(method, minilm, arc_batch, tmp_path):
    module, _, kind = minilm
    model = build_model(method, backbone_module=(copy.deepcopy(module), kind)).eval()
    _perturb(model, scale=0.05)
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt").eval()  # a fresh MiniLM from the package
    with torch.no_grad():
        assert torch.equal(loaded(arc_batch), model(arc_batch))  # same weights, shapes and ops: bit for bit


def test_lora_checkpoint_is_also_a_peft_adapter(minilm, tmp_path):
    """``--method lora`` checkpoints load with peft's own ``PeftModel.from_pretrained``, same LoRA weights."""
    from peft import PeftModel

    module, _, kind = minilm
    model = build_model("lora", backbone_module=(copy.deepcopy(module), kind)).eval()
    _perturb(model, scale=0.05)
    save_checkpoint(model, tmp_path / "ckpt")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(module), str(tmp_path / "ckpt" / "peft"))
    ours = {k: v for k, v in model.backbone.state_dict().items() if "lora_" in k}
    theirs = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert ours.keys() == theirs.keys() and len(ours) > 0
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_single_expert_moe_equals_peft_lora():
    """E=1, k=1 LoRA-MoE is plain LoRA: same weights must give the same logits as peft's implementation."""
    module, kind = tiny_bert()
    lora = build_model("lora", backbone_module=(copy.deepcopy(module), kind)).eval()
    moe = build_model("lora-moe", backbone_module=(module, kind), moe=MoEConfig(num_experts=1, top_k=1, num_groups=2)).eval()
    _perturb(lora, seed=4)
    moe.head.load_state_dict(lora.head.state_dict())
    peft_modules = dict(lora.backbone.named_modules())
    with torch.no_grad():
        for m in moe_layers(moe):
            p = peft_modules["base_model.model." + m.name]
            m.lora_A[0].copy_(p.lora_A["default"].weight)
            m.lora_B[0].copy_(p.lora_B["default"].weight)
    batch = random_pairs_batch()
    with torch.no_grad():
        # peft computes B(A(x)) with two Linear calls, the MoE op gathers per expert: another order of
        # float32 sums, so torch's float32 default tolerance (rtol 1.3e-6, atol 1e-5) on logits of size ~1.
        torch.testing.assert_close(moe(batch), lora(batch))


def test_short_training_lowers_the_loss():
    module, kind = tiny_bert()
    model = build_model("lora-moe", backbone_module=(module, kind), moe=MoEConfig(num_groups=2))
    batch = random_pairs_batch(B=4, seed=7)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(batch), batch.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bad_configurations_have_clear_errors():
    module, kind = tiny_bert()
    with pytest.raises(ValueError, match="top_k=3 is larger than the 2 experts"):
        build_model("lora-moe", backbone_module=(copy.deepcopy(module), kind), moe=MoEConfig(num_experts=2, top_k=3))
    with pytest.raises(ValueError, match="4 layers cannot be cut into 3 equal layer groups.*group_sizes=2,1,1"):
        build_model("lora-moe", backbone_module=(copy.deepcopy(module), kind), moe=MoEConfig(num_groups=3))
    with pytest.raises(ValueError, match="sum to the backbone's 4 layers"):
        build_model("lora-moe", backbone_module=(copy.deepcopy(module), kind), moe=MoEConfig(group_sizes=[2, 1]))
    with pytest.raises(ValueError, match="num_experts lists 2 values but the backbone has 4 layers"):
        build_model("lora-moe", backbone_module=(copy.deepcopy(module), kind), moe=MoEConfig(num_experts=[2, 4], num_groups=2))
    with pytest.raises(ValueError, match="matches no linear layer.*query"):
        build_model("lora-moe", backbone_module=(copy.deepcopy(module), kind), moe=MoEConfig(target_modules=["nope"], num_groups=2))
    with pytest.raises(ValueError, match="unknown method 'moe'; valid methods: lora, lora-moe"):
        build_model("moe", backbone_module=(copy.deepcopy(module), kind))


def test_mola_experts_per_layer_and_explicit_groups():
    module, kind = tiny_bert()
    model = build_model("lora-moe", backbone_module=(module, kind),
                        moe=MoEConfig(num_experts=[2, 4, 6, 8], top_k=2, group_sizes=[1, 3]))
    by_layer = {m.layer: (m.num_experts, m.group) for m in moe_layers(model)}
    assert by_layer == {0: (2, 0), 1: (4, 1), 2: (6, 1), 3: (8, 1)}
    with torch.no_grad():
        assert model(random_pairs_batch()).shape == (3, 4)


@pytest.mark.parametrize("top_k", [1, 2])
def test_the_router_learns_from_the_task_loss_at_top_1_too(top_k):
    """Before: gates renormalised over the chosen experts made a single expert's gate p / p = 1, so
    a top-1 router got no gradient from the task loss (only the balance loss moved it). Top-1 gates
    are the raw probability now (Switch); top-k > 1 gates still sum to 1."""
    module, kind = tiny_bert()
    model = build_model("lora-moe", backbone_module=(module, kind),
                        moe=MoEConfig(num_experts=4, top_k=top_k, num_groups=2))
    _perturb(model, seed=3)
    batch = random_pairs_batch(B=3, seed=5)
    F.cross_entropy(model(batch), batch.labels).backward()  # no balance loss: the task loss alone
    layers = moe_layers(model)
    assert all(m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0 for m in layers)
    x = torch.randn(7, layers[0].lora_A.shape[2], generator=torch.Generator().manual_seed(0))
    probs, idx, gates = layers[0].route(x)
    if top_k == 1:
        torch.testing.assert_close(gates, probs.gather(1, idx), rtol=0, atol=0)
    else:
        torch.testing.assert_close(gates.sum(-1), torch.ones(7))
