"""Benchmark (CPU proxy for GPU overhead): kernel launches and host syncs of an eval forward and a training step.

On a GPU every aten op that reaches a backend is (at least) one kernel launch, except views and bare
allocations, and some ops wait for the device: reading a value (``.item()``, ``int(t)``,
``.tolist()``) and ops whose output shape depends on data (``nonzero``, boolean-mask indexing,
``unique``). At MiniLM's shapes those launches and waits, not the arithmetic, set a GPU's speed, so
they are counted here on a CPU (``routing_env.common.opcount.OpCounter``):

* ``launches``: ops that launch a kernel (``OpCounter.launches``; the fused low-rank ops MiniLM's
  layers run are one Triton kernel each on the GPU and count once), ``backend_ops``: every op incl. views;
* ``sync_ops``: ops that synchronise with the host on a GPU, by name.

Measured for MiniLM-L6 LoRA-MoE (4 experts, top-2, rank 8, every linear layer) on ARC-Easy:

* ``eval_forward``: one no-grad forward of a ``--questions`` batch in the fixed-shape mode a GPU runs,
  recording expert loads as ``evaluate`` does: the fused path a GPU takes (``kernels.lowrank``, forced
  here with ``fused_everywhere``), the CPU's composite path, and the backbone with peft LoRA;
* ``train_step``: one call of ``finetune``'s own ``train_step`` (forward with the Switch loss, backward,
  gradient clipping, the guarded fused AdamW update, the copy of the step's values to the host) on
  a batch of ``--batch-size`` questions, after a first step has warmed up; fused and composite paths.

* ``search``: launches per searched question of the exhaustive oracle and MCTS (32 simulations)
  through ``RoutingEnv``, ``--search-questions`` searched together as ``train_rl.py`` batches them.
  Its sync ops are the CPU's only: transformers' mask check (``mask.all()``), which a GPU env skips.

Goals (issue 26): at most 250 launches per eval forward and 800 per training step on the GPU path,
no sync op in either; at most 100 launches per exhaustive question (the GPU's 300 questions/s leave
~3 ms of host time per question: a launch from Python costs some 10-30 us). What differs on a GPU is not in the count: there the CPU's unfused attention
(with dropout on, ~100 ops) and three-op dropout are one kernel each, and a few copies the CPU skips
are launches (the step's values to pinned host memory, a training batch's index to the device), as
are the fused AdamW's multi-tensor chunks.

    python bench/ops.py [--questions 16] [--search-questions 64] [--out results/bench/ops.json]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from routing_env.common.opcount import OpCounter
from routing_env.common.results import report
from routing_env.data import load_task
from routing_env.moe import MoEConfig, RoutingPlan, build_model
from routing_env.moe.kernels.backend import fused_everywhere
from routing_env.training.evaluation import batch_encoder

GOALS = {"eval_forward_launches": 250, "train_step_launches": 800, "exhaustive_question_launches": 100}


def _row(counter: OpCounter) -> dict:
    return {"launches": counter.launches, "backend_ops": counter.total, "sync_ops": counter.syncs,
            "top_launches": dict(counter.launch_ops.most_common(12))}


def eval_forward(method: str, fused: bool, examples: list, data_dir: str | None) -> dict:
    """Launches of one no-grad forward recording loads (after a warm-up forward)."""
    model = build_model(method, "minilm", MoEConfig(), seed=0).eval()
    model.one_pass = True  # the fixed-shape forward a GPU runs
    batch = batch_encoder(model, model.tokenizer_for("minilm"), 128)(examples)
    with fused_everywhere() if fused else contextlib.nullcontext():
        with torch.no_grad(), model.routed(RoutingPlan(record_loads=True)):  # as ``evaluate`` does
            model(batch)
            with OpCounter() as counter:
                model(batch)
    return _row(counter) | {"sequences": int(batch.choice_mask.numel())}


def train_step(fused: bool, batch_size: int, data_dir: str | None) -> dict:
    """Launches of ``finetune.train_step`` (its second call: the first warms up and leaves its values pending)."""
    from routing_env.training import finetune

    with tempfile.TemporaryDirectory() as tmp, fused_everywhere() if fused else contextlib.nullcontext():
        cfg = finetune.Config(method="lora-moe", task="arc-easy", data_dir=data_dir, epochs=1, batch_size=batch_size,
                              train_limit=2 * batch_size, eval_limit=4, device="cpu", logdir=tmp, seed=0)
        run = finetune.prepare(cfg, finetune.check_config(cfg), "ops", Path(tmp) / "run", finetune.DistContext())
        run.model.train()
        run.model.one_pass = True
        rng, curve = np.random.default_rng(0), finetune.EpochCurve(run.device)
        finetune.train_step(run, np.arange(batch_size), 0, rng, curve)
        with OpCounter() as counter:
            finetune.train_step(run, np.arange(batch_size, 2 * batch_size), 0, rng, curve)
        run.writer.close()
    return _row(counter)


def search(name: str, questions: int, data_dir: str | None) -> dict:
    """Launches per question of a routing search through ``RoutingEnv`` on the GPU path (the GPU's rows
    per batched group forward), every tree from an empty prefix cache, the examples tokenised beforehand
    (once per example, on the host, as a run's first visit does)."""
    import agents
    from routing_env.env import RoutingEnv

    model = build_model("lora-moe", "minilm", MoEConfig(), seed=0).eval()
    env = RoutingEnv(model=model, max_examples=questions + 1, data_dir=data_dir)
    env.batch_rows = 4096  # a GPU env's: one pass per group level
    kw = {"mcts": {"num_simulations": 32, "batch_size": 64}, "exhaustive": {"batch_size": 64}}[name]
    with fused_everywhere():
        agents.run_agent(agents.make(name, **kw), env, [questions])  # warm-up, on another question
        for i in range(questions):
            env._example_rows(i)
        env.cache.clear()
        with OpCounter() as counter:
            agents.run_agent(agents.make(name, **kw), env, list(range(questions)))
    row = _row(counter)
    return {"questions": questions, "num_groups": env.G, "actions": int(env.action_space.n), **kw,
            "launches_per_question": counter.launches / questions,
            "expert_gate_launches": counter.launch_ops["expert_gate"], **row}  # one per adapted module and chunk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=16, help="questions in the eval batch (counts do not grow with it)")
    ap.add_argument("--batch-size", type=int, default=16, help="questions per training step")
    ap.add_argument("--search-questions", type=int, default=64,
                    help="questions searched together (one exhaustive batch; launches per question fall as it grows)")
    ap.add_argument("--search-agents", default="exhaustive,mcts", help="comma-separated searches to count")
    ap.add_argument("--data-dir", default=os.environ.get("ROUTING_ENV_DATA"))
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    examples = load_task("arc-easy", "dev", args.data_dir, limit=args.questions)
    evals = {"lora-moe fused (GPU path)": eval_forward("lora-moe", True, examples, args.data_dir),
             "lora-moe composite (CPU path)": eval_forward("lora-moe", False, examples, args.data_dir),
             "lora (peft)": eval_forward("lora", False, examples, args.data_dir)}
    steps = {"lora-moe fused (GPU path)": train_step(True, args.batch_size, args.data_dir),
             "lora-moe composite (CPU path)": train_step(False, args.batch_size, args.data_dir)}
    searches = {name: search(name, args.search_questions, args.data_dir) for name in args.search_agents.split(",")}
    gpu_eval, gpu_step = evals["lora-moe fused (GPU path)"], steps["lora-moe fused (GPU path)"]
    met = {"eval_forward_launches": gpu_eval["launches"] <= GOALS["eval_forward_launches"],
           "train_step_launches": gpu_step["launches"] <= GOALS["train_step_launches"],
           "exhaustive_question_launches": "exhaustive" in searches and
               searches["exhaustive"]["launches_per_question"] <= GOALS["exhaustive_question_launches"],
           "no_sync_ops": not gpu_eval["sync_ops"] and not gpu_step["sync_ops"]}
    report({"questions": args.questions, "batch_size": args.batch_size, "eval_forward": evals, "train_step": steps,
            "search": searches, "goals": GOALS, "met": met, "all_met": all(met.values()), "torch": torch.__version__},
           args.out)


if __name__ == "__main__":
    main()
