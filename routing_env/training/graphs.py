"""The evaluation forward replayed from CUDA graphs: captured once per batch shape, shapes bucketed.

On a GPU an eval forward of MiniLM LoRA-MoE is ~230 kernel launches, and the Python that issues them
(the transformer's modules, the routing bookkeeping, custom-op dispatch, Triton's launchers) costs
far more than the kernels at these sizes: measured on an H200, ~40 ms per batch of 64 ARC-Easy
questions (6k sequences/s) for a few ms of GPU work. A CUDA graph replays the recorded launches
without the Python.

``GraphedForward(model)(batch) -> (logits [B, C], loads [M, E] float64)`` captures ``model(batch)``
once per (rows, choices, width) shape, with the expert loads of the ``M`` LoRA-MoE modules returned
as an output (a tensor the graph writes, not a recorder's dictionary that Python fills), then
replays it with the next batch of that shape copied into the captured inputs. ``evaluate`` rounds
batch widths up to ``BUCKET`` tokens (the extra columns are padding: masked in attention, left out
of the pooling and of the statistics) so that a split needs a handful of graphs. A replay reads
the parameters where they live: training in place between evaluations needs no new capture
(``graphed_forward`` keeps one per model, device, precision and parameter storage).

The outputs are the graph's own buffers, overwritten by the next replay: use them (or copy them)
before calling again. ``capture=False`` runs the same bookkeeping eagerly (any device; the tests).

The training step (``finetune --compile``, ``compile_net``) goes through ``torch.compile`` instead:
its backward and the recorder's statistics make a hand-captured graph fragile, and PyTorch's
``reduce-overhead`` mode captures the compiled forward and backward as CUDA graphs itself.
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch
import torch.nn.functional as F

from routing_env.data import MCBatch
from routing_env.moe.backbone import MCModel
from routing_env.moe.layer import LoRAMoELinear
from routing_env.moe.routing import RoutingPlan

__all__ = ["BUCKET", "GraphedForward", "compile_net", "graphed_forward"]

BUCKET = 32  # width multiple of a captured batch: MiniLM's 128-token rows give at most four widths


class GraphedForward:
    """``model(batch)`` and its expert loads, captured per batch shape and replayed (module docstring)."""

    def __init__(self, model: MCModel, amp_dtype: torch.dtype | None = None, capture: bool = True) -> None:
        self.model, self.amp, self.capture = model, amp_dtype, capture
        self.layers = [m for m in model.modules() if isinstance(m, LoRAMoELinear)]
        self.width = max((m.num_experts for m in self.layers), default=0)
        self.graphs: dict[tuple, tuple] = {}  # shape -> (graph, captured inputs, outputs); each its own memory pool

    def forward(self, batch: MCBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The eager forward: ``(logits [B, C] fp32, loads [M, E] float64)``, the loads zero-padded to the widest layer."""
        device = batch.input_ids.device
        # No autocast cache: casts cached during a capture would be freed when it ends, under the graph's feet.
        amp = torch.autocast(device.type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None,
                             cache_enabled=False)
        with self.model.routed(RoutingPlan(record_loads=True)) as rec, amp:
            logits = self.model(batch).float()
        # One row per module of ``self.layers``, in order (zeros for one that recorded nothing).
        loads = [F.pad(rec.loads[m.name], (0, self.width - m.num_experts)) if m.name in rec.loads
                 else logits.new_zeros(self.width, dtype=torch.float64) for m in self.layers]
        return logits, torch.stack(loads) if loads else logits.new_zeros(0, self.width, dtype=torch.float64)

    def by_module(self, loads: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``{module name: [E_m] counts}`` of ``[M, E]`` loads this forward returned (summed as the caller likes)."""
        if loads is None:
            return {}
        return {m.name: row[: m.num_experts] for m, row in zip(self.layers, loads)}

    def __call__(self, batch: MCBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.capture:
            return self.forward(batch)
        tensors = {f.name: getattr(batch, f.name) for f in fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor)}
        key = tuple((name, tuple(t.shape), t.dtype) for name, t in tensors.items())
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(batch, tensors)
        else:
            for name, t in tensors.items():  # this batch into the captured inputs (device to device, queued)
                getattr(entry[1], name).copy_(t)
        entry[0].replay()
        return entry[2]

    def _capture(self, batch: MCBatch, tensors: dict[str, torch.Tensor]) -> tuple:
        static = replace(batch, **{name: t.clone() for name, t in tensors.items()})
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: Triton compiles, cuBLAS picks its kernels
            for _ in range(2):
                self.forward(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.forward(static)
        return graph, static, outputs


def graphed_forward(model: MCModel, amp_dtype: torch.dtype | None, capture: bool = True) -> GraphedForward:
    """The model's ``GraphedForward`` for this precision, kept on the model while its parameters stay where
    they are (a ``.to()`` or a new parameter would leave the graphs reading freed memory: captured anew)."""
    key = (amp_dtype, capture, tuple(p.data_ptr() for p in model.parameters()))
    cached = model.__dict__.setdefault("_graphed_forward", {})
    if key not in cached:
        cached.clear()
        cached[key] = GraphedForward(model, amp_dtype, capture)
    return cached[key]


def compile_net(net: torch.nn.Module, mode: str) -> tuple[torch.nn.Module, int]:
    """``(net, width multiple of a training batch)`` for ``finetune --compile``: ``torch.compile`` with batch
    widths bucketed to ``BUCKET`` tokens, so a split needs a few shapes. ``graphs`` replays CUDA graphs
    (PyTorch's ``reduce-overhead``: the Python that issues a step's launches runs once per shape);
    ``trace`` traces forward and backward but runs them eagerly (a check that nothing breaks the graph)."""
    if mode == "none":
        return net, 1
    options = {"default": {}, "graphs": {"mode": "reduce-overhead"}, "trace": {"backend": "aot_eager"}}[mode]
    return torch.compile(net, **options), BUCKET
