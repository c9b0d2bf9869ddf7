"""Agents for the routing MDP and their registry: ``agents.make("mcts", num_simulations=64)``.

Built-in names: ``mcts``, ``exhaustive`` (every path, exact Q*; small trees), ``ppo``, ``router`` (the learned router, greedy), ``random``,
``round-robin`` and ``known-route`` (the generated routing control's tag -> expert route). A user's agent is named ``"my_module:MyAgent"`` (an importable module) or
``"path/to/my_agents.py:MyAgent"`` (a file anywhere, relative or absolute), a class or factory;
it needs ``act(obs, env)`` (see ``agents/base.py`` for the optional methods).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

from agents.base import (Agent, AgentError, SearchResult, check_agent, current_example, example_rng, rollout, run_agent,
                         summarize)

__all__ = ["AGENTS", "Agent", "AgentError", "SearchResult", "check_agent", "check_factory", "current_example",
           "example_rng", "factory", "make", "register", "rollout", "run_agent", "short_name", "summarize"]

#: name -> "module:attribute", imported on first use (PPO pulls in stable-baselines3).
AGENTS: dict[str, str] = {
    "mcts": "agents.mcts:MCTSAgent",
    "exhaustive": "agents.exhaustive:ExhaustiveAgent",
    "ppo": "agents.ppo:PPOAgent",
    "router": "agents.baselines:RouterAgent",
    "random": "agents.baselines:RandomAgent",
    "round-robin": "agents.baselines:RoundRobinAgent",
    "known-route": "agents.known_route:KnownRouteAgent",
}


def register(name: str, target: str) -> None:
    """Register ``target`` (``"module:attribute"``) under ``name``."""
    if ":" not in target:
        raise ValueError(f"register({name!r}, {target!r}): target must be 'module:attribute'")
    AGENTS[name] = target


def _split(spec: str) -> tuple[str, str]:
    """``"module:attr"`` or ``"path/to/file.py:attr"`` -> (module or path, attribute); the last ``:`` splits,
    so a Windows drive letter stays with the path."""
    where, _, attr = spec.rpartition(":")
    return where, attr


def _is_file(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def _import_file(path_text: str, spec: str) -> Any:
    """Import a .py file anywhere, once per resolved path, under a name of its own.

    The module name carries a hash of the file's absolute path: two ``my_agents.py`` in different
    folders are two modules, and neither shadows an installed module of that name. It is put in
    ``sys.modules`` before it runs, as an import would, so dataclasses and pickling in it work.
    """
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"agent file {path} does not exist (from {spec!r}); give an existing .py file, "
                         "relative to the current folder or absolute: path/to/file.py:Class")
    name = f"_routing_gym_agent_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"cannot import agent file {path} (from {spec!r}): not a Python source file")
    mod = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = mod
    try:
        module_spec.loader.exec_module(mod)
    except (ImportError, SyntaxError) as e:  # the file's own error; other exceptions are bugs to see in full
        del sys.modules[name]
        raise ValueError(f"cannot import agent file {path} (from {spec!r}): {type(e).__name__}: {e}") from e
    except BaseException:
        del sys.modules[name]
        raise
    return mod


def _resolve(spec: str) -> Any:
    where, attr = _split(spec)
    if not where or not attr:
        raise ValueError(f"agent {spec!r} must be 'module:Class' or 'path/to/file.py:Class'")
    if _is_file(where):
        mod, label = _import_file(where, spec), f"agent file {where!r}"
    else:
        try:
            mod = importlib.import_module(where)
        except ImportError as e:
            stem = where.rsplit(".", 1)[-1]
            raise ValueError(f"cannot import agent module {where!r} (from {spec!r}): {e}; give the file instead, "
                             f"--agent path/to/{stem}.py:{attr}, or put the folder that holds {stem}.py on PYTHONPATH "
                             f"(PYTHONPATH=path/to python train_rl.py --agent {spec})") from e
        label = f"module {where!r}"
    if not hasattr(mod, attr):
        raise ValueError(f"{label} has no attribute {attr!r} (from agent {spec!r})")
    return getattr(mod, attr)


def factory(name: str) -> Any:
    """The class (or factory) behind a registered name, ``module:Class`` or ``path/to/file.py:Class``."""
    if name in AGENTS:
        return _resolve(AGENTS[name])
    if ":" in name:
        return _resolve(name)
    if name.endswith(".py"):
        raise ValueError(f"agent {name!r} is a file: name the class: {name}:ClassName")
    raise ValueError(f"unknown agent {name!r}; valid: {', '.join(sorted(AGENTS))}, or 'module:Class' or "
                     "'path/to/file.py:Class' for your own")


def check_factory(factory_: Any, name: str, kwargs: dict | None = None) -> Any:
    """What can be checked of an agent before it is built: a class implements the protocol
    (``AgentError``), and ``kwargs`` are arguments its constructor takes (``ValueError``).

    A factory function can only be checked once it has built its agent (``make`` does).
    """
    if isinstance(factory_, type):
        check_agent(factory_, name)
    elif not callable(factory_):
        check_agent(factory_, name)  # an agent object itself
        return factory_
    try:
        sig = inspect.signature(factory_)
    except (TypeError, ValueError):  # no signature to read (a builtin): left to the call
        return factory_
    try:
        sig.bind_partial(**(kwargs or {}))
    except TypeError as e:
        takes = ", ".join(n for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        raise ValueError(f"could not build agent {name!r} with {kwargs}: {e}; it takes: {takes or 'no arguments'}") from e
    return factory_


def short_name(name: str) -> str:
    """``name`` as one folder-name component: ``"path/to/my_agents.py:Cls"`` -> ``"my_agents.Cls"``."""
    where, attr = _split(name)
    if ":" in name and _is_file(where):
        return f"{Path(where).stem}.{attr}"
    return name.replace(":", ".")


def make(name: str, **kwargs: Any) -> Any:
    """Build an agent by registered name, ``module:Class`` or ``path/to/file.py:Class``; checks it
    implements the protocol (``AgentError``, a ``ValueError`` and ``TypeError``, when not)."""
    factory_ = check_factory(factory(name), name)
    try:
        agent = factory_(**kwargs) if callable(factory_) else factory_
    except TypeError as e:
        raise ValueError(f"could not build agent {name!r} with {kwargs}: {e}") from e
    return check_agent(agent, name)
