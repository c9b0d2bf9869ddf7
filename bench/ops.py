"""Benchmark (CPU proxy for GPU overhead): ops and host syncs of one eval batch, LoRA-MoE vs peft LoRA.

On a GPU every aten call that reaches a backend is (at least) one kernel launch, and some calls
wait for the device: reading a value (``.item()``, ``int(t)``, ``.tolist()``), ops whose output
shape depends on data (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``) and copies
to the host. At MiniLM's shapes those launches and waits, not the arithmetic, set the GPU's speed,
so they can be counted on a CPU. For one eval batch of ``--questions`` ARC-Easy dev questions, in
the fixed-shape mode the GPU runs (``MCModel.one_pass``), this counts:

* ``backend_ops``: aten ops that reach a kernel (after autograd and composite decomposition), as a
  ``TorchDispatchMode`` sees them: the proxy for kernel launches;
* ``profiler_aten_calls``: every ``aten::`` event in ``torch.profiler``, nested ones included;
* ``sync_ops``: backend ops that synchronise with the host on a GPU, by name
  (``routing_env.common.opcount.SYNC_OPS``).

and the same for the backbone with one peft LoRA per adapted module (``lora``). Prints JSON;
``--out`` also writes it. The goal (issue 13): LoRA-MoE at most 1.5x the ops of peft LoRA, and no
sync op inside the forward.

    python bench/ops.py [--questions 64] [--out results/bench/ops.json]
"""

from __future__ import annotations

import argparse
import os

import torch

from routing_env.data import load_task
from routing_env.training.evaluation import batch_encoder
from routing_env.moe import MoEConfig, RoutingPlan, build_model
from routing_env.common.opcount import OpCounter
from routing_env.common.results import report


def count(model, batch) -> dict:
    """Ops of one no-grad forward of ``model`` on ``batch`` (after a warm-up forward)."""
    with torch.no_grad():
        model(batch)
        with OpCounter() as counter:
            model(batch)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(batch)
    aten = sum(1 for e in prof.events() if e.name.startswith("aten::"))
    return {"backend_ops": counter.total, "profiler_aten_calls": aten, "sync_ops": counter.syncs,
            "top_ops": dict(counter.ops.most_common(12))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=64, help="questions in the eval batch")
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--data-dir", default=os.environ.get("ROUTING_ENV_DATA"))
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    examples = load_task("arc-easy", "dev", args.data_dir, limit=args.questions)
    rows = {}
    for method in ("lora", "lora-moe"):
        model = build_model(method, args.backbone, MoEConfig(), seed=0).eval()
        model.one_pass = True  # the fixed-shape forward a GPU runs
        batch = batch_encoder(model, model.tokenizer_for(args.backbone), 128)(examples)
        with model.routed(RoutingPlan(record_loads=True)):  # as ``evaluate`` does: loads recorded in the same forward
            rows[method] = count(model, batch)
    ratio = {k: rows["lora-moe"][k] / rows["lora"][k] for k in ("backend_ops", "profiler_aten_calls")}
    out = {"questions": args.questions, "sequences": int(batch.choice_mask.numel()), "methods": rows,
           "ratio_lora_moe_over_lora": ratio, "goal": "ratio <= 1.5 and no sync_ops in lora-moe",
           "met": max(ratio.values()) <= 1.5 and not rows["lora-moe"]["sync_ops"], "torch": torch.__version__}
    report(out, args.out)


if __name__ == "__main__":
    main()
