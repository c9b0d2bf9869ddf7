"""The agent protocol, what a search returns, and running an act-only agent through episodes.

An agent needs one method, ``act(obs, env) -> action``. It may also offer:

* ``policy(obs, env) -> [A]`` its action distribution (becomes the group's routing target; agents
  without it give a one-hot target of the action they took);
* ``search(env, example_ids) -> list[SearchResult]`` its own planning over many examples (MCTS);
* ``fit(env, seed)`` training before it is used (PPO);
* ``config() -> dict`` its settings, written into the routing-targets file.

The env they run on is a ``routing_env.env.RoutingMDP`` (``RoutingEnv``, ``SyntheticRoutingEnv``, or your
own backend subclassing it): the agents read its reward terms as it reports them (``info["return_terms"]``
at an episode's end, the ``reward`` / ``outcome`` / ``balance`` of ``evaluate_paths``) rather than adding
them up themselves, so a reward term added to the env reaches every agent.

Randomness: a stochastic agent draws each example's choices from a generator of (its seed, the
example index, the group) only (``example_rng``), never from one stream over the run. A search that
is killed and rerun resumes after the finished examples; with one stream the rerun would restart it
at the seed and every later example would be searched differently than without the kill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = ["Agent", "AgentError", "SearchResult", "action_widths", "check_agent", "current_example", "current_group",
           "example_rng",
           "rollout", "run_agent", "summarize"]


class AgentError(ValueError, TypeError):
    """An object that does not implement the agent protocol.

    A ``ValueError``, so the command line reports it as one ``error:`` line (a user's bad input,
    exit status 2); also a ``TypeError``, which is what it was before, so ``except TypeError`` still
    catches it.
    """


@runtime_checkable
class Agent(Protocol):
    def act(self, obs: np.ndarray, env: Any) -> Any: ...


@dataclass
class SearchResult:
    """One example's routing decision: the contract between agents and the routing-targets file."""

    example: int  # index into the env's split
    targets: np.ndarray  # [G, A] target distribution over actions per group
    values: np.ndarray  # [G, A] process value (Q) of each action per group; NaN = not estimated
    path: np.ndarray  # [G] chosen actions
    outcome: float  # log p(correct answer) of the chosen path
    correct: bool
    loads: np.ndarray  # [G, E] expert-assignment counts of the chosen path
    balance: float  # sum of the path's balance rewards
    extra: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        """The path's return: ``outcome + balance`` (the env's ``RewardTerms.total`` of the whole episode)."""
        return self.outcome + self.balance

    @classmethod
    def scored(cls, example: int, targets: np.ndarray, values: np.ndarray, path: Sequence[int], scores: dict, n: int,
               extra: dict | None = None) -> "SearchResult":
        """A result whose path was scored by ``env.evaluate_paths`` (its row ``n`` of ``scores``): the
        outcome, correctness, loads and reward terms are read here, in one place, for every agent."""
        return cls(example=example, targets=targets, values=values, path=np.array(path),
                   outcome=float(scores["outcome"][n]), correct=bool(scores["correct"][n]), loads=scores["loads"][n],
                   balance=float(scores["balance"][n]), extra=extra or {})


def action_widths(env: Any) -> list[int]:
    """``[G]`` valid actions per group, ``[0, widths[g])``: fewer than ``action_space.n`` in a MoLA
    model's lower groups (``env.num_actions``); all of them for an env without that method."""
    n = int(env.action_space.n)
    return [env.num_actions(g) if hasattr(env, "num_actions") else n for g in range(env.G)]


def example_rng(seed: int, example: int, group: int | None = None) -> np.random.Generator:
    """The generator of one example's (and group's) random choices: a function of these numbers only.

    Seeding per example, not one stream per run, is what makes a resumed search equal an
    uninterrupted one (and a batch's draws independent of which examples share it).
    """
    key = [int(seed), int(example)] + ([] if group is None else [int(group)])
    if min(key) < 0:
        raise ValueError(f"seed, example and group must be >= 0 to seed a generator, got seed={seed}, "
                         f"example={example}, group={group}")
    return np.random.default_rng(key)


def current_group(obs: np.ndarray, env: Any) -> int:
    """The layer group an observation is at: its leading group one-hot (``[G]`` of the env's observation)."""
    return int(np.argmax(obs[: getattr(env, "unwrapped", env).G]))


