"""``RoutingVectorEnv``: many routing episodes stepped together, one batched group forward per step."""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space, concatenate, create_empty_array

from routing_env.env.checks import check_number
from routing_env.env.mdp import EnvState
from routing_env.env.model import RoutingEnv

__all__ = ["RoutingVectorEnv"]


class RoutingVectorEnv(VectorEnv):
    """``num_envs`` episodes over one shared model, cache and running load statistics.

    A step collects every sub-env's next transition that is not cached yet and runs them as one
    batch through the group (different examples padded to one length), then finishes each sub-env's
    step from the cache. Sub-envs reset automatically on the step after they end (Gymnasium's
    ``NEXT_STEP`` autoreset: that step's action is ignored), or with ``autoreset_mode=SAME_STEP``
    in the step that ends them (the returned observation starts the next episode; the last one is
    ``info["final_obs"]``, as stable-baselines3 expects). ``env`` shares an existing ``RoutingEnv``
    (its model, cache and running loads); otherwise the other arguments build one.
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(self, num_envs: int = 8, autoreset_mode: AutoresetMode = AutoresetMode.NEXT_STEP,
                 env: RoutingEnv | None = None, **env_kwargs: Any) -> None:
        if autoreset_mode not in (AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP):
            raise ValueError(f"autoreset_mode must be NEXT_STEP or SAME_STEP, got {autoreset_mode!r}")
        check_number("RoutingVectorEnv", "num_envs", num_envs, integer=True, low=1)  # before the env (and model) is built
        self.metadata = {**self.metadata, "autoreset_mode": autoreset_mode}
        self.env = env if env is not None else RoutingEnv(**env_kwargs)
        self.num_envs = num_envs
        self.single_observation_space = self.env.observation_space
        self.single_action_space = self.env.action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._slots: list[EnvState | None] = [None] * num_envs
        self._autoreset = np.zeros(num_envs, dtype=bool)
        self._obs = create_empty_array(self.single_observation_space, num_envs)

    def _start(self, j: int, example: int | None = None) -> tuple[np.ndarray, dict]:
        env = self.env
        i = int(self.np_random.integers(len(env.examples))) if example is None else example
        obs, info = env.reset(options={"example": i})
        self._slots[j] = env.get_state()
        return obs, info

    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed if not isinstance(seed, list) else seed[0])
        examples = (options or {}).get("examples")
        infos: dict[str, Any] = {}
        obs = []
        for j in range(self.num_envs):
            o, info = self._start(j, None if examples is None else int(examples[j]))
            obs.append(o)
            infos = self._add_info(infos, info, j)
        self._autoreset[:] = False
        self._obs = concatenate(self.single_observation_space, obs, self._obs)
        return self._obs, infos

    def step(self, actions: Any):
        env = self.env
        keys = [None if self._autoreset[j] else env._action_key(actions[j], len(self._slots[j].prefix)) for j in range(self.num_envs)]
        self._prefetch(keys)
        obs, rewards = [], np.zeros(self.num_envs)
        terminated, truncated = np.zeros(self.num_envs, bool), np.zeros(self.num_envs, bool)
        infos: dict[str, Any] = {}
        for j in range(self.num_envs):
            if self._autoreset[j]:
                o, info = self._start(j)
            else:
                self._restore(self._slots[j])
                o, rewards[j], terminated[j], truncated[j], info = env.step(keys[j] if env.action_mode != "bias" else actions[j])
                self._slots[j] = env.get_state()
                if self.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP and (terminated[j] or truncated[j]):
                    final_obs, final_info = o, info
                    o, info = self._start(j)
                    info = {**info, "final_obs": final_obs, "final_info": final_info}
            obs.append(o)
            infos = self._add_info(infos, info, j)
        if self.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP:
            self._autoreset = terminated | truncated
        self._obs = concatenate(self.single_observation_space, obs, self._obs)
        return self._obs, rewards, terminated, truncated, infos

    def _restore(self, slot: EnvState) -> None:
        """Put a sub-env's episode into the shared env, keeping the shared running loads."""
        slot.load_stats = self.env.load_stats
        self.env.set_state(slot)

    def _prefetch(self, keys: list) -> None:
        """Run the uncached transitions of all sub-envs: one batched forward per group level."""
        nodes = [(self._slots[j].example, self._slots[j].prefix + (key,)) for j, key in enumerate(keys) if key is not None]
        self.env.prefetch(nodes)
