"""The routing MDP: the env over a real model, its synthetic twin, the vector env and the prefix cache.

``RoutingEnv`` (``model``) runs a LoRA-MoE checkpoint group by group; ``SyntheticRoutingEnv``
(``synthetic``) is the model-free stand-in for tests; ``RoutingVectorEnv`` (``vector``) steps many
episodes in one batched forward. Nothing here trains a model: the registered ids' entry point
(``routing_env.training.warmup.make_env``) resolves "no checkpoint" to the cached demo warm-up.
"""

from routing_env.env.model import ACTION_MODES, REWARD_MODES, EnvState, RoutingEnv, check_number
from routing_env.env.synthetic import SyntheticRoutingEnv
from routing_env.env.vector import RoutingVectorEnv

__all__ = ["ACTION_MODES", "REWARD_MODES", "EnvState", "RoutingEnv", "RoutingVectorEnv", "SyntheticRoutingEnv",
           "check_number"]
