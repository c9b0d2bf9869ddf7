"""Counting the aten ops a piece of code sends to kernels, and the ones that would stall a GPU.

On a GPU every aten op that reaches a backend is at least one kernel launch, and some make the host
wait for the device: reading a value (``.item()``, ``int(t)``), and ops whose output shape depends
on data (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``, ``repeat_interleave``
with a tensor of repeats, ``bincount``). Both can be counted on a CPU, which makes them testable in
CI: ``bench/ops.py`` compares LoRA-MoE with peft LoRA, and the tests assert that the fixed-shape
forward issues no sync op at all.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Iterator

from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

__all__ = ["NO_LAUNCH_OPS", "SYNC_OPS", "OpCounter", "on_host"]

#: backend ops that make the host wait for a GPU: value reads and data-dependent output shapes
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "nonzero_static", "nonzero_numpy", "masked_select",
                      "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim", "repeat_interleave",
                      "bincount", "histc", "masked_scatter"})

#: backend ops that launch no kernel: allocations without a fill, and metadata-only ops (views,
#: ``detach``, lifting a constant); every other op is counted as at least one launch.
NO_LAUNCH_OPS = frozenset({"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach",
                           "lift_fresh", "_unsafe_view", "alias", "set_", "resize_", "squeeze_", "unsqueeze_",
                           "transpose_", "t_", "as_strided_", "_record_function_enter_new", "_record_function_exit"})


class OpCounter(TorchDispatchMode):
    """Counts, by name, the aten ops that reach a backend kernel while it is active.

    It sees ops after autograd and after composite ops are decomposed (one entry per kernel a
    backend runs, views included), in forward and backward alike::

        with OpCounter() as ops:
            model(batch)
        ops.total, ops.syncs
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.launch_ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func._schema.name.split("::")[-1]
        self.ops[name] += 1
        if not (func.is_view or name in NO_LAUNCH_OPS):
            self.launch_ops[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def launches(self) -> int:
        """Counted ops that launch a kernel on a GPU: all but views and bare allocations (``NO_LAUNCH_OPS``).

        A custom op counts once (its CPU reference's inner ops do not reach this mode). The fused
        low-rank ops (``routing_env::route_shrink``, ``expert_gate``, ``expert_gate_backward``,
        ``adapter_dx``) are one Triton kernel each on a GPU; the sorted ``lora_moe_sorted`` is two or
        three (align, forward, and the sum over slots for k > 1), and its backward the same.
        """
        return sum(self.launch_ops.values())

    @property
    def syncs(self) -> dict[str, int]:
        """The counted ops that synchronise with the host on a GPU (empty: none)."""
        return {k: v for k, v in self.ops.items() if k in SYNC_OPS}


@contextlib.contextmanager
def on_host() -> Iterator[None]:
    """Ops on host tensors that stay on the host whatever device the model runs on (they launch nothing
    on a GPU): an ``OpCounter`` counting a CPU run does not see them."""
    with _disable_current_modes():
        yield
