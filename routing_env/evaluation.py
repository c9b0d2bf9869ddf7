"""Accuracy and routing statistics of a multiple-choice model on a list of examples, in one pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from routing_env.data import MCBatch, MCExample, encode_letter_prompt, encode_pairs
from routing_env.moe.backbone import MCModel
from routing_env.moe.layer import LoRAMoELinear
from routing_env.moe.routing import LayerStats, load_stats
from routing_env.utils import autocast

__all__ = ["EvalResult", "evaluate", "batch_encoder", "iterate_batches", "layer_load_stats"]


@dataclass
class EvalResult:
    accuracy: float
    loss: float
    n: int
    layer_stats: dict[int, LayerStats] = field(default_factory=dict)  # transformer layer -> its expert loads
    predictions: list[int] = field(default_factory=list)

    def summary(self) -> dict:
        """JSON-ready: accuracy, loss and per-layer balance metrics."""
        return {
            "accuracy": self.accuracy,
            "loss": self.loss,
            "n": self.n,
            "layers": {
                str(layer): {"cv": s.cv, "max_over_mean": s.max_over_mean, "norm_entropy": s.norm_entropy, "loads": s.loads}
                for layer, s in self.layer_stats.items()
            },
        }


def batch_encoder(model: MCModel, tokenizer: object, max_length: int) -> Callable[[Sequence[MCExample]], MCBatch]:
    """The encoding that fits the backbone kind: (question, choice) pairs or one lettered prompt."""
    if model.kind == "encoder":
        return lambda exs: encode_pairs(tokenizer, exs, max_length=max_length)
    return lambda exs: encode_letter_prompt(tokenizer, exs, max_length=max_length)


def iterate_batches(
    examples: Sequence[MCExample], batch_size: int, rng: np.random.Generator | None = None
) -> Iterator[list[MCExample]]:
    """Consecutive batches, shuffled by ``rng`` when given (seeded, so epochs are reproducible)."""
    order = rng.permutation(len(examples)) if rng is not None else np.arange(len(examples))
    for i in range(0, len(order), batch_size):
        yield [examples[j] for j in order[i : i + batch_size]]


def layer_load_stats(model: MCModel) -> dict[int, LayerStats]:
    """Per transformer layer, balance metrics of the expert counts the last recorded forwards left.

    A layer's modules share one routing decision structure (same experts), so their counts are summed.
    """
    per_layer: dict[int, torch.Tensor] = {}
    for m in model.modules():
        if isinstance(m, LoRAMoELinear) and m.name in model.routing.loads:
            c = model.routing.loads[m.name]
            per_layer[m.layer] = c if m.layer not in per_layer else per_layer[m.layer] + c
    return {layer: load_stats(c) for layer, c in sorted(per_layer.items())}


@torch.no_grad()
def evaluate(
    model: MCModel,
    tokenizer: object,
    examples: Sequence[MCExample],
    *,
    batch_size: int = 32,
    max_length: int = 128,
    device: torch.device | str = "cpu",
    desc: str = "eval",
    progress: bool = True,
    amp_dtype: torch.dtype | None = None,
) -> EvalResult:
    """Accuracy, mean cross-entropy and per-layer expert loads (recorded during the same forwards).

    ``amp_dtype``: run the forwards under autocast to it (``routing_env.utils.autocast_dtype``).
    """
    encode = batch_encoder(model, tokenizer, max_length)
    was_training = model.training
    model.eval()
    ctx = model.routing
    ctx.reset_records()
    ctx.record_loads, ctx.compute_aux = True, False
    # Sums and predictions stay on the device and are read once at the end: no host sync per batch.
    losses, preds = [], []
    try:
        for exs in tqdm(list(iterate_batches(examples, batch_size)), desc=desc, leave=False, disable=not progress):
            batch = encode(exs).to(device)
            with autocast(device, amp_dtype):
                logits = model(batch).float()  # [B, C]
            losses.append(F.cross_entropy(logits, batch.labels, reduction="sum"))
            preds.append(torch.stack([logits.argmax(dim=1), batch.labels]))  # [2, B]
        stats = layer_load_stats(model)
    finally:
        ctx.record_loads = False
        model.train(was_training)
    n = len(examples)
    if not preds:
        return EvalResult(accuracy=0.0, loss=0.0, n=0, layer_stats=stats)
    pred, labels = torch.cat(preds, 1).cpu()  # [2, N] -> [N], [N]
    loss_sum = float(torch.stack(losses).sum())
    correct = int((pred == labels).sum())
    return EvalResult(accuracy=correct / n, loss=loss_sum / n, n=n, layer_stats=stats, predictions=pred.tolist())
