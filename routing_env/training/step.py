"""A training step that never makes the host wait for the device.

Reading a loss on the host (``.tolist()``, ``float(t)``) before the update makes the CPU wait until
the GPU has run everything queued, so the GPU then idles while the next step is being queued. Here:

* the finiteness of (total loss, gradient norm) becomes a flag on the device, and the update is a
  no-op on the device when it is set (fused AdamW reads ``optimizer.found_inf`` as
  ``torch.amp.GradScaler`` uses it: parameters, moments and step counts left untouched);
* the step's values (task, total, gradient norm, flag, aux, route, agreement) go to the host with a
  non-blocking copy into pinned memory (``StepRecord``), and are read one step later, after the next
  step's forward and backward are queued: by then they have long arrived, and if they say the step
  was not finite the run stops with the model as it was before that step (its update was skipped).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from routing_env.training.train_state import NonFiniteLoss, stop_nonfinite

__all__ = ["StepRecord", "StepValues", "finish_step", "guarded_update", "load_optimizer_state", "log_step", "make_adamw",
           "step_values", "to_host"]


def make_adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW as one fused kernel where the parameters' device has one (CPU and CUDA do), else the
    multi-tensor version: the default per-parameter loop is a launch or more per parameter and op."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices  # no public name for this list

    fused = bool(params) and params[0].device.type in _get_fused_kernels_supported_devices()
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {"foreach": True}))


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)`` keeping this optimiser's implementation (fused / foreach).

    A saved param group carries the flags it was made with, and loading it replaces the group's: a
    checkpoint of the per-parameter AdamW would turn the fused one back into it (which rejects
    ``found_inf``), with its step counts left on the host where the fused kernels want them on the
    parameters' device. The flags are set before loading, so the states are placed for the fused kernels.
    """
    impl = {k: optimizer.defaults[k] for k in ("fused", "foreach", "capturable", "differentiable") if k in optimizer.defaults}
    optimizer.load_state_dict({**state, "param_groups": [{**g, **impl} for g in state["param_groups"]]})


def guarded_update(optimizer: torch.optim.Optimizer, nonfinite: torch.Tensor) -> None:
    """``optimizer.step()``, which leaves every parameter and state as it was when ``nonfinite`` (a 0-dim
    float tensor, 1.0 or 0.0) is set.

    Fused AdamW skips on the device (its kernels return early on ``found_inf == 1`` and the step counts
    are incremented, then decremented by ``found_inf``): nothing is read on the host. Other
    implementations reject ``found_inf``, so there the flag is read (one host sync) to skip the call.
    """
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = nonfinite  # type: ignore[attr-defined]  # read by Adam.step as GradScaler sets it
        optimizer.step()
    elif not bool(nonfinite):
        optimizer.step()


def step_values(mean: Any, task: torch.Tensor, total: torch.Tensor, grad_norm: torch.Tensor, aux: torch.Tensor,
                route: torch.Tensor | None, agreement: torch.Tensor | None) -> torch.Tensor:
    """``[5 (+1+G)]`` on the device: task, total, gradient norm (each averaged over the ranks by
    ``mean``, so every rank sees the same flag and skips alike), the non-finite flag, this rank's aux,
    and in stage 3 its routing loss and per-group agreement. Index 3 is the flag ``guarded_update`` takes."""
    device = total.device
    shared = mean(torch.stack([task.detach(), total.detach(), grad_norm.detach().to(device).float()]))
    flag = (~torch.isfinite(shared[1:])).any().float().reshape(1)
    parts = [shared, flag, aux.detach().float().reshape(1).to(device)]
    if route is not None:
        parts += [route.detach().float().reshape(1), agreement.detach().float().reshape(-1)]
    return torch.cat(parts)


def to_host(values: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A host copy of ``values`` and, on a GPU, the event after which it is there (pinned memory, a
    non-blocking copy: the stream is not synchronised). On the CPU the tensor itself is the host copy;
    reading it later (``StepRecord.read``, through numpy) is no device op."""
    if values.device.type == "cuda":
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done
    return (values.detach() if values.device.type == "cpu" else values.detach().cpu()), None


@dataclass
class StepValues:
    """One step's values on the host."""

    task: float
    total: float
    grad_norm: float
    nonfinite: bool
    aux: float
    route: float | None = None
    agreement: list[float] = field(default_factory=list)

    def parts(self) -> dict[str, float]:
        """What a non-finite stop reports."""
        out = {"task": self.task, "aux": self.aux, "total": self.total, "grad_norm": self.grad_norm}
        return out | ({"route": self.route} if self.route is not None else {})


@dataclass
class StepRecord:
    """A step whose values are on their way to the host, and what a stop at that step needs."""

    step: int  # 1-based, as reported
    epoch: int
    ids: list[str]  # the questions of the step (this rank's)
    host: torch.Tensor  # ``step_values`` on the host (pinned on a GPU)
    done: torch.cuda.Event | None  # recorded after the copy (GPU)
    scheduler_state: dict  # the schedule before this step's ``scheduler.step()``
    lrs: list[float]  # the param groups' learning rates this step used
    lr_after: float  # the learning rate after it (what the log shows at this step)

    def read(self) -> StepValues:
        """The values (waiting, on a GPU, for this step's copy only: later steps stay queued)."""
        if self.done is not None:
            self.done.synchronize()
        v = self.host.numpy().tolist()  # numpy: a read of host memory, not a device op
        return StepValues(v[0], v[1], v[2], v[3] != 0.0, v[4], v[5] if len(v) > 5 else None, v[6:])

    def restore_schedule(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        """Put the schedule back to before this step (a stop saves the state before the bad step)."""
        scheduler.load_state_dict(self.scheduler_state)
        for group, lr in zip(optimizer.param_groups, self.lrs):
            group["lr"] = lr


def finish_step(run: Any, curve: Any) -> float | None:
    """Read ``run.pending`` (the last step: its values have arrived by now, or arrive while the next step
    runs), stop if it was not finite, else count it in the epoch's ``curve`` and log it; its task loss.

    A stop saves the state before that step (``stop_nonfinite``): its update was skipped on the device,
    the next one is not made yet, and the schedule is put back. ``run`` is finetune's ``Run``.
    """
    record, run.pending = run.pending, None
    if record is None:
        return None
    v = record.read()
    if v.nonfinite:
        if not run.ctx.is_main:  # every rank stops (the flag is the ranks' mean); rank 0 saves and names the questions
            raise NonFiniteLoss(f"non-finite loss at step {record.step} (rank 0 saved the state)")
        record.restore_schedule(run.optimizer, run.scheduler)
        stop_nonfinite(run.model, run.optimizer, run.scheduler, run.run_dir, record.step, record.epoch, record.ids,
                       v.parts(), run.cfg)
    curve.task, curve.steps = curve.task + v.task, curve.steps + 1
    if record.step % run.cfg.log_every == 0 or record.step == run.stage3_start + 1:
        log_step(run.writer, record, v)
    return v.task


def log_step(writer: Any, record: StepRecord, v: StepValues) -> None:
    """A step's scalars in TensorBoard, at its own step number."""
    step = record.step
    writer.add_scalar("losses/task", v.task, step)
    writer.add_scalar("losses/aux", v.aux, step)
    writer.add_scalar("losses/total", v.total, step)
    writer.add_scalar("charts/learning_rate", record.lr_after, step)
    if v.route is not None:
        writer.add_scalar("losses/route", v.route, step)
        for g, a in enumerate(v.agreement):
            writer.add_scalar(f"routing/agreement_group_{g}", a, step)