def current_example(env: Any) -> int:
    """The example index of the env's current episode (a ``RoutingEnv``, a wrapper of one, or the synthetic env)."""
    base = getattr(env, "unwrapped", env)
    if callable(getattr(base, "get_state", None)):
        return int(base.get_state().example)
    return int(base._example)


def check_agent(agent: Any, name: str = "agent") -> Any:
    """Refuse an object that does not implement the protocol, naming what is missing (``AgentError``).

    Works on a class too (its methods are attributes of the class), so a ``module:Class`` can be
    checked before it is built, and before any model loads.
    """
    what = agent.__name__ if isinstance(agent, type) else type(agent).__name__
    if not callable(getattr(agent, "act", None)) and not callable(getattr(agent, "search", None)):
        raise AgentError(f"{name} ({what}) does not implement the agent protocol: it needs a method "
                         "act(obs, env) -> action (or search(env, example_ids) -> list of SearchResult; optionally "
                         "policy, fit, config); see agents/base.py and the README's 'Your own agent'")
    for opt in ("policy", "search", "fit", "config"):
        if hasattr(agent, opt) and not callable(getattr(agent, opt)):
            raise AgentError(f"{name} ({what}): {opt} must be a method, got {type(getattr(agent, opt)).__name__}")
    return agent


def rollout(agent: Any, env: Any, example_ids: Sequence[int]) -> list[SearchResult]:
    """Run one episode per example with ``agent.act``; targets from ``agent.policy`` or one-hot."""
    results = []
    A = int(env.action_space.n)
    policy = getattr(agent, "policy", None)
    for i in example_ids:
        obs, _ = env.reset(options={"example": int(i)})
        targets, path, done = np.zeros((env.G, A)), [], False
        info: dict = {}
        while not done:
            g = len(path)
            action = agent.act(obs, env)
            if policy is not None:
                targets[g] = np.asarray(policy(obs, env), dtype=float)
            else:
                targets[g, int(action)] = 1.0
            obs, _, done, _, info = env.step(action)
            path.append(int(action))
        episode = info["return_terms"]  # the whole episode's reward terms, whatever the env's reward_mode
        results.append(SearchResult(example=int(i), targets=targets, values=np.full((env.G, A), np.nan),
                                    path=np.array(path), outcome=float(episode["outcome"]), correct=bool(info["correct"]),
                                    loads=info["group_loads"], balance=episode["balance"]))
    return results


def run_agent(agent: Any, env: Any, example_ids: Sequence[int]) -> list[SearchResult]:
    """An agent's results on ``example_ids``: its own ``search`` if it has one, else ``rollout``."""
    search = getattr(agent, "search", None)
    results = search(env, list(example_ids)) if search is not None else rollout(agent, env, example_ids)
    if len(results) != len(example_ids):
        raise ValueError(f"{type(agent).__name__}.search returned {len(results)} results for {len(example_ids)} examples")
    return results


def summarize(results: Sequence[SearchResult], group_experts: Sequence[int] | None = None) -> dict:
    """Outcome and balance of a set of chosen paths.

    ``load_share [G][E]`` sums the paths' expert-assignment counts per group; ``cv`` / ``max_over_mean``
    / ``norm_entropy`` are per group over those shares (``cv_mean`` their mean over groups), over
    the group's own ``group_experts[g]`` experts when given (a MoLA model's lower groups have fewer).
    """
    from routing_env.moe.routing import load_stats

    loads = np.sum([r.loads for r in results], axis=0)  # [G, E]
    widths = list(group_experts) if group_experts is not None else [loads.shape[1]] * len(loads)
    stats = [load_stats(row[:w]) for row, w in zip(loads, widths)]
    return {
        "examples": len(results),
        "outcome_mean": float(np.mean([r.outcome for r in results])),
        "accuracy": float(np.mean([r.correct for r in results])),
        "return_mean": float(np.mean([r.total for r in results])),
        "load_share": [s.loads for s in stats],
        "cv": [s.cv for s in stats],
        "cv_mean": float(np.mean([s.cv for s in stats])),
        "max_over_mean": [s.max_over_mean for s in stats],
        "norm_entropy": [s.norm_entropy for s in stats],
    }
