"""The settings of ``train_rl.py`` (the search), torch-free so its ``--help`` answers at once.

Beside the search rather than in ``routing_env.common.configs``: the ``--agent`` help names the
registered agents (``agents.AGENTS``, a light import), and the agents sit above the common helpers.
The groups it takes are declared once in ``routing_env.common.configs``.
"""

from __future__ import annotations

from dataclasses import dataclass

from agents import AGENTS  # agents/__init__ imports numpy only; the agents themselves load on use
from routing_env.common.cli import cfg_field, cfg_like
from routing_env.common.configs import RunSettings, SearchSettings, TaskData
from routing_env.registration import ENV_IDS

__all__ = ["SearchConfig"]


@dataclass
class SearchConfig(RunSettings, SearchSettings, TaskData):
    """Search the routing MDP with an agent; write routing targets for the training examples."""

    task: str | None = cfg_like(TaskData, "task", None, help="your own task instead of the env id's: a folder of "
                                "train/dev/test .jsonl[.gz] files or one file (split 80/10/10 by question-id hash)")
    env: str = cfg_field("layermoe-arc", f"registered env id ({', '.join(ENV_IDS)})")
    agent: str = cfg_field("mcts", f"agent: {', '.join(sorted(AGENTS))}, or your own as path/to/file.py:Class or "
                           "module:Class (the module's folder on PYTHONPATH)")
    checkpoint: str | None = cfg_field(None, "warm-up checkpoint folder (default: the cached demo warm-up of the task)")
    split: str = cfg_field("train", "split whose examples get targets")
    num_examples: int = cfg_field(128, "search the first N examples of the split (stage 3 trains the rest on the task loss)")
    batch_size: int = cfg_field(16, "examples searched together (one batched forward per tree level)")
    output: str | None = cfg_field(None, "routing-targets file (default: <logdir>/<name>/targets.jsonl)")
    overwrite: bool = cfg_field(False, "start the targets file again instead of resuming it")
    compare_router: bool = cfg_field(True, "also score the learned router's greedy paths on the same examples")
