"""The one place for helpers every script shares: seeding, device choice, TensorBoard writers (and, from
``routing_env.common.cli``, the config command line)."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The command line lives in routing_env.common.cli and the --precision choices in routing_env.common.configs,
# which import no torch (so --help answers at once); their names stay importable from here.
from routing_env.common.cli import cfg_field, parse_config, run_cli, save_config
from routing_env.common.configs import PRECISIONS

__all__ = ["seed_everything", "pick_device", "PRECISIONS", "autocast_dtype", "autocast", "make_writer", "parse_config",
           "save_config", "cfg_field", "log_hparams", "run_cli"]


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; on CPU also ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of a ``--precision`` on ``device`` (None: plain fp32).

    ``auto`` is bf16 on a CUDA GPU that supports it (matmuls in bf16, softmax, norms and the
    routing statistics in fp32) and fp32 elsewhere, so CPU runs stay exactly as before.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if precision == "fp32" or (precision == "auto" and (device.type != "cuda" or not torch.cuda.is_bf16_supported())):
        return None
    return torch.bfloat16


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> torch.autocast:
    """``torch.autocast`` to ``dtype`` on ``device``'s type; off when ``dtype`` is None."""
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def make_writer(logdir: str | Path):
    """A TensorBoard ``SummaryWriter`` (imported here so library modules don't pay for it)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(logdir))


def log_hparams(writer: Any, cfg: Any) -> None:
    """The run's configuration as a Markdown table under ``hyperparameters`` (as CleanRL does)."""
    rows = "\n".join(f"|{k}|{v}|" for k, v in dataclasses.asdict(cfg).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}")
