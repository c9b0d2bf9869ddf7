"""The evaluation forward replayed from CUDA graphs (``routing_env.training.graphs``).

On a CPU the same bookkeeping runs without capture: bucketed widths, the loads returned by the
forward instead of recorded in Python. The results must be evaluate's own; on a GPU, the replayed
graphs' too (marked ``gpu``).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from routing_env.data import load_task
from routing_env.moe import MoEConfig, build_model
from routing_env.moe.kernels.backend import fused_everywhere
from routing_env.training.evaluation import encode_split, evaluate
from routing_env.training.graphs import BUCKET, GraphedForward


@pytest.fixture(scope="module")
def minilm():
    model = build_model("lora-moe", "minilm", MoEConfig(), seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking adapters: a wrong expert or load would show
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    model.one_pass = True
    return model


def _same(a, b, exact_loads: bool = True):
    assert a.n == b.n and a.ids == b.ids and a.labels == b.labels and a.predictions == b.predictions
    assert abs(a.loss - b.loss) < 1e-5
    for ra, rb in zip(a.logp, b.logp):
        assert all(abs(x - y) < 1e-4 for x, y in zip(ra, rb))
    assert a.layer_stats.keys() == b.layer_stats.keys()
    for layer in a.layer_stats:
        if exact_loads:
            assert a.layer_stats[layer].loads == b.layer_stats[layer].loads
        else:
            assert max(abs(x - y) for x, y in zip(a.layer_stats[layer].loads, b.layer_stats[layer].loads)) < 1e-3


@pytest.mark.parametrize("fused", [False, True])
def test_graph_bookkeeping_gives_evaluates_results(minilm, data_dir, fused):
    """Widths rounded up to the bucket (padding only), loads summed from the forwards' outputs."""
    tok = minilm.tokenizer_for("minilm")
    examples = load_task("arc-easy", "dev", data_dir, limit=20)
    with fused_everywhere() if fused else contextlib.nullcontext():
        plain = evaluate(minilm, tok, examples, batch_size=8, progress=False, graphs=False)
        graphed = evaluate(minilm, tok, examples, batch_size=8, progress=False, graphs=True)
    _same(plain, graphed)


def test_one_pass_evaluation_batches_by_length_and_answers_in_the_splits_order(minilm, data_dir):
    """The one-pass forward (a GPU's) evaluates length-sorted batches; every per-question result comes back
    where the split has it, as the row-by-row forward (no sorting) gives them."""
    tok = minilm.tokenizer_for("minilm")
    examples = load_task("arc-easy", "dev", data_dir, limit=24)
    split = encode_split(minilm, tok, examples, 128)
    assert (split.lengths[:-1] > split.lengths[1:]).any()  # not already sorted: the order matters
    sorted_pass = evaluate(minilm, tok, split, batch_size=8, progress=False, graphs=False)
    minilm.one_pass = False
    try:
        rows = evaluate(minilm, tok, split, batch_size=8, progress=False, graphs=False)
    finally:
        minilm.one_pass = True
    assert sorted_pass.ids == [ex.id for ex in examples]
    _same(rows, sorted_pass)


def test_bucketed_batches_are_padding_wider(minilm, data_dir):
    split = encode_split(minilm, minilm.tokenizer_for("minilm"), load_task("arc-easy", "dev", data_dir, limit=8), 128)
    exact, wide = split.batch(range(8)), split.batch(range(8), width_multiple=BUCKET)
    T = exact.input_ids.shape[-1]
    assert wide.input_ids.shape[-1] == min(-(-T // BUCKET) * BUCKET, split.width) >= T
    assert torch.equal(wide.input_ids[..., :T], exact.input_ids) and not wide.attention_mask[..., T:].any()


def test_forward_returns_loads_per_module_as_a_tensor(minilm, data_dir):
    split = encode_split(minilm, minilm.tokenizer_for("minilm"), load_task("arc-easy", "dev", data_dir, limit=4), 128)
    batch = split.batch(range(4))
    with torch.no_grad():
        logits, loads = GraphedForward(minilm, capture=False)(batch)
    real_tokens = int((batch.attention_mask * batch.choice_mask[..., None]).sum())
    assert loads.shape == (36, 4) and loads.dtype == torch.float64
    assert (loads.sum(1) == 2 * real_tokens).all()  # every real token counted top_k times in every module


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_replayed_graphs_give_the_eager_evaluation(minilm, data_dir):
    model = minilm.cuda()
    tok = model.tokenizer_for("minilm")
    examples = load_task("arc-easy", "dev", data_dir, limit=100)
    eager = evaluate(model, tok, examples, batch_size=16, device="cuda", progress=False, graphs=False)
    for _ in range(2):  # the second call replays the graphs captured by the first
        graphed = evaluate(model, tok, examples, batch_size=16, device="cuda", progress=False, graphs=True)
        _same(eager, graphed)


@pytest.mark.slow
def test_compiled_training_step_trains_as_the_eager_one(tmp_path, data_dir):
    """``finetune --compile trace``: forward and backward traced by dynamo and AOTAutograd (what inductor and
    the CUDA-graph mode compile) with bucketed widths, run with the eager kernels: the same training (two
    steps move the dev loss by ~3e-3 here, so a lost or different update fails the 1e-4 tolerance)."""
    from routing_env.training import finetune

    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    results = {}
    for mode in ("none", "trace"):
        cfg = finetune.Config(task="arc-easy", data_dir=str(data_dir), train_limit=8, eval_limit=4, epochs=1,
                              batch_size=4, eval_test=False, logdir=str(tmp_path / mode), compile=mode, seed=0)
        results[mode] = finetune.main(cfg)
    assert counters["stats"]["unique_graphs"] > 0  # the traced run went through dynamo
    eager, traced = results["none"]["history"][0], results["trace"]["history"][0]
    # Other float summation orders (bucketed widths, traced decompositions); a different update would move
    # these by far more.
    assert abs(eager["train"]["task_loss"] - traced["train"]["task_loss"]) < 1e-4
    assert abs(eager["dev"]["loss"] - traced["dev"]["loss"]) < 1e-4 and eager["dev"]["accuracy"] == traced["dev"]["accuracy"]


def test_unknown_compile_mode_is_refused_naming_the_choices(data_dir):
    from routing_env.training import finetune

    with pytest.raises(ValueError, match="unknown --compile 'fast'; valid: none, default, graphs, trace"):
        finetune.check_config(finetune.Config(task="arc-easy", data_dir=str(data_dir), compile="fast"))
