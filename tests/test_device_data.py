"""Data on the device: a split tokenised once and cut into exactly ``encode``'s batches, batches moved
without blocking, an evaluation loop without a tokenizer, and a training step without a host sync."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from routing_env.common.distributed import DistContext
from routing_env.common.opcount import OpCounter
from routing_env.data import EncodedSplit, MCBatch, load_task, pad_token_id
from routing_env.moe import MoEConfig, build_model
from routing_env.training import finetune
from routing_env.training.evaluation import encode_split, evaluate, iterate_batches, iterate_indices
from routing_env.training.step import guarded_update, load_optimizer_state, make_adamw

from tests.conftest import save_tiny_decoder


def assert_same_batch(got: MCBatch, want: MCBatch) -> None:
    for f in fields(MCBatch):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f.name
        else:
            assert a == b, f.name


def check_split_cuts_like_encode(kind: Any, tokenizer: Any, examples: list, max_length: int) -> EncodedSplit:
    """Random and consecutive batches of the split, each ``torch.equal`` to ``kind.encode`` of its examples."""
    split = EncodedSplit.build(lambda exs: kind.encode(tokenizer, exs, max_length), examples,
                               pad_id=pad_token_id(tokenizer), chunk_size=37)  # several chunks, of differing widths
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(examples), size=int(rng.integers(1, 9)), replace=False) for _ in range(40)]
    batches += [np.array([i]) for i in range(5)] + [range(0, 8), range(8, len(examples))]
    widths = set()
    for idx in batches:
        want = kind.encode(tokenizer, [examples[i] for i in idx], max_length)
        got = split.batch(idx)
        assert_same_batch(got, want)
        widths.add((got.choice_mask.shape[1], got.input_ids.shape[-1]))
    assert len(widths) >= 4  # batches of different widths and choice counts were cut
    return split


@pytest.fixture(scope="module")
def minilm():
    model = build_model("lora-moe", "minilm", MoEConfig(), seed=0)
    return model, model.tokenizer_for("minilm")


@pytest.fixture(scope="module")
def arc(data_dir) -> list:
    exs = load_task("arc-easy", "train", data_dir, limit=1000)
    assert {len(e.choices) for e in exs} == {3, 4, 5}
    return exs


@pytest.mark.parametrize("max_length", [128, 24])  # 24: the questions are truncated
def test_encoder_split_batches_are_encode_pairs_batches(minilm, arc, max_length):
    model, tok = minilm
    split = check_split_cuts_like_encode(model.backbone_kind, tok, arc, max_length)
    assert split.side == "right" and split.stored["input_ids"].dtype == torch.int32  # stored narrow, cut back to long


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("max_length", [512, 72])  # 72: about half the prompts cut from the left
def test_letter_prompt_split_batches_are_encode_batches(tmp_path_factory, bpe_tokenizer, arc, family, max_length):
    folder = save_tiny_decoder(family, tmp_path_factory.mktemp(family), bpe_tokenizer, layers=1)
    model = build_model("lora-moe", str(folder), MoEConfig(num_groups=1), seed=0)
    split = check_split_cuts_like_encode(model.backbone_kind, model.tokenizer_for(str(folder)), arc, max_length)
    assert split.side == "left"  # left padded: the cut keeps the last columns


class CopyRecorder(TorchDispatchMode):
    """The ``_to_copy`` / ``copy_`` calls and the ``non_blocking`` each was given."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[tuple[str, bool]] = []
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.ops += 1
        name = func._schema.name.split("::")[-1]
        if name in ("_to_copy", "copy_"):
            self.copies.append((name, bool((kwargs or {}).get("non_blocking", False))))
        return func(*args, **(kwargs or {}))


