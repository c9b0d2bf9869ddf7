"""Agents for the routing MDP and their registry: ``agents.make("mcts", num_simulations=64)``.

Built-in names: ``mcts``, ``exhaustive`` (every path, exact Q*; small trees), ``ppo``, ``router`` (the learned router, greedy), ``random`` and
``round-robin``. A user's agent is named ``"my_module:MyAgent"`` (importable module, class or
factory); it needs ``act(obs, env)`` (see ``agents/base.py`` for the optional methods).
"""

from __future__ import annotations

import importlib
from typing import Any

from agents.base import Agent, SearchResult, check_agent, rollout, run_agent, summarize

__all__ = ["AGENTS", "Agent", "SearchResult", "check_agent", "factory", "make", "register", "rollout", "run_agent", "summarize"]

#: name -> "module:attribute", imported on first use (PPO pulls in stable-baselines3).
AGENTS: dict[str, str] = {
    "mcts": "agents.mcts:MCTSAgent",
    "exhaustive": "agents.exhaustive:ExhaustiveAgent",
    "ppo": "agents.ppo:PPOAgent",
    "router": "agents.baselines:RouterAgent",
    "random": "agents.baselines:RandomAgent",
    "round-robin": "agents.baselines:RoundRobinAgent",
}


def register(name: str, target: str) -> None:
    """Register ``target`` (``"module:attribute"``) under ``name``."""
    if ":" not in target:
        raise ValueError(f"register({name!r}, {target!r}): target must be 'module:attribute'")
    AGENTS[name] = target


def _resolve(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"cannot import agent module {module!r} (from {spec!r}): {e}") from e
    if not hasattr(mod, attr):
        raise ValueError(f"module {module!r} has no attribute {attr!r} (from agent {spec!r})")
    return getattr(mod, attr)


def factory(name: str) -> Any:
    """The class (or factory) behind a registered name or ``module:Class``."""
    if name in AGENTS:
        return _resolve(AGENTS[name])
    if ":" in name:
        return _resolve(name)
    raise ValueError(f"unknown agent {name!r}; valid: {', '.join(sorted(AGENTS))}, or 'module:Class' for your own")


def make(name: str, **kwargs: Any) -> Any:
    """Build an agent by registered name or ``module:Class``; checks it implements the protocol."""
    factory_ = factory(name)
    try:
        agent = factory_(**kwargs) if callable(factory_) else factory_
    except TypeError as e:
        raise ValueError(f"could not build agent {name!r} with {kwargs}: {e}") from e
    return check_agent(agent, name)
