"""A fine-tune run's state between epochs: resuming it, pairing stage 3 with a lora-moe run, and
stopping on a non-finite loss with the state before the bad step saved."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from routing_env.moe import load_adapter_state, save_checkpoint
from routing_env.common.safefiles import atomic_write, atomic_write_text, mark_complete

__all__ = ["PAIRED_FIELDS", "check_paired", "load_training_state", "last_checkpoint", "save_epoch", "NonFiniteLoss",
           "stop_nonfinite"]


#: Settings that must equal the lora-moe run a paired layermoe run continues: with any of them
#: different the two runs would differ in more than the routing loss.
PAIRED_FIELDS = ("task", "train_file", "dev_file", "test_file", "seed", "epochs", "batch_size", "lr", "weight_decay",
                 "warmup_ratio", "max_grad_norm", "max_length", "aux_loss_coef", "train_limit", "backbone", "precision",
                 "backbone_dropout")


def check_paired(cfg: Any, run: dict | None, checkpoint: Path) -> None:
    """Refuse to continue a run whose training settings differ from ``cfg``'s, naming each."""
    if run is None:
        raise ValueError(f"{checkpoint}/training_state.pt records no config (written by an older version); "
                         "retrain the lora-moe run to pair layermoe with it")
    # A layermoe epoch checkpoint continues the same chain (expert iteration: search again on the
    # stage-3 model, then train its next epoch on the new targets).
    if run.get("method") not in ("lora-moe", "layermoe"):
        raise ValueError(f"--init-checkpoint {checkpoint} is from a {run.get('method')!r} run; layermoe continues a "
                         "lora-moe run (or an epoch of a layermoe run)")
    # A setting an older run did not record had its present default then.
    had = {k: run.get(k, type(cfg).__dataclass_fields__[k].default) for k in PAIRED_FIELDS}
    diff = [f"{k}: {had[k]!r} there, {getattr(cfg, k)!r} here" for k in PAIRED_FIELDS if had[k] != getattr(cfg, k)]
    if diff:
        raise ValueError(f"layermoe continues the lora-moe run of {checkpoint}, so its training settings must be that "
                         f"run's; differing: {'; '.join(diff)}")


def load_training_state(folder: Path) -> dict:
    return torch.load(folder / "training_state.pt", weights_only=False, map_location="cpu")  # saved on any device


def last_checkpoint(model, ckpt_root: Path) -> tuple[Path, dict] | None:
    """The newest epoch checkpoint that loads (its adapters now in ``model``) and its training state.

    A folder a crash left half-written (a file missing or truncated) is skipped with a warning, so
    the run resumes from the epoch before it instead of failing for good.
    """
    folders = sorted((p for p in ckpt_root.glob("epoch_*") if p.name.split("_")[1].isdigit()),
                     key=lambda p: int(p.name.split("_")[1]), reverse=True)
    for folder in folders:
        try:
            state = load_training_state(folder)
            load_adapter_state(model, folder)
            return folder, state
        except Exception as e:  # noqa: BLE001 -- any unreadable file means "not this one"
            print(f"resume: skipping {folder}, which is incomplete or damaged ({type(e).__name__}: {e})")
    return None


class NonFiniteLoss(RuntimeError):
    """A loss became NaN or infinite; the run stopped with its state saved (see the message)."""


def stop_nonfinite(model, optimizer, scheduler, run_dir: Path, step: int, epoch: int, ids: list[str], parts: dict,
                   cfg: Any) -> None:
    """Save the state before the bad step (adapters still finite) and raise, naming step and questions."""
    where = save_checkpoint(model, run_dir / "nonfinite", extra={"step": step, "epoch": epoch + 1})
    atomic_write(where / "training_state.pt", lambda tmp: torch.save({
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
        "config": asdict(cfg)}, tmp))
    atomic_write_text(where / "nonfinite.json", json.dumps({"step": step, "epoch": epoch + 1, "example_ids": ids,
                                                            "losses": parts}, indent=2))
    raise NonFiniteLoss(f"non-finite loss at step {step} (epoch {epoch + 1}): {parts}; questions {ids}. The state "
                        f"before this step is in {where}. Check the inputs of these questions (a targets file with "
                        f"non-finite values?) or lower --lr.")


def save_epoch(model, optimizer, scheduler, folder: Path, epoch: int, history: list[dict], cfg: Any, task: str,
               device: torch.device) -> Path:
    """The epoch checkpoint: adapters, then optimiser, schedule, RNG and history, then the marker.

    The ``COMPLETE`` marker comes last, so a crash before it leaves a folder ``last_checkpoint`` skips.
    """
    ckpt = save_checkpoint(model, folder, extra={"task": task, "seed": cfg.seed}, complete=False)
    atomic_write(ckpt / "training_state.pt", lambda tmp: torch.save({
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
        "history": history, "epoch": epoch, "config": asdict(cfg)}, tmp))
    mark_complete(ckpt)
    return ckpt