def test_batch_to_copies_without_blocking_and_keeps_what_is_there(minilm, arc):
    """On a CPU this checks what reaches the dispatcher: each tensor field is one ``_to_copy`` that asks
    for ``non_blocking`` (to ``meta``, which stands for a device here), and a batch already on the
    target device is returned without any op. Pinning is only checked where there is a GPU."""
    model, tok = minilm
    batch = model.backbone_kind.encode(tok, arc[:4], 128)
    n_tensors = sum(isinstance(getattr(batch, f.name), torch.Tensor) for f in fields(MCBatch))
    with CopyRecorder() as rec:
        moved = batch.to("meta")
    assert rec.copies == [("_to_copy", True)] * n_tensors and moved.input_ids.device.type == "meta"
    with CopyRecorder() as rec:
        same = batch.to("cpu")
    assert rec.ops == 0 and same.input_ids is batch.input_ids
    with CopyRecorder() as rec:
        batch.to("meta", non_blocking=False)
    assert rec.copies == [("_to_copy", False)] * n_tensors
    if torch.cuda.is_available():
        with CopyRecorder() as rec:
            on_gpu = batch.to("cuda")
        assert all(nb for _, nb in rec.copies) and torch.equal(on_gpu.input_ids.cpu(), batch.input_ids)
        split = encode_split(model, tok, arc[:32], 128, "cuda")
        assert split.device.type == "cuda"
        assert_same_batch(split.batch(np.arange(3, 11)).to("cpu"), model.backbone_kind.encode(tok, arc[3:11], 128))


