"""routing-gym: expert routing in LoRA mixtures-of-experts as a reinforcement-learning problem.

Importing the package registers the env ids (``gymnasium.make("layermoe-arc")``); the env itself,
with torch and the model code, is imported only when an env is made.
"""

from routing_env.registration import ENV_IDS

__version__ = "0.1.0"

__all__ = ["ENV_IDS", "__version__"]
