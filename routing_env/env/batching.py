"""The model backend's rows and batched group forwards, with what a search reads of each node.

An example is encoded once into token rows (``example_rows``, as the model's backbone kind encodes
it: an encoder's (question, choice) pairs, a causal LM's one lettered prompt), kept on the device
with a host copy. Transitions of many ``(example, prefix)`` nodes run as length-sorted, padded
chunks through one group (``run_batch``); the same chunk also yields each node's *readout*, what
a search reads of it: the next group's entry-router probabilities ``[E_g]`` for an open node, the
choices' log-probabilities ``[C]`` for a complete one (and the observation's features of either).
A chunk's loads and readouts reach the host in one transfer, so a search level costs a fixed number
of launches per chunk, not per node (on a GPU that host work, not the arithmetic, set the search's
speed). ``embed_batch`` does the same for the embeddings entering group 0. Functions of a
``RoutingEnv``, bound as its methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from routing_env.common.opcount import on_host
from routing_env.data.encode import move
from routing_env.moe.stepper import Rows

__all__ = ["BIAS_SCALE", "EncodedExample", "NodeOut", "embed_batch", "example_rows", "log_softmax64", "probs_from_sums",
           "run_batch", "selection_row"]

BIAS_SCALE = 10.0  # `bias` actions in [-1, 1] are this many logits; beyond ~10 a softmax is saturated anyway
ROW_MAX_LENGTH = 128  # tokens per row, as finetune.py's --max-length default (the warm-up's encoding)


@dataclass
class EncodedExample:
    rows: Rows  # the example's rows on the env's device (an encoder's choices length-sorted as MCModel.forward orders them)
    host: Rows  # the same rows as host arrays (numpy): chunks' masks and inputs are assembled there, copied once
    order: torch.Tensor  # [C] choice score r is that of choice order[r]
    answer_row: int
    id: str

    @property
    def num_choices(self) -> int:
        return len(self.order)

    def nbytes(self) -> int:
        fields = (self.rows.input_ids, self.rows.attention_mask, self.rows.token_type_ids, self.rows.letter_ids)
        device = sum(t.numel() * t.element_size() for t in fields if t is not None)
        copies = 1 if self.rows.input_ids.device.type == "cpu" else 2  # on a CPU the host arrays share the rows' memory
        return copies * device + self.order.numel() * self.order.element_size()


@dataclass
class NodeOut:
    """One node's transition: ``hidden`` entering the next group (None once every group is routed: nothing
    reads it, and it would keep its chunk's memory alive), ``loads [E]`` of the group just run (None for
    the embeddings), ``readout`` (see the module docstring) and ``features [P]``, the observation's
    ``tanh`` of the projected mean hidden state."""

    hidden: torch.Tensor | None  # [C, T, d (+ H)] fp32
    loads: np.ndarray | None
    readout: np.ndarray
    features: np.ndarray

    def storage(self) -> tuple[int, int]:
        """``(id, bytes)`` of the memory ``hidden`` lives in: a view of its whole chunk's output, which the
        prefix cache counts once, while any node of the chunk is held (``TensorLRU``'s ``storage``)."""
        if self.hidden is None:
            return id(self), self.readout.nbytes + self.features.nbytes
        s = self.hidden.untyped_storage()
        return s.data_ptr(), s.nbytes()


def example_rows(env: Any, i: int) -> EncodedExample:
    """Example ``i``'s token rows, encoded once (``env._encoded``, a bounded LRU)."""
    cached = env._encoded.get(i)
    if cached is None:
        ex = env.examples[i]
        rows, order = env.model.backbone_kind.example_rows(env.tokenizer, ex, ROW_MAX_LENGTH)
        fields = (rows.input_ids, rows.attention_mask, rows.token_type_ids, rows.letter_ids)
        host = Rows(*(None if t is None else t.numpy() for t in fields))
        rows = Rows(*(None if t is None else move(t, env.device) for t in fields))
        cached = EncodedExample(rows, host, order, int((order == ex.answer).nonzero()), ex.id)
        env._encoded.put(i, cached)
    return cached


def selection_row(env: Any, key: int | tuple, group: int) -> np.ndarray:  # [E_g] float32
    """The selection bias an action key puts on group ``group``'s router logits (every token alike)."""
    E = env.group_experts[group]
    if env.action_mode == "primary":
        bias = np.zeros(E, np.float32)
        bias[key] = np.inf
    elif env.action_mode == "combo":
        bias = np.full(E, -np.inf, np.float32)
        bias[list(env.combos[key])] = 0.0
    else:
        bias = np.asarray(key, np.float32) * BIAS_SCALE
    return bias


def log_softmax64(scores: list[np.ndarray]) -> list[np.ndarray]:
    """``[C_n]`` float64 log-softmax of each example's choice scores, all in one host op (torch's, padded
    with -inf, which adds exact zeros: a CPU env gives a plain forward's ``log_softmax(logits.double())``)."""
    width = max(len(s) for s in scores)
    padded = np.full((len(scores), width), -np.inf)
    for n, s in enumerate(scores):
        padded[n, : len(s)] = s
    with on_host():
        logp = torch.log_softmax(torch.from_numpy(padded), 1).numpy()
    return [logp[n, : len(s)] for n, s in enumerate(scores)]


def probs_from_sums(sums: np.ndarray, num_modules: int) -> np.ndarray:
    """``[E_g]`` mean entry-router probabilities from an example's rows' ``[n, E_g + 1]`` sums
    (``GroupStepper.entry_prob_sums``): the mean over real tokens, then over the modules."""
    total = sums.sum(0)
    return (total[:-1] / total[-1] / num_modules).astype(np.float32)


def _stack_host(parts: list[np.ndarray], width: int) -> torch.Tensor:
    """Host rows ``[n_i, w_i]`` stacked into ``[sum n_i, width]``, right-padded with zeros: built in
    numpy (no tensor op per node), one tensor to copy."""
    out = np.zeros((sum(p.shape[0] for p in parts), width), parts[0].dtype)
    start = 0
    for p in parts:
        out[start : start + p.shape[0], : p.shape[1]] = p
        start += p.shape[0]
    return torch.from_numpy(out)


def _stack_hidden(hiddens: list[torch.Tensor], T: int) -> torch.Tensor:
    """``[R, T, d]``: the nodes' hidden states right-padded with zeros, one ``cat`` and pad per run of
    equal lengths (``run_batch`` sorts nodes by length, so a chunk holds few runs: one per example at most)."""
    runs: list[list[torch.Tensor]] = []
    for h in hiddens:
        if runs and runs[-1][0].shape[1] == h.shape[1]:
            runs[-1].append(h)
        else:
            runs.append([h])
    padded = [torch.cat(r) if len(r) > 1 else r[0] for r in runs]
    padded = [h if h.shape[1] == T else F.pad(h, (0, 0, 0, T - h.shape[1])) for h in padded]
    return torch.cat(padded) if len(padded) > 1 else padded[0]  # one node stepping: its own states, no copy


def _readouts(env: Any, out: torch.Tensor, rows: Rows, next_group: int) -> torch.Tensor:
    """``[R, X + P + 1]`` per row, on the device: the entry-router sums of ``next_group`` (``X = E_g + 1``),
    or after the last group the rows' scores (``X = S``); then the feature sums (``feature_sums``)."""
    if next_group < env.G:
        read = env.stepper.entry_prob_sums(out, rows.attention_mask, env._entry[next_group], next_group)
    else:
        read = env.stepper.row_scores(out, rows)
    return torch.cat([read.float(), env.stepper.feature_sums(out, rows.attention_mask, env.projection)], 1)


def _finish(env: Any, exs: list[EncodedExample], host: np.ndarray,
            next_group: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each example's ``(readout, features)`` from its rows' slice of ``host [R, X + P + 1]`` (rows in ``exs`` order)."""
    ends = np.cumsum([e.host.attention_mask.shape[0] for e in exs])
    P = env.projection.shape[0]
    parts = np.split(host[:, : host.shape[1] - P - 1], ends[:-1])
    sums = np.add.reduceat(host[:, host.shape[1] - P - 1 :], np.r_[0, ends[:-1]], axis=0)  # [N, P + 1]
    features = list(np.tanh(sums[:, :P] / sums[:, P:]).astype(np.float32))
    if next_group < env.G:
        readouts = [probs_from_sums(part, len(env._entry[next_group])) for part in parts]
    else:
        kind = env.model.backbone_kind
        readouts = log_softmax64([kind.example_scores(part)[: e.num_choices] for e, part in zip(exs, parts)])
    return list(zip(readouts, features))


def embed_batch(env: Any, ids: list[int]) -> list[NodeOut]:
    """The embeddings entering group 0 of several examples (the root nodes), in one padded pass."""
    exs = [env._example_rows(i) for i in ids]
    T = max(e.host.attention_mask.shape[1] for e in exs)
    types = None if exs[0].host.token_type_ids is None else _stack_host([e.host.token_type_ids for e in exs], T)
    rows = Rows(*(None if t is None else move(t, env.device) for t in
                  (_stack_host([e.host.input_ids for e in exs], T), _stack_host([e.host.attention_mask for e in exs], T),
                   types)))
    hidden = env.stepper.embed(rows)  # [R, T, d (+ H)]
    host = _readouts(env, hidden, rows, 0).cpu().numpy()
    results, start = [], 0
    for e, (readout, features) in zip(exs, _finish(env, exs, host, 0)):
        n, t = e.host.attention_mask.shape
        results.append(NodeOut(hidden[start : start + n, :t], None, readout, features))
        start += n
    return results


def run_batch(env: Any, ids: list[int], hiddens: list[torch.Tensor], group: int, keys: list) -> list[NodeOut]:
    """Run ``group`` for several nodes: example ``ids[n]``'s hidden states ``hiddens[n]`` under the
    action key ``keys[n]``, in order.

    Nodes are sorted by length and batched in chunks of about ``env.batch_rows`` rows, each padded
    only to its own longest example: one batch padded to the longest of all would spend most of
    its FLOPs on padding (ARC lengths vary 3x), which on a compute-bound CPU costs more than the
    batching saves.
    """
    order = sorted(range(len(hiddens)), key=lambda n: hiddens[n].shape[1])
    results: list = [None] * len(hiddens)
    chunk: list[int] = []
    rows = 0
    for pos, n in enumerate(order):
        chunk.append(n)
        rows += hiddens[n].shape[0]
        if rows >= env.batch_rows or pos == len(order) - 1:
            outs = _run_padded(env, [ids[m] for m in chunk], [hiddens[m] for m in chunk], group, [keys[m] for m in chunk])
            for m, res in zip(chunk, outs):
                results[m] = res
            chunk, rows = [], 0
    return results


def _run_padded(env: Any, ids: list[int], hiddens: list[torch.Tensor], group: int, keys: list) -> list[NodeOut]:
    exs = [env._example_rows(i) for i in ids]
    T = max(h.shape[1] for h in hiddens)
    hidden = _stack_hidden(hiddens, T)  # [R, T, d]
    bias = np.concatenate([np.broadcast_to(selection_row(env, k, group), (h.shape[0], env.group_experts[group]))
                           for k, h in zip(keys, hiddens)])  # [R, E_g]
    letters = None
    if group + 1 == env.G and exs[0].host.letter_ids is not None:  # a causal LM's answer letters, for its scores
        letters = move(_stack_host([e.host.letter_ids for e in exs], max(e.num_choices for e in exs)), env.device)
    rows = Rows(None, move(_stack_host([e.host.attention_mask for e in exs], T), env.device), None, letters)
    out, counts = env.stepper.run_group_counts(hidden, rows.attention_mask, group,
                                               move(torch.from_numpy(np.ascontiguousarray(bias)), env.device))
    E_g = counts.shape[1]
    # One transfer for the chunk: the row counts (integers, exact in float32) beside the readouts.
    host = torch.cat([counts.float(), _readouts(env, out, rows, group + 1)], 1).cpu().numpy()
    complete = group + 1 == env.G  # nothing reads a complete path's hidden states: the chunk is freed now
    results, start = [], 0
    for h, e, (readout, features) in zip(hiddens, exs, _finish(env, exs, host[:, E_g:], group + 1)):
        n, t = h.shape[0], h.shape[1]
        loads = np.zeros(env.E)
        loads[:E_g] = host[start : start + n, :E_g].sum(0)  # a MoLA group's missing experts stay 0
        results.append(NodeOut(None if complete else out[start : start + n, :t], loads, readout, features))
        start += n
    return results
