"""The cached warm-up checkpoint an env uses when it is given none (trained once, demo size)."""

from __future__ import annotations

import os
from pathlib import Path

from routing_env.data import TaskSource, resolve_task

__all__ = ["cache_dir", "default_checkpoint", "DEMO_WARMUP"]

#: Demo-size warm-up: enough training that experts differ (fresh experts are identical, B = 0).
#: At the default lr (1e-3) 25 steps leave the model at chance (37.5% test on ARC-Easy); 3e-3 gives
#: 46.5% in the same ~2 minutes, a model whose routing choices matter.
DEMO_WARMUP = dict(method="lora-moe", epochs=1, train_limit=400, eval_limit=200, lr=3e-3)


def cache_dir() -> Path:
    """``$ROUTING_GYM_CACHE``, else ``~/.cache/routing-gym``."""
    return Path(os.environ.get("ROUTING_GYM_CACHE", Path.home() / ".cache" / "routing-gym"))


def default_checkpoint(task: str | TaskSource, backbone: str = "minilm", data_dir: str | os.PathLike | None = None) -> Path:
    """The cached warm-up checkpoint for ``(task, backbone)``; trains and caches one when missing.

    Keyed by the task's identity (a custom task's includes a hash of its files) and the backbone.
    """
    source = resolve_task(task)
    name = f"warmup-{source.name}-{Path(backbone).name}"
    final = cache_dir() / name / "final"
    if (final / "adapter_config.json").is_file():
        return final
    print(f"no warm-up checkpoint for {source.name} / {backbone} in {cache_dir()}: training a demo-size one "
          f"({DEMO_WARMUP['train_limit']} questions, 1 epoch); pass checkpoint= to use your own")
    from routing_env import finetune  # imported here: finetune builds on modules that import this one

    cfg = finetune.Config(**source.args(), backbone=backbone, data_dir=None if data_dir is None else str(data_dir),
                          logdir=str(cache_dir()), name=name, **DEMO_WARMUP)
    finetune.main(cfg)
    return final
