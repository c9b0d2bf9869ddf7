"""Data parallelism on ``torch.distributed``: one process per device, started by ``torchrun``.

``python finetune.py ...`` runs as one process (world size 1: nothing here does anything).
``torchrun --nproc-per-node N finetune.py ...`` (or ``train_rl.py``) starts N; each calls
``setup()``, which joins the process group (NCCL on GPUs, gloo on CPUs) and gives its rank, world
size and device (``cuda:<local rank>``). Rank 0 is the one that writes: logs, checkpoints, results,
targets; the others compute and hand their parts to it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistContext", "setup", "NullWriter"]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job (the defaults: a single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """``auto`` / ``cuda`` -> this process's own GPU (``cuda:<local rank>``); anything else as given."""
        from routing_env.common.utils import pick_device

        dev = pick_device(name)
        if self.world > 1 and dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(dev)
        return dev

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on rank 0 only (every rank runs the same code; one of them talks)."""
        if self.is_main:
            print(*args, **kwargs)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (pickled: for results, not tensors)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of ``t`` over ranks (every rank gets it)."""
        if self.world == 1:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t / self.world


def setup() -> DistContext:
    """Join the ``torchrun`` job this process belongs to (none: a single-process context)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistContext()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


class NullWriter:
    """A TensorBoard writer that writes nothing: the one every rank but 0 gets."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None
