"""Search the routing MDP with an agent and write routing targets (stage 2 of LayerMoE).

    python train_rl.py --env layermoe-arc                     # MCTS on the cached warm-up checkpoint
    python train_rl.py --env layermoe-arc --agent ppo
    python train_rl.py --env layermoe-arc --agent my_module:MyAgent
"""

from __future__ import annotations

# The search driver lives in the package (routing_env.search.run); this script is its command line. Run as a
# script, it parses (and answers --help) before importing that module, so no flag waits for torch.
# Imported, the names stay available from here (``train_rl.Config``, ``train_rl.main``) for existing code.
if __name__ == "__main__":
    from routing_env.common.cli import run_cli
    from routing_env.search.config import SearchConfig

    run_cli("routing_env.search.run:main", SearchConfig, __doc__)
else:
    from routing_env.search.run import *  # noqa: F403
    from routing_env.search.run import Config, main  # noqa: F401
