"""The model backend's rows and batched group forwards.

An example is encoded once into token rows (``example_rows``, as the model's backbone kind encodes
it: an encoder's (question, choice) pairs, a causal LM's one lettered prompt); transitions of many
``(example, prefix)`` nodes run as length-sorted, padded chunks through one group
(``run_batch``), and many nodes' router probabilities and choice scores reach the host in one
transfer each (``read_nodes``). Functions of a ``RoutingEnv``, bound as its methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from routing_env.moe.stepper import Rows

__all__ = ["BIAS_SCALE", "EncodedExample", "example_rows", "read_nodes", "run_batch", "run_padded", "selection_bias"]

BIAS_SCALE = 10.0  # `bias` actions in [-1, 1] are this many logits; beyond ~10 a softmax is saturated anyway
ROW_MAX_LENGTH = 128  # tokens per row, as finetune.py's --max-length default (the warm-up's encoding)


@dataclass
class EncodedExample:
    rows: Rows  # the example's rows (an encoder's choices length-sorted as MCModel.forward orders them)
    order: torch.Tensor  # [C] choice score r is that of choice order[r]
    answer_row: int
    id: str

    def nbytes(self) -> int:
        r = self.rows
        return sum(t.numel() * t.element_size() for t in (r.input_ids, r.attention_mask, r.token_type_ids,
                                                           r.letter_ids, self.order) if t is not None)


def example_rows(env: Any, i: int) -> EncodedExample:
    """Example ``i``'s token rows, encoded once (``env._encoded``, a bounded LRU)."""
    cached = env._encoded.get(i)
    if cached is None:
        ex = env.examples[i]
        rows, order = env.model.backbone_kind.example_rows(env.tokenizer, ex, ROW_MAX_LENGTH)
        rows = Rows(*(None if t is None else t.to(env.device)
                      for t in (rows.input_ids, rows.attention_mask, rows.token_type_ids, rows.letter_ids)))
        cached = EncodedExample(rows, order, int((order == ex.answer).nonzero()), ex.id)
        env._encoded.put(i, cached)
    return cached


def selection_bias(env: Any, key: int | tuple, rows: int, group: int) -> torch.Tensor:  # [rows, E_g]
    E = env.group_experts[group]
    bias = torch.zeros(E)
    if env.action_mode == "primary":
        bias[key] = float("inf")
    elif env.action_mode == "combo":
        bias.fill_(float("-inf"))
        bias[list(env.combos[key])] = 0.0
    else:
        bias = torch.tensor(key, dtype=torch.float32) * BIAS_SCALE
    return bias.expand(rows, E).to(env.device)


def run_batch(env: Any, hiddens: list[torch.Tensor], masks: list[torch.Tensor], group: int,
              keys: list) -> list[tuple[torch.Tensor, np.ndarray]]:
    """Run ``group`` for several examples' rows -> ``(hidden, loads [E])`` per example.

    Examples are sorted by length and batched in chunks of about ``env.batch_rows`` rows, each padded
    only to its own longest example: one batch padded to the longest of all would spend most of
    its FLOPs on padding (ARC lengths vary 3x), which on a compute-bound CPU costs more than the
    batching saves.
    """
    order = sorted(range(len(hiddens)), key=lambda n: hiddens[n].shape[1])
    results: list = [None] * len(hiddens)
    chunk: list[int] = []
    for pos, n in enumerate(order):
        chunk.append(n)
        rows = sum(hiddens[m].shape[0] for m in chunk)
        if rows >= env.batch_rows or pos == len(order) - 1:
            for m, res in zip(chunk, run_padded(env, [hiddens[m] for m in chunk], [masks[m] for m in chunk],
                                                group, [keys[m] for m in chunk])):
                results[m] = res
            chunk = []
    return results


def run_padded(env: Any, hiddens: list[torch.Tensor], masks: list[torch.Tensor], group: int,
               keys: list) -> list[tuple[torch.Tensor, np.ndarray]]:
    T = max(h.shape[1] for h in hiddens)
    hidden = torch.cat([F.pad(h, (0, 0, 0, T - h.shape[1])) for h in hiddens])  # [R, T, d]
    mask = torch.cat([F.pad(m, (0, T - m.shape[1])) for m in masks])  # [R, T]
    bias = torch.cat([selection_bias(env, k, h.shape[0], group) for k, h in zip(keys, hiddens)])  # [R, E_g]
    out, counts = env.stepper.run_group_counts(hidden, mask, group, bias)
    counts = counts.cpu().numpy()  # [R, E_g]
    counts = np.pad(counts, ((0, 0), (0, env.E - counts.shape[1])))  # [R, E]: a MoLA group's missing experts at 0
    results, start = [], 0
    for h in hiddens:
        n, t = h.shape[0], h.shape[1]
        results.append((out[start : start + n, :t], counts[start : start + n].sum(0)))
        start += n
    return results


def read_nodes(env: Any, ids: list[int], keyed: list[tuple]) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Router probabilities ``[E]`` of the open nodes and choice log-probabilities ``[C]`` of the
    complete ones, each kind copied from the device in one transfer (not one sync per node)."""
    open_ = {m: env._router_probs_t(i, p) for m, (i, p) in enumerate(zip(ids, keyed)) if len(p) < env.G}
    done = {m: env._choice_logp_t(i, p) for m, (i, p) in enumerate(zip(ids, keyed)) if len(p) == env.G}
    out = []
    for part in (open_, done):
        if not part:
            out.append({})
            continue
        host = torch.cat(list(part.values())).cpu().numpy()
        sizes = np.cumsum([t.numel() for t in part.values()])[:-1]
        out.append(dict(zip(part, np.split(host, sizes))))
    return out[0], out[1]
