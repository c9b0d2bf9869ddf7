"""Accuracy and routing statistics of a multiple-choice model on a list of examples, in one pass.

Each evaluation also keeps its per-question evidence (id, label, prediction, log-probabilities over
the choices): two runs answer the same questions, so a paired comparison can be tested within a
seed (``routing_env.common.stats``), not only across seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from routing_env.data import EncodedSplit, MCBatch, MCExample, pad_token_id
from routing_env.moe.backbone import MCModel
from routing_env.moe.layer import LoRAMoELinear
from routing_env.moe.routing import LayerStats, RoutingPlan, RoutingRecorder, load_stats
from routing_env.common.utils import autocast
from routing_env.training.graphs import BUCKET, graphed_forward

__all__ = ["EvalResult", "evaluate", "batch_encoder", "encode_split", "iterate_batches", "iterate_indices",
           "layer_load_stats"]


#: Decimals of the stored log-probabilities: records are committed (ARC-Easy's test split is 2376
#: questions), and 1e-5 nats is far below any difference a paired test is asked about.
LOGP_DECIMALS = 5


@dataclass
class EvalResult:
    accuracy: float
    loss: float
    n: int
    layer_stats: dict[int, LayerStats] = field(default_factory=dict)  # transformer layer -> its expert loads
    predictions: list[int] = field(default_factory=list)  # per question, in the order of ``ids``
    ids: list[str] = field(default_factory=list)  # the examples' ids, in evaluation order
    labels: list[int] = field(default_factory=list)  # the correct choice's index
    # log_softmax of the logits over each question's own choices (its row is as long as it has
    # choices); a choice scored -inf (padded) is None, which JSON writes as null.
    logp: list[list[float | None]] = field(default_factory=list)

    def questions(self) -> dict:
        """The per-question evidence, columnar (one list per field, aligned by position): ids, label,
        pred and logp (rounded to ``LOGP_DECIMALS``). Paired tests join two runs' blocks on ``ids``."""
        return {
            "ids": list(self.ids),
            "label": list(self.labels),
            "pred": list(self.predictions),
            "logp": [[None if v is None else round(v, LOGP_DECIMALS) for v in row] for row in self.logp],
        }

    def summary(self, questions: bool = True) -> dict:
        """JSON-ready: accuracy, loss, per-layer balance metrics and (``questions``) the per-question block."""
        out = {
            "accuracy": self.accuracy,
            "loss": self.loss,
            "n": self.n,
            "layers": {
                str(layer): {"cv": s.cv, "max_over_mean": s.max_over_mean, "norm_entropy": s.norm_entropy, "loads": s.loads}
                for layer, s in self.layer_stats.items()
            },
        }
        if questions:
            out["questions"] = self.questions()
        return out


def batch_encoder(model: MCModel, tokenizer: object, max_length: int) -> Callable[[Sequence[MCExample]], MCBatch]:
    """The encoding of the model's backbone kind: (question, choice) pairs, one lettered prompt, ..."""
    kind = model.backbone_kind
    return lambda exs: kind.encode(tokenizer, exs, max_length)


def encode_split(model: MCModel, tokenizer: object, examples: Sequence[MCExample], max_length: int,
                 device: torch.device | str = "cpu") -> EncodedSplit:
    """``examples`` tokenised once by the model's backbone kind; resident on ``device`` when it is a GPU
    (each batch is then an index and a slice there, with nothing copied per batch)."""
    split = EncodedSplit.build(batch_encoder(model, tokenizer, max_length), examples, pad_id=pad_token_id(tokenizer))
    return split.to(device) if torch.device(device).type == "cuda" else split


def iterate_indices(n: int, batch_size: int, rng: np.random.Generator | None = None) -> Iterator[np.ndarray]:
    """The example indices of consecutive batches of ``n`` examples, shuffled by ``rng`` when given
    (seeded, so epochs are reproducible)."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


def iterate_batches(
    examples: Sequence[MCExample], batch_size: int, rng: np.random.Generator | None = None
) -> Iterator[list[MCExample]]:
    """The examples of ``iterate_indices``'s batches (same order for the same ``rng``)."""
    for idx in iterate_indices(len(examples), batch_size, rng):
        yield [examples[j] for j in idx]


def layer_load_stats(model: MCModel, recorder: RoutingRecorder) -> dict[int, LayerStats]:
    """Per transformer layer, balance metrics of the expert counts ``recorder`` holds (``record_loads``).

    A layer's modules share one routing decision structure (same experts), so their counts are summed.
    """
    return _layer_stats(model, recorder.loads)


def _layer_stats(model: MCModel, loads: Mapping[str, torch.Tensor]) -> dict[int, LayerStats]:
    """``layer_load_stats`` of expert counts by module name (a recorder's, or a ``GraphedForward``'s)."""
    per_layer: dict[int, torch.Tensor] = {}
    for m in model.modules():
        if isinstance(m, LoRAMoELinear) and m.name in loads:
            c = loads[m.name]
            per_layer[m.layer] = c if m.layer not in per_layer else per_layer[m.layer] + c
    return {layer: load_stats(c) for layer, c in sorted(per_layer.items())}


