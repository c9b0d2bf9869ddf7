"""The routing MDP: its core, the env over a real model, its synthetic twin, the vector env and the prefix cache.

``RoutingMDP`` (``mdp``) is the MDP written once (episode state, rewards, observations, planning
interface); its backends supply only transitions, priors and scores: ``RoutingEnv`` (``model``)
runs a LoRA-MoE checkpoint group by group, ``SyntheticRoutingEnv`` (``synthetic``) is the
model-free stand-in for tests. ``RoutingVectorEnv`` (``vector``) steps many episodes in one
batched forward. Nothing here trains a model: the registered ids' entry point
(``routing_env.training.warmup.make_env``) resolves "no checkpoint" to the cached demo warm-up.
"""

from routing_env.env.checks import check_number
from routing_env.env.mdp import ACTION_MODES, REWARD_MODES, EnvState, RewardTerms, RoutingMDP
from routing_env.env.model import RoutingEnv
from routing_env.env.synthetic import SyntheticRoutingEnv
from routing_env.env.vector import RoutingVectorEnv

__all__ = ["ACTION_MODES", "REWARD_MODES", "EnvState", "RewardTerms", "RoutingEnv", "RoutingMDP", "RoutingVectorEnv",
           "SyntheticRoutingEnv", "check_number"]
