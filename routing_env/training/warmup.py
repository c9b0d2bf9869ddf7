"""The cached warm-up checkpoint an env uses when it is given none (trained once, demo size).

The registered env ids' entry points are here (``make_env``, ``make_vector_env``): training a model is
a training-stage job, so the env package never imports this module; the ids reach it by name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from routing_env.data import TaskSource, resolve_task

__all__ = ["cache_dir", "default_checkpoint", "DEMO_WARMUP", "make_env", "make_vector_env"]

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
    from routing_env.training import finetune  # imported here: finetune builds on modules that import this one

    cfg = finetune.Config(**source.args(), backbone=backbone, data_dir=None if data_dir is None else str(data_dir),
                          logdir=str(cache_dir()), name=name, **DEMO_WARMUP)
    finetune.main(cfg)
    return final


def _resolve_default(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint=None`` (and no ``model``) -> a resolver the env calls once its arguments and data are checked."""
    if kwargs.get("checkpoint") is None and kwargs.get("model") is None:
        data_dir = kwargs.get("data_dir")
        kwargs = {**kwargs, "checkpoint": lambda source: default_checkpoint(source, data_dir=data_dir)}
    return kwargs


def make_env(**kwargs: Any):
    """The registered ids' entry point: ``RoutingEnv(**kwargs)``, the demo warm-up standing in for a missing checkpoint."""
    from routing_env.env import RoutingEnv

    return RoutingEnv(**_resolve_default(kwargs))


def make_vector_env(num_envs: int = 8, **kwargs: Any):
    """The registered ids' vector entry point (``gymnasium.make_vec``): one model for all sub-envs."""
    from routing_env.env import RoutingVectorEnv

    env_kwargs = {k: v for k, v in kwargs.items() if k not in ("autoreset_mode", "env")}
    rest = {k: v for k, v in kwargs.items() if k in ("autoreset_mode", "env")}
    return RoutingVectorEnv(num_envs, **rest, **_resolve_default(env_kwargs))