@torch.no_grad()
def evaluate(
    model: MCModel,
    tokenizer: object,
    examples: Sequence[MCExample] | EncodedSplit,
    *,
    batch_size: int = 32,
    max_length: int = 128,
    device: torch.device | str = "cpu",
    desc: str = "eval",
    progress: bool = True,
    amp_dtype: torch.dtype | None = None,
    graphs: bool | None = None,
) -> EvalResult:
    """Accuracy, mean cross-entropy and per-layer expert loads (recorded during the same forwards), and
    per question its id, label, prediction (argmax of the logits) and log-probabilities over its choices.

    ``amp_dtype``: run the forwards under autocast to it (``routing_env.common.utils.autocast_dtype``).
    ``examples`` may be a split ``encode_split`` made (with this ``max_length``): a run evaluating the
    same split every epoch tokenises it once; plain examples are encoded here, once, before the loop.
    ``graphs``: replay the forwards from CUDA graphs (``routing_env.training.graphs``; widths bucketed,
    loads returned by the graph); None: on a CUDA device with the one-pass forward.
    """
    split = examples if isinstance(examples, EncodedSplit) else (
        encode_split(model, tokenizer, examples, max_length, device) if len(examples) else None)
    examples = split.examples if split is not None else []
    split = split.to(device) if split is not None and torch.device(device).type == "cuda" else split
    if graphs is None:
        graphs = torch.device(device).type == "cuda" and model._one_pass(torch.device(device))
    order = None
    if split is not None and (graphs or model._one_pass(torch.device(device))):
        # The one-pass forward pads every row of a batch to its longest: batches of similar lengths pad
        # less (ARC-Easy dev: 1.9x fewer tokens computed). Results are put back in the split's order.
        order = np.argsort(split.lengths, kind="stable")
    starts = range(0, len(examples), batch_size)
    was_training = model.training
    model.eval()
    # Sums, predictions and log-probabilities stay on the device and are read once at the end: no host
    # sync per batch.
    losses, preds, logps = [], [], []
    forward = graphed_forward(model, amp_dtype, capture=torch.device(device).type == "cuda") if graphs else None
    total = None  # [M, E] the graphs' loads, summed over the batches
    try:
        with model.routed(RoutingPlan(record_loads=True)) as rec:  # expert loads of every batch, summed
            for start in tqdm(starts, desc=desc, leave=False, disable=not progress):
                # Cut from the encoded split (no tokenizer, no host sync); moved when it lives on the host.
                idx = range(start, min(start + batch_size, len(examples)))
                idx = idx if order is None else order[idx.start : idx.stop]  # (its index copied without blocking)
                if forward is not None:  # the graph's outputs are its buffers: used before the next replay
                    batch = split.batch(idx, width_multiple=BUCKET).to(device)
                    logits, loads = forward(batch)
                    total = loads.clone() if total is None else total.add_(loads)
                else:
                    batch = split.batch(idx).to(device)
                    with autocast(device, amp_dtype):
                        logits = model(batch).float()  # [B, C]
                losses.append(F.cross_entropy(logits, batch.labels, reduction="sum"))
                preds.append(torch.stack([logits.argmax(dim=1), batch.labels]))  # [2, B]
                logps.append(F.log_softmax(logits, dim=1))  # [B, C_batch]; padded choices stay -inf
        stats = _layer_stats(model, rec.loads if forward is None else forward.by_module(total))
    finally:
        model.train(was_training)
    n = len(examples)
    if not preds:
        return EvalResult(accuracy=0.0, loss=0.0, n=0, layer_stats=stats)
    # Batches have as many choice columns as their widest question: pad to the widest of all (-inf,
    # as padded choices are) so one tensor holds them, then read everything in one transfer.
    width = max(t.shape[1] for t in logps)
    logp = torch.cat([F.pad(t, (0, width - t.shape[1]), value=-math.inf) for t in logps])  # [N, W]
    pred_label = torch.cat(preds, 1)  # [2, N]
    loss_sum = torch.stack(losses).sum()
    host = torch.cat([logp.reshape(-1), pred_label.reshape(-1).float(), loss_sum.reshape(1)]).cpu()
    logp_h, pred_label_h = host[: n * width].view(n, width), host[n * width : -1].view(2, n)
    pred, labels = pred_label_h.long()  # small integers: exact in float32
    if order is not None:  # back to the split's order
        back = torch.from_numpy(np.argsort(order))
        logp_h, pred, labels = logp_h[back], pred[back], labels[back]
    loss_sum = float(host[-1])
    correct = int((pred == labels).sum())
    rows = [[v if math.isfinite(v) else None for v in row[: len(ex.choices)]]
            for row, ex in zip(logp_h.tolist(), examples)]
    return EvalResult(accuracy=correct / n, loss=loss_sum / n, n=n, layer_stats=stats, predictions=pred.tolist(),
                      ids=[ex.id for ex in examples], labels=labels.tolist(), logp=rows)
