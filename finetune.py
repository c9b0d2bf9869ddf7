"""Fine-tune a LoRA or LoRA-MoE multiple-choice model: LayerMoE's warm-up (stage 1) and its
process-supervised fine-tune (stage 3).

    python finetune.py --task arc-easy --method lora-moe --epochs 2
    python finetune.py --task arc-easy --method layermoe --init-checkpoint runs/w/final --targets targets.jsonl
"""

from __future__ import annotations

# The loop lives in the package (routing_env.training.finetune); this script is its command line. Run as a
# script, it parses (and answers --help) before importing that module, so no flag waits for torch.
# Imported, the names stay available from here (``finetune.Config``, ``finetune.main``) for existing code.
if __name__ == "__main__":
    from routing_env.common.cli import run_cli
    from routing_env.common.configs import FinetuneConfig

    run_cli("routing_env.training.finetune:main", FinetuneConfig, __doc__)
else:
    from routing_env.training.finetune import *  # noqa: F403
    from routing_env.training.finetune import Config, main  # noqa: F401