class CountingTokenizer:
    """A tokenizer that counts the calls made to it (``__call__``, ``encode``, ``decode``)."""

    def __init__(self, tok: Any) -> None:
        self._tok, self.calls = tok, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self._tok(*args, **kwargs)

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self._tok.encode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self._tok.decode(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


def test_evaluate_tokenises_before_its_loop_only_and_scores_as_per_batch_encoding(minilm, arc):
    model, tok = minilm
    exs = arc[:20]
    counting = CountingTokenizer(tok)
    split = encode_split(model, counting, exs, 128)
    assert counting.calls > 0
    counting.calls = 0
    res = evaluate(model, counting, split, batch_size=6, progress=False)
    assert counting.calls == 0  # the loop cut every batch from the encoded split
    # Plain examples: encoded once before the loop, so the calls do not grow with the number of batches.
    for bs in (2, 20):
        counting.calls = 0
        again = evaluate(model, counting, exs, batch_size=bs, progress=False)
        assert counting.calls == calls_of_one_encoding(model, tok, exs)
        assert again.predictions == res.predictions and again.ids == res.ids
    # The scores are those of the per-batch encoding the loop used before.
    model.eval()
    with torch.no_grad():
        ref = [torch.log_softmax(model(model.backbone_kind.encode(tok, b, 128)), 1) for b in iterate_batches(exs, 6)]
    ref_rows = [[v for v in row[: len(ex.choices)]] for row, ex in zip(torch.cat(
        [torch.nn.functional.pad(r, (0, 5 - r.shape[1]), value=-float("inf")) for r in ref]).tolist(), exs)]
    assert res.logp == ref_rows and res.n == 20


def calls_of_one_encoding(model: Any, tok: Any, exs: list) -> int:
    counting = CountingTokenizer(tok)
    encode_split(model, counting, exs, 128)
    return counting.calls


def test_fused_adamw_skips_on_the_device_when_the_flag_is_set():
    params = [torch.nn.Parameter(torch.randn(3, 4)) for _ in range(3)]
    opt = make_adamw(params, 0.1, 0.01)
    assert opt.defaults["fused"]  # the CPU has the fused kernel in this torch
    for p in params:
        p.grad = torch.randn_like(p)
    guarded_update(opt, torch.tensor(0.0))
    before = [p.detach().clone() for p in params]
    moments = [opt.state[p]["exp_avg"].clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    with OpCounter() as ops:
        guarded_update(opt, torch.tensor(1.0))
    assert ops.syncs == {}
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert all(torch.equal(m, opt.state[p]["exp_avg"]) and float(opt.state[p]["step"]) == 1.0
               for m, p in zip(moments, params))


def test_a_checkpoint_of_the_per_parameter_adamw_resumes_into_the_fused_one():
    """Loading a state dict restores its param groups' flags: an older checkpoint would otherwise turn
    the fused optimiser back into the loop, which rejects ``found_inf``."""
    params = [torch.nn.Parameter(torch.randn(3, 4)) for _ in range(2)]
    old = torch.optim.AdamW(params, lr=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    old.step()
    opt = make_adamw(params, 0.1, 0.01)
    load_optimizer_state(opt, old.state_dict())
    assert all(g["fused"] for g in opt.param_groups) and float(opt.state[params[0]]["step"]) == 1.0
    guarded_update(opt, torch.tensor(0.0))
    assert float(opt.state[params[0]]["step"]) == 2.0


def _cfg(tmp_path: Path, data_dir: Path, **kw: Any) -> finetune.Config:
    base = dict(task="arc-easy", method="lora-moe", epochs=1, train_limit=16, eval_limit=4, batch_size=8,
                data_dir=str(data_dir), logdir=str(tmp_path), name="t", log_every=1)
    return finetune.Config(**(base | kw))


def test_a_training_step_issues_no_host_sync(tmp_path, data_dir):
    """The second step, which also reads the first step's values (lagged), under the op counter: no
    value read and no data-dependent shape reaches a kernel, and the update is the fused kernel."""
    cfg = _cfg(tmp_path, data_dir)
    run = finetune.set_up(cfg, finetune.check_config(cfg), "t", tmp_path / "t", DistContext())
    finetune.build_model_and_targets(run)
    finetune.build_optimiser(run)
    finetune.start_training(run)
    # The forward a GPU runs (one fixed-shape pass); the CPU's default chunked forward sizes each chunk
    # from its rows' lengths on the host, a sync of the model's own (tests/moe/test_sync_free.py).
    run.model.one_pass = True
    steps = list(iterate_indices(len(run.data["train"]), cfg.batch_size, np.random.default_rng([cfg.seed, 0])))
    curve, forcing = finetune.EpochCurve(run.device), np.random.default_rng(0)
    assert finetune.train_step(run, steps[0], 0, forcing, curve) is None  # nothing read yet
    with OpCounter() as ops:
        previous = finetune.train_step(run, steps[1], 0, forcing, curve)
    assert ops.syncs == {}, ops.syncs
    assert ops.ops["_fused_adamw_"] == 1 and ops.ops["_foreach_norm"] >= 1
    assert isinstance(previous, float) and np.isfinite(previous) and curve.steps == 1 and run.step == 2


def test_a_non_finite_first_step_stops_with_the_initial_adapters(tmp_path, data_dir, monkeypatch):
    """The step is read one step late, but the stop names it, its questions, and saves the adapters
    as they were before it: its update was skipped on the device."""
    real = finetune.F.cross_entropy
    calls = {"n": 0}

    def nan_on_first_step(logits, labels, **kw):
        calls["n"] += 1
        loss = real(logits, labels, **kw)
        return loss * float("nan") if calls["n"] == 1 else loss
    monkeypatch.setattr(finetune.F, "cross_entropy", nan_on_first_step)
    cfg = _cfg(tmp_path, data_dir)
    with pytest.raises(finetune.NonFiniteLoss, match="non-finite loss at step 1 "):
        finetune.main(cfg)
    saved = tmp_path / "t" / "nonfinite"
    report = json.loads((saved / "nonfinite.json").read_text())
    train = load_task("arc-easy", "train", data_dir, limit=16)
    first = next(iterate_batches(train, 8, np.random.default_rng([cfg.seed, 0])))
    assert report["step"] == 1 and report["example_ids"] == [e.id for e in first]
    fresh = {n: p for n, p in build_model("lora-moe", "minilm", finetune.moe_config(cfg), seed=cfg.seed).named_parameters()
             if p.requires_grad}
    adapters = load_file(saved / "adapter.safetensors")
    assert adapters and all(torch.equal(t, fresh[k]) for k, t in adapters.items() if k in fresh)
    assert sum(k in fresh for k in adapters) > 0
    state = torch.load(saved / "training_state.pt", weights_only=False)
    assert state["scheduler"]["last_epoch"] == 0  # the schedule before step 1
