"""PPO (stable-baselines3) on the routing env, vectorised; its per-group action distribution gives targets.

SB3 expects its own ``VecEnv`` (same-step autoreset, a list of info dicts, the last observation in
``info["terminal_observation"]``); ``SB3VecEnv`` adapts any Gymnasium ``VectorEnv`` run with
``AutoresetMode.SAME_STEP`` to it. For ``RoutingEnv`` that vector env is ``RoutingVectorEnv``
sharing the env's model and cache, so each PPO step is one batched group forward.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv
from stable_baselines3 import PPO
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.logger import configure as configure_logger
from stable_baselines3.common.vec_env import VecEnv

from agents.base import current_example, example_rng

__all__ = ["PPOAgent", "SB3VecEnv", "make_vector_env"]


class SB3VecEnv(VecEnv):
    """A Gymnasium ``VectorEnv`` with same-step autoreset, seen through SB3's ``VecEnv`` API."""

    def __init__(self, venv: VectorEnv) -> None:
        if venv.metadata.get("autoreset_mode") != AutoresetMode.SAME_STEP:
            raise ValueError("SB3VecEnv needs a vector env built with autoreset_mode=AutoresetMode.SAME_STEP")
        self.venv = venv
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)
        self._actions: np.ndarray | None = None
        self._returns, self._lengths = np.zeros(venv.num_envs), np.zeros(venv.num_envs, int)

    def reset(self) -> np.ndarray:
        obs, _ = self.venv.reset(seed=self._seeds[0] if self._seeds and self._seeds[0] is not None else None)
        self._reset_seeds()
        self._returns[:], self._lengths[:] = 0.0, 0
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self):
        obs, rewards, terminated, truncated, info = self.venv.step(self._actions)
        dones = terminated | truncated
        self._returns += rewards
        self._lengths += 1
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        for j in np.flatnonzero(dones):
            infos[j] = {"terminal_observation": info["final_obs"][j], "TimeLimit.truncated": bool(truncated[j] and not terminated[j]),
                        "episode": {"r": float(self._returns[j]), "l": int(self._lengths[j])}}
            self._returns[j], self._lengths[j] = 0.0, 0
        return obs, rewards.astype(np.float32), dones, infos

    def close(self) -> None:
        self.venv.close()

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return [getattr(self.venv, attr_name)] * len(self._get_indices(indices))

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *args: Any, indices: Any = None, **kwargs: Any) -> list[Any]:
        return [getattr(self.venv, method_name)(*args, **kwargs)] * len(self._get_indices(indices))

    def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
        return [False] * len(self._get_indices(indices))


def make_vector_env(env: Any, num_envs: int) -> VectorEnv:
    """A same-step-autoreset vector env over ``env``: batched ``RoutingVectorEnv`` for the real env
    (shared model, cache and running loads), else Gymnasium's ``SyncVectorEnv`` over copies."""
    from routing_env.env import RoutingEnv
    from routing_env.env.vector import RoutingVectorEnv

    if isinstance(env, RoutingEnv):
        return RoutingVectorEnv(num_envs=num_envs, autoreset_mode=AutoresetMode.SAME_STEP, env=env)
    return gym.vector.SyncVectorEnv([lambda: copy.deepcopy(env) for _ in range(num_envs)],
                                    autoreset_mode=AutoresetMode.SAME_STEP)


class PPOAgent:
    """SB3 PPO with an MLP policy over the flat observation (discrete action modes).

    ``fit`` trains for ``total_timesteps`` env steps (``G`` per episode), or loads ``model_path``
    when that file exists; ``policy`` returns the action distribution used as the group's target.
    """

    def __init__(self, total_timesteps: int = 3072, num_envs: int = 16, n_steps: int = 48, batch_size: int = 96,
                 n_epochs: int = 8, learning_rate: float = 1e-3, gamma: float = 1.0, ent_coef: float = 0.01,
                 seed: int = 0, deterministic: bool = True, model_path: str | None = None, verbose: int = 0) -> None:
        self.kw = dict(total_timesteps=total_timesteps, num_envs=num_envs, n_steps=n_steps, batch_size=batch_size,
                       n_epochs=n_epochs, learning_rate=learning_rate, gamma=gamma, ent_coef=ent_coef, seed=seed,
                       deterministic=deterministic)
        self.model_path, self.verbose = model_path, verbose
        self.model: PPO | None = None

    def fit(self, env: Any, tensorboard_log: str | None = None) -> None:
        if not isinstance(env.action_space, gym.spaces.Discrete):
            raise ValueError("PPOAgent makes routing targets from a discrete action distribution; use action_mode "
                             "'primary' or 'combo'")
        if len(set(getattr(env, "group_experts", [0]))) > 1:
            raise ValueError(f"PPOAgent samples from all {env.action_space.n} actions, but this MoLA model's groups have "
                             f"{env.group_experts} experts; stable-baselines3's PPO cannot mask actions: search it with "
                             "--agent exhaustive or mcts")
        if self.model_path and Path(self.model_path).is_file():
            self.model = PPO.load(self.model_path, device="cpu")
            return
        k = self.kw
        loads = env.load_stats.copy()  # training episodes must not count towards the search's running loads
        vec = SB3VecEnv(make_vector_env(env, k["num_envs"]))
        self.model = PPO("MlpPolicy", vec, n_steps=k["n_steps"], batch_size=k["batch_size"], n_epochs=k["n_epochs"],
                         learning_rate=k["learning_rate"], gamma=k["gamma"], ent_coef=k["ent_coef"], seed=k["seed"],
                         device="cpu", verbose=self.verbose)
        # SB3's default logger makes a temp folder per run; log to the run's TensorBoard folder or nowhere.
        formats = (["stdout"] if self.verbose else []) + (["tensorboard"] if tensorboard_log else [])
        self.model.set_logger(configure_logger(tensorboard_log, formats) if formats else Logger(None, []))
        self.model.learn(total_timesteps=k["total_timesteps"], progress_bar=False)
        env.load_stats = loads
        if self.model_path:
            self.model.save(self.model_path)

    def policy(self, obs: np.ndarray, env: Any) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("PPOAgent.policy before fit(): train it (or give model_path) first")
        with torch.no_grad():
            t, _ = self.model.policy.obs_to_tensor(np.asarray(obs, np.float32))
            return self.model.policy.get_distribution(t).distribution.probs[0].cpu().numpy().astype(float)

    def act(self, obs: np.ndarray, env: Any) -> int:
        p = self.policy(obs, env)
        if self.kw["deterministic"]:
            return int(np.argmax(p))
        # Drawn per (seed, example, group), not from one stream: a resumed search samples as an uninterrupted one.
        g = int(np.argmax(np.asarray(obs)[: getattr(env, "unwrapped", env).G]))
        rng = example_rng(self.kw["seed"], current_example(env), g)
        return int(rng.choice(len(p), p=p / p.sum()))

    def config(self) -> dict:
        return dict(self.kw)
