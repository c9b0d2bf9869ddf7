"""The fixed-shape forward a GPU runs: same model as the chunked CPU forward, no host sync, no graph break."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from routing_env.training.evaluation import evaluate, layer_load_stats
from routing_env.moe import MoEConfig, RoutingPlan, build_model, moe_layers
from routing_env.common.opcount import OpCounter
from tests.conftest import random_pairs_batch, tiny_moe_with_distinct_experts

# rank 2: E * r * 4 = 32 <= d = 32, so every module takes the low-rank form MiniLM's modules take
# (384-wide, 4 experts of rank 8); the grouped form runs the Triton kernel on a GPU.
MINILM_LIKE = MoEConfig(num_groups=2, rank=2)


def _model(one_pass: bool, seed: int = 0):
    model = tiny_moe_with_distinct_experts(MINILM_LIKE, seed)
    model.one_pass = one_pass
    return model.eval()


def test_one_pass_forward_equals_the_chunked_forward():
    chunked, one = _model(False), _model(True)
    chunked.chunk_rows = 2  # several chunks, each cut to its own length
    batch = random_pairs_batch(B=4, C=4, T=9)
    with torch.no_grad():
        with chunked.routed(RoutingPlan(record_loads=True)) as rec_chunked:
            a = chunked(batch)
        with one.routed(RoutingPlan(record_loads=True)) as rec_one:
            b = one(batch)
    real = batch.choice_mask
    assert torch.equal(torch.isinf(a), ~real) and torch.equal(torch.isinf(b), ~real)
    # Other shapes (padded to the batch's longest row instead of each chunk's), so other float
    # summation orders: a float32 tolerance, far below what one changed expert moves (~1e-1 here).
    torch.testing.assert_close(b[real], a[real], rtol=1e-5, atol=1e-5)
    # The padded choice slot is encoded but not counted: the loads are those of the real rows.
    for name, counts in rec_chunked.loads.items():
        torch.testing.assert_close(rec_one.loads[name], counts, rtol=0, atol=0)


def test_one_pass_forward_and_backward_issue_no_sync_op():
    model = _model(True)
    batch = random_pairs_batch()
    with torch.no_grad(), model.routed(RoutingPlan(record_loads=True)), OpCounter() as ops:  # evaluation's loads
        model(batch)
    assert ops.syncs == {} and ops.total > 0
    model.train()
    with OpCounter() as ops:  # training: aux loss and the stage-3 routing statistics
        with model.routed(RoutingPlan(compute_aux=True, collect_route=True)) as rec:
            logits = model(batch)
        probs = rec.example_group_probs(len(batch.ids))  # [B, G, E]
        loss = F.cross_entropy(logits, batch.labels) + torch.stack(rec.aux_losses).mean() + probs.square().mean()
        loss.backward()
    assert ops.syncs == {}, ops.syncs


def test_loads_stay_on_the_device_until_read():
    model = _model(True)
    with torch.no_grad(), model.routed(RoutingPlan(record_loads=True)) as rec:
        model(random_pairs_batch(seed=0))
        model(random_pairs_batch(seed=1))
    counts = rec.loads
    assert counts and all(c.dtype == torch.float64 for c in counts.values())
    # Every real token of the two batches is counted k times per module.
    tokens = sum(int((b.attention_mask * b.choice_mask[..., None]).sum()) for b in (random_pairs_batch(seed=0),
                                                                                    random_pairs_batch(seed=1)))
    assert all(float(c.sum()) == tokens * MINILM_LIKE.top_k for c in counts.values())
    assert set(layer_load_stats(model, rec)) == set(range(4))


@pytest.mark.parametrize("grad", [True, False])
def test_moe_layer_compiles_without_graph_breaks(grad):
    model = _model(True)
    model.train(grad)
    layer = moe_layers(model)[0]
    x = torch.randn(3, 7, layer.base.in_features)
    torch._dynamo.reset()
    with torch.set_grad_enabled(grad), model.routed(RoutingPlan(record_loads=True, compute_aux=True)):
        model.routing.begin_pass(token_mask=torch.ones(3, 7, dtype=torch.bool))
        explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_whole_one_pass_model_compiles_without_graph_breaks():
    model = _model(True)
    torch._dynamo.reset()
    with torch.no_grad(), model.routed(RoutingPlan(record_loads=True)):
        explained = torch._dynamo.explain(model)(random_pairs_batch())
    assert explained.graph_break_count == 0, explained.break_reasons


def test_compiled_model_gives_the_eager_logits():
    model = _model(True)
    batch = random_pairs_batch()
    with torch.no_grad():
        eager = model(batch)
        torch._dynamo.reset()
        compiled = torch.compile(copy.deepcopy(model), backend="eager", fullgraph=True)(batch)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)  # the eager backend runs the same kernels


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_eval_forward_does_not_synchronise(data_dir):
    from routing_env.data import load_task

    model = build_model("lora-moe", "minilm", MoEConfig(), seed=0).cuda().eval()
    tokenizer = model.tokenizer_for("minilm")
    examples = load_task("arc-easy", "dev", data_dir, limit=64)
    from routing_env.training.evaluation import batch_encoder

    batch = batch_encoder(model, tokenizer, 128)(examples).to("cuda")
    with torch.no_grad(), model.routed(RoutingPlan(record_loads=True)):
        model(batch)  # warm-up (caches, lazy init)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    res = evaluate(model, tokenizer, examples, batch_size=64, device="cuda", progress=False)
    assert res.n == 64 and res.layer_stats
