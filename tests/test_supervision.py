"""Stage 3: the routing loss, and a layermoe fine-tune moving a group's routing toward its targets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from routing_env.training import finetune
from routing_env.data import encode_pairs, load_task
from routing_env.moe import load_checkpoint
from routing_env.moe import RoutingPlan, model_fingerprint
from routing_env.training.supervision import TargetTable, group_agreement, routing_loss
from routing_env.targets import TargetsError, TargetsWriter, load_targets
from tests.tolerances import PROB_ATOL


def _group_probs(model, examples) -> torch.Tensor:  # [B, G, E]
    tok = model.tokenizer_for(model.backbone_name)
    with model.routed(RoutingPlan(collect_route=True)) as rec:
        model(encode_pairs(tok, examples))
    return rec.example_group_probs(len(examples))


def _header(model, G: int, E: int) -> dict:
    return {"env_id": "layermoe-arc", "task": "arc-easy", "split": "train", "fingerprint": model_fingerprint(model),
            "num_groups": G, "num_experts": E, "num_actions": E, "action_mode": "primary", "agent": "test",
            "agent_config": {}}


def test_group_probs_are_distributions_and_match_per_example_forwards(warm_checkpoint, data_dir):
    model = load_checkpoint(warm_checkpoint).eval()
    exs = load_task("arc-easy", "train", data_dir, limit=5)
    p = _group_probs(model, exs)
    assert p.shape == (5, 3, 4) and torch.allclose(p.sum(-1), torch.ones(5, 3), atol=1e-5)
    # Batching (padding, length-sorted chunks) does not change an example's group distribution,
    # up to float32 summation order (other shapes, other kernels).
    for b in (0, 3):
        torch.testing.assert_close(_group_probs(model, [exs[b]])[0], p[b], atol=PROB_ATOL, rtol=0)


def test_routing_loss_is_zero_at_the_targets_and_positive_elsewhere(warm_checkpoint, data_dir):
    model = load_checkpoint(warm_checkpoint)
    p = _group_probs(model, load_task("arc-easy", "train", data_dir, limit=4))
    w = torch.ones(4, 3)
    assert routing_loss(p, p.detach(), w).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.nn.functional.one_hot(p.detach().argmin(-1), 4).float()  # the least likely expert
    loss = routing_loss(p, other, w)
    assert loss.item() == pytest.approx(-torch.log(p.detach().min(-1).values).mean().item(), rel=1e-5)
    assert loss.item() > 1.0
    loss.backward()
    router = next(m for m in model.modules() if hasattr(m, "router")).router
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    # No targets, no loss; agreement is 1 at the targets.
    assert routing_loss(p, other, torch.zeros(4, 3)).item() == 0.0
    assert group_agreement(p.detach(), p.detach(), w).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.slow
def test_layermoe_finetune_moves_the_group_toward_a_one_expert_target(warm_checkpoint, data_dir, tmp_path):
    model = load_checkpoint(warm_checkpoint).eval()
    exs = load_task("arc-easy", "train", data_dir, limit=16)
    with torch.no_grad():
        before = _group_probs(model, exs)  # [16, 3, 4]
    e = int(before[:, 1].mean(0).argmin())  # the expert group 1 likes least
    writer = TargetsWriter(tmp_path / "t.jsonl", _header(model, 3, 4))
    recs = []
    for b, ex in enumerate(exs):
        t = before[b].numpy().astype(float)
        t = t / t.sum(-1, keepdims=True)
        t[1] = np.eye(4)[e]  # only group 1 is asked to change
        recs.append({"example": b, "id": ex.id, "targets": t, "values": np.full((3, 4), np.nan), "path": [0, e, 0]})
    writer.write(recs)

    res = finetune.main(finetune.Config(task="arc-easy", method="layermoe", init_checkpoint=str(warm_checkpoint),
                                        targets=str(tmp_path / "t.jsonl"), beta=5.0, epochs=1, train_limit=16,
                                        eval_limit=8, batch_size=8, lr=3e-3, data_dir=str(data_dir),
                                        logdir=str(tmp_path), name="l"))
    assert res["targets_coverage"] == 1.0
    after_model = load_checkpoint(tmp_path / "l" / "final").eval()
    with torch.no_grad():
        after = _group_probs(after_model, exs)
    assert after[:, 1, e].mean() > before[:, 1, e].mean() + 0.05
    # Groups whose targets were the router's own distribution moved much less.
    assert (after[:, 1, e] - before[:, 1, e]).mean() > 3 * (after[:, 0] - before[:, 0]).abs().max(-1).values.mean()


def test_layermoe_refuses_targets_from_another_model(warm_checkpoint, data_dir, tmp_path):
    model = load_checkpoint(warm_checkpoint)
    TargetsWriter(tmp_path / "t.jsonl", _header(model, 3, 4) | {"fingerprint": "deadbeef"})
    cfg = finetune.Config(task="arc-easy", method="layermoe", init_checkpoint=str(warm_checkpoint),
                          targets=str(tmp_path / "t.jsonl"), train_limit=8, data_dir=str(data_dir), logdir=str(tmp_path))
    with pytest.raises(TargetsError, match="fingerprint: file has 'deadbeef'"):
        finetune.main(cfg)
    with pytest.raises(ValueError, match="needs --init-checkpoint"):
        finetune.main(finetune.Config(task="arc-easy", method="layermoe", train_limit=8, data_dir=str(data_dir),
                                      logdir=str(tmp_path)))
    with pytest.raises(ValueError, match="unknown routing-loss weighting"):
        TargetTable(load_targets(tmp_path / "t.jsonl"), {}, "loudest")


@pytest.mark.parametrize("kind", ["encoder", "causal"])
def test_group_probs_on_both_backbone_kinds(kind):
    """Per-example group distributions: independent of batching, padding and chunking; with gradient."""
    from routing_env.data import MCBatch
    from routing_env.moe import MoEConfig, build_model
    from tests.conftest import random_pairs_batch, random_prompt_batch, tiny_bert, tiny_llama

    module, k = (tiny_bert if kind == "encoder" else tiny_llama)()
    model = build_model("lora-moe", backbone_module=(module, k), moe=MoEConfig(num_groups=2, num_experts=3)).eval()
    model.chunk_rows = 4  # several chunks per batch on the encoder
    batch = random_pairs_batch(B=3) if kind == "encoder" else random_prompt_batch(B=3)
    with model.routed(RoutingPlan(collect_route=True)) as rec:
        model(batch)
    p = rec.example_group_probs(3)
    assert p.shape == (3, 2, 3) and torch.allclose(p.sum(-1), torch.ones(3, 2), atol=1e-5)
    routing_loss(p, torch.full_like(p, 1 / 3).roll(1, 0), torch.ones(3, 2)).backward()
    assert all(m.router.weight.grad is not None for m in model.modules() if hasattr(m, "router"))
    for b in range(3):
        one = MCBatch(**{f: (v[b : b + 1] if isinstance(v, torch.Tensor) else v[b : b + 1] if isinstance(v, list) else v)
                         for f, v in vars(batch).items()})
        with model.routed(RoutingPlan(collect_route=True)) as rec:
            model(one)
        # One row group vs the chunked batch: other shapes, so a float32 tolerance.
        torch.testing.assert_close(rec.example_group_probs(1)[0], p[b].detach(), atol=PROB_ATOL, rtol=0)


def _one_hot_targets(model, exs, path: Path, expert: int) -> None:
    writer = TargetsWriter(path, _header(model, 3, 4))
    writer.write({"example": b, "id": ex.id, "targets": np.tile(np.eye(4)[expert], (3, 1)),
                  "values": np.full((3, 4), np.nan), "path": [expert] * 3} for b, ex in enumerate(exs))


@pytest.mark.slow
def test_paired_layermoe_with_beta_zero_is_the_lora_moe_run_bit_for_bit(data_dir, tmp_path):
    """Stage 3 continues a lora-moe run's epoch checkpoint (optimiser, schedule, RNG): beta 0 is that run.

    Bit for bit: the same ops on the same shapes in one process; the routing loss enters as 0 * loss,
    whose gradient is exactly zero. With beta > 0 the adapters differ, so the test can fail.
    """
    from safetensors.torch import load_file

    base = dict(task="arc-easy", epochs=2, train_limit=24, eval_limit=4, batch_size=8, lr=3e-3,
                data_dir=str(data_dir), logdir=str(tmp_path), eval_test=False)
    finetune.main(finetune.Config(method="lora-moe", name="moe", **base))
    warm = tmp_path / "moe" / "checkpoints" / "epoch_1"
    model = load_checkpoint(warm)
    _one_hot_targets(model, load_task("arc-easy", "train", data_dir, limit=24), tmp_path / "t.jsonl", expert=3)
    finals, curves = {}, {}
    for beta, forcing in ((0.0, 0.0), (2.0, 0.0), (0.0, 1.0)):
        name = f"b{beta}-tf{forcing}"
        res = finetune.main(finetune.Config(method="layermoe", init_checkpoint=str(warm), targets=str(tmp_path / "t.jsonl"),
                                            beta=beta, teacher_forcing=forcing, name=name, **base))
        assert [h["epoch"] for h in res["history"]] == [1, 2]  # epoch 1 is the lora-moe run's own
        curves[beta, forcing] = res["history"][-1]["train"]  # stage 3's epoch: its training curve in the record
        finals[beta, forcing] = load_file(tmp_path / name / "final" / "adapter.safetensors")
    assert all(np.isfinite(c["task_loss"]) and 0 <= c["route_agreement"] <= 1 for c in curves.values())
    # The routing loss pulls the routers toward the targets (expert 3 everywhere): lower than without it.
    assert curves[2.0, 0.0]["route_loss"] < curves[0.0, 0.0]["route_loss"]
    reference = load_file(tmp_path / "moe" / "final" / "adapter.safetensors")
    assert reference.keys() == finals[0.0, 0.0].keys()
    assert all(torch.equal(reference[k], finals[0.0, 0.0][k]) for k in reference)
    # The routing loss, and alone the teacher-forced route, each change the result.
    for other in ((2.0, 0.0), (0.0, 1.0)):
        assert not all(torch.equal(reference[k], finals[other][k]) for k in reference)
    # A continuation with other training settings is refused, naming them.
    with pytest.raises(ValueError, match="differing: lr: 0.003 there, 0.001 here"):
        finetune.main(finetune.Config(method="layermoe", init_checkpoint=str(warm), targets=str(tmp_path / "t.jsonl"),
                                      name="bad", **(base | {"lr": 1e-3})))
    # ... before anything is written: no config.json that would refuse the corrected command later.
    assert not (tmp_path / "bad" / "config.json").exists()


def test_sinkhorn_targets_are_balanced_and_keep_the_questions_relative_preferences():
    from routing_env.targets import balance_targets

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1, (40, 4))
    logits[:, 2] += 2.0  # expert 2 is every question's favourite: a skewed target histogram
    t = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    b = balance_targets(t)
    np.testing.assert_allclose(b.sum(1), 1.0, atol=1e-9)
    np.testing.assert_allclose(b.sum(0), 10.0, atol=1e-6)
    assert t.mean(0)[2] > 0.5 and b.mean(0)[2] == pytest.approx(0.25, abs=1e-6)
    # Column scaling is shared by all questions: ranking questions by how much they prefer
    # expert 2 over expert 0 is unchanged.
    ts = t + 1e-3
    assert (np.argsort(b[:, 2] / b[:, 0]) == np.argsort(ts[:, 2] / ts[:, 0])).all()


def test_target_forms_from_process_values():
    from routing_env.targets import target_form

    rec = {"id": "q", "targets": np.full((2, 3), 1 / 3), "values": np.array([[-1.0, -0.5, np.nan], [-2.0, -2.0 + np.log(2), -3.0]])}
    assert target_form(rec, "file", 1.0) is rec["targets"]
    assert target_form(rec, "onehot", 1.0).tolist() == [[0, 1, 0], [0, 1, 0]]
    soft = target_form(rec, "softmax", 1.0)
    assert soft[0, 2] == 0.0 and soft[0, 1] / soft[0, 0] == pytest.approx(np.exp(0.5))  # unestimated: no mass
    assert soft[1, 1] / soft[1, 0] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="needs process values.*--target-form file"):
        target_form({"id": "r", "targets": rec["targets"], "values": np.full((2, 3), np.nan)}, "softmax", 1.0)


def test_teacher_forced_route_reaches_every_token_of_the_forced_rows_through_chunks():
    from routing_env.moe import MoEConfig, build_model, moe_layers
    from routing_env.training.supervision import forced_route_bias
    from tests.conftest import random_pairs_batch, tiny_bert

    module, kind = tiny_bert()
    model = build_model("lora-moe", backbone_module=(module, kind), moe=MoEConfig(num_groups=2, num_experts=4)).eval()
    model.chunk_rows = 2  # the batch's rows go through in several chunks
    ctx = model.routing
    seen = []  # (group, rows of the batch, real-token mask, chosen experts [r, S, k], unforced choice)

    def hook(mod, args, out):
        x = args[0]
        chosen = mod.route(x.reshape(-1, x.shape[-1]))[1].reshape(x.shape[0], x.shape[1], -1)
        with ctx.routed(RoutingPlan()):  # a nested plan: the learned router alone, same pass
            free = mod.route(x.reshape(-1, x.shape[-1]))[1].reshape(x.shape[0], x.shape[1], -1)
        seen.append((mod.group, ctx.state.row_index.clone(), ctx.state.token_mask.clone(), chosen, free))

    for m in moe_layers(model):
        m.register_forward_hook(hook)
    batch = random_pairs_batch(B=3, C=4)
    paths = torch.tensor([[3, 3], [-1, -1], [0, 3]])  # example 1 free; example 2 forced to 0, then 3
    B, C = batch.choice_mask.shape
    row_example = torch.arange(B * C)[batch.choice_mask.reshape(-1)] // C  # [R]
    with torch.no_grad(), model.routed(RoutingPlan(selection_bias=forced_route_bias(paths, row_example, 4))):
        model(batch)
    assert len({tuple(r.tolist()) for _, r, *_ in seen}) > 1  # really chunked
    for g, rows, mask, chosen, free in seen:
        want = paths[row_example[rows], g]  # [r] forced expert per row of this chunk, -1 = free
        has = (chosen == want.clamp_min(0)[:, None, None]).any(-1)  # [r, S]
        assert has[want >= 0][mask[want >= 0]].all()  # every real token of a forced row has its expert
        assert torch.equal(chosen[want < 0], free[want < 0])  # free rows route as the router alone
    assert any(not (f == 3).any(-1)[m].all() for g, r, m, c, f in seen)  # the router alone would not pick 3


def test_per_token_granularity_averages_the_tokens_log_probabilities():
    from routing_env.moe import MoEConfig, build_model, moe_layers
    from tests.conftest import random_pairs_batch, tiny_bert

    module, kind = tiny_bert()
    model = build_model("lora-moe", backbone_module=(module, kind), moe=MoEConfig(num_groups=2, num_experts=3)).eval()
    ctx = model.routing
    logs = []  # group 0's per-token log probabilities of real tokens, every module

    def hook(mod, args, out):
        if mod.group == 0:
            x = args[0]
            logp = torch.log(mod.route(x.reshape(-1, x.shape[-1]))[0]).reshape(x.shape[0], x.shape[1], -1)
            logs.append(logp[ctx.state.token_mask])  # [tokens, E]

    for m in moe_layers(model):
        m.register_forward_hook(hook)
    batch = random_pairs_batch(B=1, C=3)
    with torch.no_grad(), model.routed(RoutingPlan(collect_route=True)) as rec:
        model(batch)
    expected = torch.cat(logs).mean(0)  # every (module, real token) pair weighs the same
    torch.testing.assert_close(rec.example_group_probs(1, log=True)[0, 0], expected, rtol=1e-5, atol=1e-6)
    # Jensen: the per-token loss is never below the group-averaged one, and is above it here.
    p, lp = rec.example_group_probs(1), rec.example_group_probs(1, log=True)
    t, w = torch.full_like(p, 1 / 3).roll(1, -1), torch.ones(1, 2)
    assert routing_loss(p, t, w, lp) > routing_loss(p, t, w) + 1e-4


def test_route_loss_grad_router_trains_the_routers_alone_with_the_same_probabilities():
    """--route-loss-grad router: the routing loss reaches every router's weights and no adapter; the
    probabilities it sees are the forward's bit for bit (same ops, same shapes); 'all' reaches the adapters."""
    from routing_env.moe import MoEConfig, build_model
    from tests.conftest import random_pairs_batch, tiny_bert

    torch.manual_seed(0)
    model = build_model("lora-moe", backbone_module=tiny_bert(), moe=MoEConfig(num_groups=2, num_experts=3)).eval()
    with torch.no_grad():  # B starts at 0; nonzero adapters so the hidden states depend on them
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    batch = random_pairs_batch(B=3)
    grads, probs = {}, {}
    for mode in ("all", "router"):
        model.zero_grad(set_to_none=True)
        with model.routed(RoutingPlan(collect_route=True, route_grad_router_only=mode == "router")) as rec:
            model(batch)
        p = rec.example_group_probs(3)
        probs[mode] = p.detach()
        routing_loss(p, torch.eye(3)[[0, 1, 2]][:, None, :].expand(3, 2, 3), torch.ones(3, 2)).backward()
        grads[mode] = {n: (q.grad is not None and bool(q.grad.abs().sum() > 0)) for n, q in model.named_parameters()
                       if q.requires_grad}
    # Under bf16 autocast too (the statistics run with autocast off on bf16 hidden states).
    model.zero_grad(set_to_none=True)
    plan = RoutingPlan(collect_route=True, route_grad_router_only=True)
    with model.routed(plan) as rec, torch.autocast("cpu", dtype=torch.bfloat16):
        model(batch)
    routing_loss(rec.example_group_probs(3), torch.full((3, 2, 3), 1 / 3).roll(1, 0), torch.ones(3, 2)).backward()
    assert all(m.router.weight.grad is not None for m in model.modules() if hasattr(m, "router"))
    adapters = [n for n in grads["all"] if "lora_" in n]
    routers = [n for n in grads["all"] if "router" in n]
    assert adapters and routers
    assert torch.equal(probs["all"], probs["router"])
    assert any(grads["all"][n] for n in adapters)  # the default reshapes the adapters below the routers
    assert not any(grads["router"][n] for n in adapters)
    assert all(grads["router"][n] for n in routers)
