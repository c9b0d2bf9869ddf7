"""bf16 autocast (``--precision``): close to fp32, statistics still exact, fp32 left untouched."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch

from routing_env.training.evaluation import evaluate
from routing_env.moe import MoEConfig, RoutingPlan, build_model
from routing_env.common.utils import autocast, autocast_dtype
from tests.conftest import random_pairs_batch, tiny_bert


def test_precision_names_and_the_auto_rule():
    assert autocast_dtype("auto", "cpu") is None and autocast_dtype("fp32", "cpu") is None
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="valid: auto, fp32, bf16"):
        autocast_dtype("fp16", "cpu")


def _model():
    """Random adapters small enough that bf16 rounding moves few routing choices (large ones make the
    tiny model chaotic: a flipped expert times adapter weights far above the backbone's)."""
    model = build_model("lora-moe", backbone_module=tiny_bert(), moe=MoEConfig(num_groups=2, rank=2), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.03)
    return model


@pytest.mark.parametrize("one_pass", [False, True])
def test_bf16_forward_is_close_and_counts_stay_exact(one_pass):
    model = _model()
    model.one_pass = one_pass
    batch = random_pairs_batch(B=4)
    real = batch.choice_mask
    with torch.no_grad():
        fp32 = model(batch)
        with model.routed(RoutingPlan(record_loads=True)) as rec, autocast("cpu", torch.bfloat16):
            bf16 = model(batch)
    assert bf16.dtype == torch.float32 and torch.equal(torch.isinf(bf16), ~real)
    # bf16 keeps 8 bits of mantissa: relative error ~2^-8 per op, a few ops deep here (logits ~0.1).
    torch.testing.assert_close(bf16[real], fp32[real], rtol=0.05, atol=0.01)
    assert not torch.equal(bf16[real], fp32[real])  # it did run in bf16
    tokens = int((batch.attention_mask * real[..., None]).sum())
    for counts in rec.loads.values():  # counted in fp32/fp64 even under autocast: exact integers
        assert counts.dtype == torch.float64 and float(counts.sum()) == tokens * 2


def test_bf16_env_is_close_to_fp32(distinct_checkpoint, data_dir):
    envs = [gym.make("layermoe-arc", checkpoint=distinct_checkpoint, max_examples=4, data_dir=data_dir,
                     precision=p).unwrapped for p in ("fp32", "bf16")]
    paths = [(0, 1, 2), (3, 3, 0)]
    fp32, bf16 = (e.evaluate_paths([1, 2], paths) for e in envs)
    assert envs[1].stepper.amp_dtype is torch.bfloat16 and envs[0].stepper.amp_dtype is None
    assert 0 < abs(bf16["outcome"] - fp32["outcome"]).max() < 0.1  # log p of the right answer
    hidden = envs[1]._boundary(1, (0,)).hidden
    assert hidden.dtype == torch.float32  # the prefix cache holds fp32 whatever the autocast


def test_evaluate_under_bf16_is_close_to_fp32(data_dir):
    from routing_env.data import load_task

    model = build_model("lora-moe", "minilm", MoEConfig(), seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    tokenizer = model.tokenizer_for("minilm")
    examples = load_task("arc-easy", "dev", data_dir, limit=8)
    res = [evaluate(model, tokenizer, examples, batch_size=4, progress=False, amp_dtype=d) for d in (None, torch.bfloat16)]
    assert res[0].n == res[1].n == 8 and res[1].layer_stats.keys() == res[0].layer_stats.keys()
    assert 0 < abs(res[1].loss - res[0].loss) < 0.05  # bf16 did run, and stays close
