"""routing-gym: expert routing in LoRA mixtures-of-experts as a reinforcement-learning problem.

Importing the package registers the env ids (``gymnasium.make("layermoe-arc")``); the env itself,
with torch and the model code, is imported only when an env is made.

The package map, each folder importing only those above it in this list (tests/test_layering.py):

* ``common/``: the command line and configs (torch-free), run identity, safe files, tables, stats, plots
* ``data/``: tasks and loaders (local first, hub fallback), your own data, the generated control task, encodings
* ``moe/``: the LoRA-MoE layer, routing plans, adapters and checkpoints, backbones, kernels, balancing strategies
* ``env/``: the routing MDP (one core, a model backend and a synthetic one), the vector env, the prefix cache
* ``targets.py``: the routing-targets files, the contract between the search and stage 3
* ``search/`` (and the top-level ``agents`` package): the search loop of ``train_rl.py``, its settings, the gate
* ``training/``: the fine-tune loop (stages 1 and 3), routing supervision, training state, evaluation, the demo warm-up
* ``pipeline.py``: stages 1-3 per seed and method, and the results table
* ``studies/``: experiment drivers over the pipeline (the balancing-strategy comparison)
"""

from routing_env.registration import ENV_IDS

__version__ = "0.1.0"

__all__ = ["ENV_IDS", "__version__"]
