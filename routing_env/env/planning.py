"""The planning interface of ``RoutingEnv``: state handles, batched prefix expansion and path scoring.

Planners (MCTS, users' own) never step the env: they name ``(example, action prefix)`` nodes and
ask for many of them at once. Every uncached group transition among those nodes runs in one
batched forward per group level, so a search over many trees costs one batch per tree depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from routing_env.moe import model_fingerprint

__all__ = ["EnvState", "PlanningMixin"]

Node = tuple[int, tuple]  # (example index, action prefix in the env's hashable action form)


@dataclass
class EnvState:
    """What ``get_state`` returns: cheap to copy (no tensors), enough to resume an episode exactly."""

    example: int
    prefix: tuple
    load_stats: np.ndarray  # [G, E] running expert-assignment counts per group
    episode_loads: np.ndarray  # [G, E] counts of this episode's steps so far
    done: bool = False




class PlanningMixin:
    """``get_state`` / ``set_state``, ``prefetch``, ``evaluate_prefixes`` and ``evaluate_paths``.

    Mixed into ``RoutingEnv``; relies on its ``_boundary`` cache, ``_run_batch`` and rewards.
    """

    # ---- state handles ---------------------------------------------------------------------------
    def get_state(self) -> EnvState:
        return EnvState(self._example, self._prefix, self.load_stats.copy(), self._episode_loads.copy(), self._done)

    def set_state(self, state: EnvState) -> None:
        self._example, self._prefix, self._done = state.example, tuple(state.prefix), state.done
        self.load_stats, self._episode_loads = state.load_stats.copy(), state.episode_loads.copy()
        self._episode_balance = sum(self.balance_reward(g, state.episode_loads[g]) for g in range(len(self._prefix)))

    @property
    def fingerprint(self) -> str:
        """The model's fingerprint (``model_fingerprint``), written into routing-target files."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    # ---- batched transitions ---------------------------------------------------------------------
    def _keyed(self, prefix: Sequence[Any]) -> tuple:
        return tuple(self._action_key(a, g) for g, a in enumerate(prefix))

    def prefetch(self, nodes: Sequence[Node]) -> None:
        """Compute every uncached boundary on the way to ``nodes``: one batched forward per group level."""
        for g in range(self.G):
            todo = list(dict.fromkeys((i, p[: g + 1]) for i, p in nodes if len(p) > g and (i, p[: g + 1]) not in self.cache))
            if not todo:
                continue
            parents = [self._boundary(i, p[:-1])[0] for i, p in todo]
            masks = [self._example_rows(i).rows.attention_mask for i, _ in todo]
            for key, out in zip(todo, self._run_batch(parents, masks, g, [p[-1] for _, p in todo])):
                self.cache.put(key, out)

    def path_loads(self, i: int, prefix: tuple) -> np.ndarray:
        """``[len(prefix), E]`` expert-assignment counts of each routed group of a (keyed) prefix."""
        return np.array([self._boundary(i, prefix[: g + 1])[1] for g in range(len(prefix))]).reshape(len(prefix), self.E)

    def action_priors(self, i: int, prefix: tuple) -> np.ndarray:
        """``[A]`` the learned router's preference over the actions at group ``len(prefix)``.

        ``primary``: its mean expert probabilities (0 for the actions a MoLA group lacks); ``combo``:
        the product of the members' probabilities, renormalised. Undefined in ``bias`` mode (continuous actions).
        """
        return self._priors_from_probs(self.router_probs(i, prefix))

    def _priors_from_probs(self, p: np.ndarray) -> np.ndarray:
        if self.action_mode == "combo":
            p = np.array([np.prod(p[list(c)]) for c in self.combos])
        elif self.action_mode != "primary":
            raise ValueError("action priors need a discrete action mode ('primary' or 'combo'), not 'bias'")
        return np.pad(p / p.sum(), (0, int(self.action_space.n) - len(p)))

    def evaluate_prefixes(self, example_ids: Any, prefixes: Sequence[Sequence[Any]]) -> dict[str, np.ndarray]:
        """Expand many search-tree nodes at once (one batched forward per group level).

        For node ``n`` = ``(example_ids[n], prefixes[n])`` (0 to ``G`` actions) returns, in the
        ``process`` decomposition of the return:

        * ``reward [N]``: the reward of the prefix's last step: its group's balance term against the
          current running loads, plus ``log p(correct)`` when the prefix is complete (0 for ``()``);
        * ``terminal [N]``: whether the prefix routes every group;
        * ``prior [N, A]``: ``action_priors`` at the node (zeros when terminal);
        * ``outcome [N]`` / ``correct [N]``: log p(correct) and correctness (NaN / False if not terminal).

        Running loads are read, never changed.
        """
        ids = [int(i) for i in np.asarray(example_ids).reshape(-1)]
        keyed = [self._keyed(p) for p in prefixes]
        if len(keyed) != len(ids) or any(len(p) > self.G for p in keyed):
            raise ValueError(f"evaluate_prefixes needs one prefix of at most {self.G} actions per example id")
        for i in ids:
            if not 0 <= i < len(self.examples):
                raise ValueError(f"example id {i} is out of range; this split has {len(self.examples)} examples")
        self.prefetch(list(zip(ids, keyed)))
        n = len(ids)
        A = self.action_space.n if hasattr(self.action_space, "n") else self.E
        out = {"reward": np.zeros(n), "terminal": np.zeros(n, bool), "prior": np.zeros((n, A)),
               "outcome": np.full(n, np.nan), "correct": np.zeros(n, bool)}
        probs, logps = self._read_nodes(ids, keyed)
        for m, (i, p) in enumerate(zip(ids, keyed)):
            if p:
                out["reward"][m] = self.balance_reward(len(p) - 1, self._boundary(i, p)[1])
            if len(p) == self.G:
                out["terminal"][m] = True
                out["outcome"][m], out["correct"][m] = self._score(i, logps[m])
                out["reward"][m] += out["outcome"][m]
            else:
                out["prior"][m] = self._priors_from_probs(probs[m])
        return out

    def _read_nodes(self, ids: list[int], keyed: list[tuple]) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        """Router probabilities ``[E]`` of the open nodes and choice log-probabilities ``[C]`` of the
        complete ones, each kind copied from the device in one transfer (not one sync per node)."""
        open_ = {m: self._router_probs_t(i, p) for m, (i, p) in enumerate(zip(ids, keyed)) if len(p) < self.G}
        done = {m: self._choice_logp_t(i, p) for m, (i, p) in enumerate(zip(ids, keyed)) if len(p) == self.G}
        out = []
        for part in (open_, done):
            if not part:
                out.append({})
                continue
            host = torch.cat(list(part.values())).cpu().numpy()
            sizes = np.cumsum([t.numel() for t in part.values()])[:-1]
            out.append(dict(zip(part, np.split(host, sizes))))
        return out[0], out[1]

    def evaluate_paths(self, example_ids: Any, paths: Any) -> dict[str, np.ndarray]:
        """Score complete paths, one batched forward per group over all paths' uncached prefixes.

        ``paths``: ``[N, G]`` actions (``[N, G, E]`` in bias mode). Returns ``outcome [N]`` (log p of
        the correct answer), ``correct [N]``, ``loads [N, G, E]``, ``balance [N]`` (the balance
        reward against the current running loads, which this call does not change), and, for
        analyses that need every choice (``routing_env.search.gate``), ``logp`` (``N`` arrays ``[C_i]`` of
        the choices' log-probabilities) and ``answer [N]`` (the correct choice's index in them).
        """
        ids = [int(i) for i in np.asarray(example_ids).reshape(-1)]
        keyed = [self._keyed(p) for p in paths]
        if len(keyed) != len(ids) or any(len(p) != self.G for p in keyed):
            raise ValueError(f"evaluate_paths needs one path of {self.G} actions per example id")
        self.prefetch(list(zip(ids, keyed)))
        outcome, correct = np.zeros(len(ids)), np.zeros(len(ids), bool)
        loads = np.zeros((len(ids), self.G, self.E))
        _, logps = self._read_nodes(ids, keyed)
        for n, (i, p) in enumerate(zip(ids, keyed)):
            outcome[n], correct[n] = self._score(i, logps[n])
            loads[n] = self.path_loads(i, p)
        balance = np.array([sum(self.balance_reward(g, l[g]) for g in range(self.G)) for l in loads])
        answer = np.array([self._example_rows(i).answer_row for i in ids], dtype=int)
        return {"outcome": outcome, "correct": correct, "loads": loads, "balance": balance,
                "logp": [logps[n] for n in range(len(ids))], "answer": answer}

    def finish_episode(self, loads: np.ndarray) -> None:
        """Add a finished path's ``[G, E]`` loads to the running statistics, as ending an episode does.

        For planners that choose paths without stepping (``train_rl.py`` after a search)."""
        loads = np.asarray(loads, dtype=float)
        if loads.shape != (self.G, self.E):
            raise ValueError(f"loads must be [G, E] = [{self.G}, {self.E}], got {list(loads.shape)}")
        self.load_stats += loads
