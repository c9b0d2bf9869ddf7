"""The routing MDP, written once: episode state, rewards, observations and the planning interface.

``RoutingMDP`` is everything about the env that does not depend on where transitions come from. A
backend supplies only transitions, priors and scores: ``RoutingEnv`` (``model``) runs a LoRA-MoE
checkpoint group by group, ``SyntheticRoutingEnv`` (``synthetic``) reads closed-form tables. Its hooks:

* ``_loads(i, prefix) -> [E]``: the transition, the expert-assignment counts of the prefix's last group;
* ``prefetch(nodes)``: compute many nodes' transitions at once (optional; default: nothing to batch);
* ``router_probs(i, prefix) -> [E_g]``: the learned router's probabilities at group ``len(prefix)``;
* ``_features(i, prefix) -> [P]``: the observation's features of a state;
* ``_path_scores(i, path)`` and ``_score(i, scores) -> (log p(correct), correct)``: a complete path's outcome;
* optionally ``_read_nodes`` (many nodes' probabilities and scores at once), ``_priors_from_probs``
  (action priors) and ``_path_details`` (a backend's extra ``evaluate_paths`` keys).

Planners (MCTS, users' own) never step the env: they name ``(example, action prefix)`` nodes and ask
for many at once (``evaluate_prefixes``, ``evaluate_paths``), which a backend may batch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

__all__ = ["ACTION_MODES", "REWARD_MODES", "EnvState", "Node", "RewardTerms", "RoutingMDP", "check_modes"]

ACTION_MODES = ("primary", "combo", "bias")
REWARD_MODES = ("outcome", "process")

Node = tuple[int, tuple]  # (example index, action prefix in the env's hashable action form)


def check_modes(action_mode: str, reward_mode: str) -> None:
    if action_mode not in ACTION_MODES:
        raise ValueError(f"unknown action_mode {action_mode!r}; valid: {', '.join(ACTION_MODES)}")
    if reward_mode not in REWARD_MODES:
        raise ValueError(f"unknown reward_mode {reward_mode!r}; valid: {', '.join(REWARD_MODES)}")


@dataclass
class EnvState:
    """What ``get_state`` returns: cheap to copy (no tensors), enough to resume an episode exactly."""

    example: int
    prefix: tuple
    load_stats: np.ndarray  # [G, E] running expert-assignment counts per group
    episode_loads: np.ndarray  # [G, E] counts of this episode's steps so far
    done: bool = False


@dataclass(frozen=True)
class RewardTerms:
    """A reward term by term: ``total = outcome + balance``, the outcome only where it is paid.

    Works on floats and on arrays alike (``evaluate_paths`` adds its ``[N]`` terms here too).
    """

    balance: Any = 0.0  # the balance term(s) paid
    outcome: Any = None  # log p(correct answer); None: not paid with this reward

    @property
    def total(self) -> Any:
        return self.balance if self.outcome is None else self.outcome + self.balance

    def as_dict(self) -> dict[str, float]:
        return {**({} if self.outcome is None else {"outcome": self.outcome}), "balance": self.balance,
                "total": self.total}


class RoutingMDP(gym.Env):
    """The routing MDP over ``G`` layer groups and ``E`` experts; a backend supplies the hooks above."""

    metadata = {"render_modes": []}

    def _init_mdp(self, group_experts: Sequence[int], k: int, action_mode: str, reward_mode: str,
                  balance_weight: float, obs_proj_dim: int) -> None:
        """Spaces, running loads and an ended episode, once the backend knows its groups' expert counts."""
        self.G, self.group_experts, self.k = len(group_experts), list(group_experts), k
        self.E = max(self.group_experts)  # the width of actions, priors, loads and observations
        self.action_mode, self.reward_mode, self.balance_weight = action_mode, reward_mode, balance_weight
        self.combos = list(itertools.combinations(range(self.E), self.k))
        if action_mode == "primary":
            self.action_space = spaces.Discrete(self.E)
        elif action_mode == "combo":
            self.action_space = spaces.Discrete(len(self.combos))
        else:
            self.action_space = spaces.Box(-1.0, 1.0, (self.E,), np.float32)
        n_obs = self.G + 2 * self.E + obs_proj_dim
        low = np.concatenate([np.zeros(self.G + 2 * self.E), -np.ones(obs_proj_dim)]).astype(np.float32)
        self.observation_space = spaces.Box(low, np.ones(n_obs, np.float32), dtype=np.float32)
        self.load_stats = np.zeros((self.G, self.E))  # [G, E] running counts; explicit, saved in get_state
        self._example, self._prefix, self._done = 0, (), True
        self._episode_loads = np.zeros((self.G, self.E))
        self._episode_balance = 0.0  # balance rewards of this episode so far (paid at the end in outcome mode)

    # ---- what a backend supplies -----------------------------------------------------------------
    def _loads(self, i: int, prefix: tuple) -> np.ndarray:
        """``[E]`` expert-assignment counts of group ``len(prefix) - 1`` after routing ``prefix``."""
        raise NotImplementedError

    def prefetch(self, nodes: Sequence[Node]) -> None:
        """Compute the transitions on the way to many ``nodes`` at once (nothing to batch by default)."""

    def router_probs(self, i: int, prefix: tuple) -> np.ndarray:
        """``[E_g]`` the learned router's mean probabilities for group ``len(prefix)``."""
        raise NotImplementedError

    def _features(self, i: int, prefix: tuple) -> np.ndarray:
        """``[P]`` the observation's features of the state ``(i, prefix)``."""
        raise NotImplementedError

    def _path_scores(self, i: int, path: tuple) -> Any:
        """What ``_score`` reads of a complete path (the model backend: ``[C]`` choice log-probabilities)."""
        raise NotImplementedError

    def _score(self, i: int, scores: Any) -> tuple[float, bool]:
        """``(log p(correct), correct)`` from a complete path's ``_path_scores``."""
        raise NotImplementedError

    def _read_nodes(self, ids: list[int], keyed: list[tuple]) -> tuple[dict[int, np.ndarray], dict[int, Any]]:
        """Router probabilities of the open nodes and ``_path_scores`` of the complete ones, by position."""
        probs = {m: self.router_probs(i, p) for m, (i, p) in enumerate(zip(ids, keyed)) if len(p) < self.G}
        scores = {m: self._path_scores(i, p) for m, (i, p) in enumerate(zip(ids, keyed)) if len(p) == self.G}
        return probs, scores

    def _priors_from_probs(self, p: np.ndarray) -> np.ndarray:
        """``[A]`` action priors from router probabilities ``[E_g]``: ``primary`` renormalised, ``combo``
        the product of the members' probabilities, renormalised (0 for the actions a MoLA group lacks)."""
        if self.action_mode == "combo":
            p = np.array([np.prod(p[list(c)]) for c in self.combos])
        elif self.action_mode != "primary":
            raise ValueError("action priors need a discrete action mode ('primary' or 'combo'), not 'bias'")
        return np.pad(p / p.sum(), (0, int(self.action_space.n) - len(p)))

    def _path_details(self, ids: list[int], scores: dict[int, Any]) -> dict[str, Any]:
        """A backend's extra ``evaluate_paths`` keys (none by default)."""
        return {}

    # ---- actions ---------------------------------------------------------------------------------
    def num_actions(self, g: int) -> int:
        """Valid actions at group ``g``: ``[0, num_actions(g))`` (fewer than ``action_space.n`` in a MoLA model's lower groups)."""
        return self.group_experts[g] if self.action_mode == "primary" else int(self.action_space.n)

    def action_masks(self) -> np.ndarray:
        """``[A]`` bool: the actions valid at the current step (sb3-contrib's ``MaskablePPO`` convention)."""
        mask = np.zeros(self.action_space.n, bool)
        mask[: self.num_actions(min(len(self._prefix), self.G - 1))] = True
        return mask

    def _action_key(self, action: Any, group: int | None = None) -> int | tuple:
        """Validate an action (at ``group``, when given) and return its hashable form (the cache key's path element)."""
        if self.action_mode == "bias":
            a = np.asarray(action, dtype=np.float32)
            if a.shape != (self.E,) or not np.all(np.isfinite(a)) or not self.action_space.contains(a):
                raise ValueError(f"bias action must be {self.E} finite floats in [-1, 1], got {action!r}")
            return tuple(float(x) for x in a)
        key = action
        if type(key) is not int:  # a search's own keys are ints already: no array conversion (~2 us a node)
            a = np.asarray(action)
            key = int(a) if a.ndim == 0 and np.issubdtype(a.dtype, np.integer) else -1
        if not 0 <= key < self.action_space.n:
            raise ValueError(f"{self.action_mode} action must be an integer in [0, {self.action_space.n}), got {action!r}")
        if group is not None and group < self.G and key >= self.num_actions(group):
            raise ValueError(f"group {group} has {self.num_actions(group)} experts (per group: {self.group_experts}): "
                             f"its action must be an integer in [0, {self.num_actions(group)}), got {key} "
                             "(env.action_masks() gives the valid actions)")
        return key

    def _keyed(self, prefix: Sequence[Any]) -> tuple:
        return tuple(self._action_key(a, g) for g, a in enumerate(prefix))

    # ---- observation and rewards -----------------------------------------------------------------
    def _observation(self) -> np.ndarray:
        """group one-hot ``[G]`` | router probabilities ``[E]`` | running load shares ``[E]`` | features ``[P]``."""
        g = len(self._prefix)
        obs = np.zeros(self.observation_space.shape, np.float32)
        obs[self.G + 2 * self.E :] = self._features(self._example, self._prefix)
        if g < self.G:
            obs[g] = 1.0
            probs = self.router_probs(self._example, self._prefix)
            obs[self.G : self.G + len(probs)] = probs
            obs[self.G + self.E : self.G + 2 * self.E] = self._load_share(g)
        return np.clip(obs, self.observation_space.low, self.observation_space.high)

    def _load_share(self, g: int) -> np.ndarray:
        """``[E]`` running load shares of group ``g`` (uniform before any load; 0 beyond a MoLA group's experts)."""
        total, E = self.load_stats[g].sum(), self.group_experts[g]
        return self.load_stats[g] / total if total > 0 else np.pad(np.full(E, 1.0 / E), (0, self.E - E))

    def balance_reward(self, g: int, counts: np.ndarray) -> float:
        """``-w E sum_e p_e (s_e - 1/E)``: what routing ``counts [E]`` in group ``g`` costs for balance (E: the group's)."""
        E = self.group_experts[g]
        p = counts[:E] / max(counts.sum(), 1.0)
        return float(-self.balance_weight * E * np.dot(p, self._load_share(g)[:E] - 1.0 / E))

    def outcome(self, i: int, path: tuple) -> tuple[float, bool]:
        """``(log p(correct), correct)`` of a complete path."""
        return self._score(i, self._path_scores(i, path))

    def _example_id(self, i: int) -> str:
        ex = self.examples[i]
        return getattr(ex, "id", ex)

    # ---- Gymnasium API ---------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        options = options or {}
        if "example" in options:
            i = int(options["example"])
            if not 0 <= i < len(self.examples):
                raise ValueError(f"options['example']={i} is out of range; this split has {len(self.examples)} examples")
        else:
            i = int(self.np_random.integers(len(self.examples)))
        self._example, self._prefix, self._done = i, (), False
        self._episode_loads = np.zeros((self.G, self.E))
        self._episode_balance = 0.0
        return self._observation(), {"example": i, "id": self._example_id(i)}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        """One group routed. ``info``: this step's ``balance_reward``, ``reward_terms`` (what ``reward`` is
        made of) and, at the end, ``outcome``, ``correct`` and ``return_terms`` (the whole episode's terms)."""
        if self._done:
            raise ValueError("step() called after the episode ended; call reset() first")
        g = len(self._prefix)
        key = self._action_key(action, g)
        self._prefix = self._prefix + (key,)
        counts = self._loads(self._example, self._prefix)
        self._episode_loads[g] = counts
        r_bal = self.balance_reward(g, counts)
        terminated = len(self._prefix) == self.G
        info: dict[str, Any] = {"example": self._example, "id": self._example_id(self._example),
                                "path": list(self._prefix), "group_loads": self._episode_loads.copy(),
                                "balance_reward": r_bal}
        self._episode_balance += r_bal
        process = self.reward_mode == "process"  # balance paid each step; else all of it at the end
        if terminated:
            logp, correct = self.outcome(self._example, self._prefix)
            terms = RewardTerms(r_bal if process else self._episode_balance, logp)
            info.update(outcome=logp, correct=correct, return_terms=RewardTerms(self._episode_balance, logp).as_dict())
            self.load_stats += self._episode_loads
            self._done = True
        else:
            terms = RewardTerms(r_bal if process else 0.0)
        info["reward_terms"] = terms.as_dict()
        return self._observation(), float(terms.total), terminated, False, info

    # ---- state handles ---------------------------------------------------------------------------
    def get_state(self) -> EnvState:
        return EnvState(self._example, self._prefix, self.load_stats.copy(), self._episode_loads.copy(), self._done)

    def set_state(self, state: EnvState) -> None:
        self._example, self._prefix, self._done = state.example, tuple(state.prefix), state.done
        self.load_stats, self._episode_loads = state.load_stats.copy(), state.episode_loads.copy()
        self._episode_balance = sum(self.balance_reward(g, state.episode_loads[g]) for g in range(len(self._prefix)))

    # ---- planning: many nodes at once ------------------------------------------------------------
    def path_loads(self, i: int, prefix: tuple) -> np.ndarray:
        """``[len(prefix), E]`` expert-assignment counts of each routed group of a (keyed) prefix."""
        return np.array([self._loads(i, prefix[: g + 1]) for g in range(len(prefix))]).reshape(len(prefix), self.E)

    def action_priors(self, i: int, prefix: tuple) -> np.ndarray:
        """``[A]`` the learned router's preference over the actions at group ``len(prefix)``.

        ``primary``: its mean expert probabilities (0 for the actions a MoLA group lacks); ``combo``:
        the product of the members' probabilities, renormalised. Undefined in ``bias`` mode (continuous actions).
        """
        return self._priors_from_probs(self.router_probs(i, prefix))

    def _check_ids(self, ids: list[int]) -> None:
        for i in ids:
            if not 0 <= i < len(self.examples):
                raise ValueError(f"example id {i} is out of range; this split has {len(self.examples)} examples")

    def evaluate_prefixes(self, example_ids: Any, prefixes: Sequence[Sequence[Any]]) -> dict[str, np.ndarray]:
        """Expand many search-tree nodes at once (a backend batches their transitions).

        For node ``n`` = ``(example_ids[n], prefixes[n])`` (0 to ``G`` actions) returns, in the
        ``process`` decomposition of the return:

        * ``reward [N]``: the reward of the prefix's last step, ``RewardTerms.total`` of: ``balance [N]``,
          its group's balance term against the current running loads (0 for ``()``), plus
          ``outcome [N]``, ``log p(correct)``, when the prefix is complete;
        * ``terminal [N]``: whether the prefix routes every group;
        * ``prior [N, A]``: ``action_priors`` at the node (zeros when terminal);
        * ``outcome [N]`` / ``correct [N]``: log p(correct) and correctness (NaN / False if not terminal).

        Running loads are read, never changed.
        """
        ids = [int(i) for i in np.asarray(example_ids).reshape(-1)]
        keyed = [self._keyed(p) for p in prefixes]
        if len(keyed) != len(ids) or any(len(p) > self.G for p in keyed):
            raise ValueError(f"evaluate_prefixes needs one prefix of at most {self.G} actions per example id")
        self._check_ids(ids)
        self.prefetch(list(zip(ids, keyed)))
        n = len(ids)
        A = self.action_space.n if hasattr(self.action_space, "n") else self.E
        out = {"reward": np.zeros(n), "balance": np.zeros(n), "terminal": np.zeros(n, bool), "prior": np.zeros((n, A)),
               "outcome": np.full(n, np.nan), "correct": np.zeros(n, bool)}
        probs, scores = self._read_nodes(ids, keyed)
        for m, (i, p) in enumerate(zip(ids, keyed)):
            terms = RewardTerms(self.balance_reward(len(p) - 1, self._loads(i, p)) if p else 0.0)
            if len(p) == self.G:
                out["terminal"][m] = True
                out["outcome"][m], out["correct"][m] = self._score(i, scores[m])
                terms = RewardTerms(terms.balance, float(out["outcome"][m]))
            else:
                out["prior"][m] = self._priors_from_probs(probs[m])
            out["balance"][m], out["reward"][m] = terms.balance, terms.total
        return out

    def evaluate_paths(self, example_ids: Any, paths: Any) -> dict[str, np.ndarray]:
        """Score complete paths (a backend batches all paths' uncached transitions).

        ``paths``: ``[N, G]`` actions (``[N, G, E]`` in bias mode). Returns ``outcome [N]`` (log p of
        the correct answer), ``correct [N]``, ``loads [N, G, E]``, ``balance [N]`` (the balance
        reward against the current running loads, which this call does not change), ``reward [N]``
        (the path's return, ``RewardTerms.total``: outcome + balance) and the backend's details (the
        model's: for analyses that need every choice (``routing_env.search.gate``), ``logp``, ``N``
        arrays ``[C_i]`` of the choices' log-probabilities, and ``answer [N]``, the correct choice's index in them).
        """
        ids = [int(i) for i in np.asarray(example_ids).reshape(-1)]
        keyed = [self._keyed(p) for p in paths]
        if len(keyed) != len(ids) or any(len(p) != self.G for p in keyed):
            raise ValueError(f"evaluate_paths needs one path of {self.G} actions per example id")
        self.prefetch(list(zip(ids, keyed)))
        outcome, correct = np.zeros(len(ids)), np.zeros(len(ids), bool)
        loads = np.zeros((len(ids), self.G, self.E))
        _, scores = self._read_nodes(ids, keyed)
        for n, (i, p) in enumerate(zip(ids, keyed)):
            outcome[n], correct[n] = self._score(i, scores[n])
            loads[n] = self.path_loads(i, p)
        balance = np.array([sum(self.balance_reward(g, l[g]) for g in range(self.G)) for l in loads])
        return {"outcome": outcome, "correct": correct, "loads": loads, "balance": balance,
                "reward": RewardTerms(balance, outcome).total, **self._path_details(ids, scores)}

    def finish_episode(self, loads: np.ndarray) -> None:
        """Add a finished path's ``[G, E]`` loads to the running statistics, as ending an episode does.

        For planners that choose paths without stepping (``train_rl.py`` after a search)."""
        loads = np.asarray(loads, dtype=float)
        if loads.shape != (self.G, self.E):
            raise ValueError(f"loads must be [G, E] = [{self.G}, {self.E}], got {list(loads.shape)}")
        self.load_stats += loads
