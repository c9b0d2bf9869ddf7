"""Registered env ids: one per task, all the same ``RoutingEnv``."""

from __future__ import annotations

import gymnasium as gym

__all__ = ["ENV_IDS"]

ENV_IDS = {
    "layermoe-arc": "arc-easy",
    "layermoe-arc-challenge": "arc-challenge",
    "layermoe-obqa": "obqa",
    "layermoe-race": "race",
}

for _id, _task in ENV_IDS.items():
    if _id not in gym.registry:
        gym.register(id=_id, entry_point="routing_env.env:RoutingEnv", kwargs={"task": _task})
