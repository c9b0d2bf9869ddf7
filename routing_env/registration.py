"""Registered env ids: one per task, all the same ``RoutingEnv``.

The entry points are named, not imported: importing the package loads no torch, and the env package
never imports the training stage (``make_env`` resolves a missing checkpoint to the demo warm-up).
"""

from __future__ import annotations

import gymnasium as gym

__all__ = ["ENV_IDS"]

ENV_IDS = {
    "layermoe-arc": "arc-easy",
    "layermoe-arc-challenge": "arc-challenge",
    "layermoe-obqa": "obqa",
    "layermoe-race": "race",
    "layermoe-mix4": "mix4",  # ARC-Easy + ARC-Challenge + OBQA + RACE (question-first), interleaved
}

for _id, _task in ENV_IDS.items():
    if _id not in gym.registry:
        # make_vec builds the batched env (one model for all sub-envs), not num_envs copies of the model.
        gym.register(id=_id, entry_point="routing_env.training.warmup:make_env",
                     vector_entry_point="routing_env.training.warmup:make_vector_env", kwargs={"task": _task})
