"""The GPU benchmark of issue 26 ("the benchmark measures the product"), in one run of a few minutes on
one H100/H200. JSON out. Parts, in the order they run (a GPU run skips what its ``--budget-s`` leaves
no time for, so the first matter most):

1. ``ops``: the expert op that ``LoRAMoELinear`` dispatches, in bf16, at the anchor shapes ``(T, d, r, E,
   k)``, forward (with gradients on, as in training) and forward+backward (``torch.autograd.grad``),
   timed eagerly and as a replayed CUDA graph (launch overhead gone; a capture that fails leaves
   ``graph_us`` null and its error), against its roofline measured in the same run:

   * the low-rank regime (``use_lowrank``: ``E*r <= 256`` in bf16 on a GPU): ``lowrank_experts``, the
     whole layer (base GEMM ``x W^T + b``, router, every expert's down-projection, top-k gates, the
     expand). Roofline: the larger of the bytes that must move (read x, W, b, router, A, B; write out
     and the gate output; forward+backward also read dy, write dx and the three weight gradients)
     over the copy bandwidth, and the FLOPs (forward: base, router, down-projections, expand; backward:
     dx through W, router and A, the router's and adapters' weight gradients, dhg through B; the base
     weight is frozen) over the dense bf16 peak (a [8192, 8192] ``torch.mm``);
   * beyond it (``E*r > 256``): the sorted Triton op ``lora_moe_triton`` (the adapter delta alone, with
     random top-k routing), against its byte model.

   Goal (issue 26), on the graph timing: the low-rank op within 2x of its roofline forward and 3x
   forward+backward; the sorted kernels within 3x / 4x. ``goal_met`` per row (``goals_met`` collects
   every part's). At the first anchor,
   for reference, the sorted PyTorch reference and the per-expert loop of MoLA/MixLoRA-style code.
2. ``eval``: MiniLM-L6 LoRA-MoE (``finetune.py``'s default adapters) evaluating the ARC-Easy dev split
   through ``routing_env.training.evaluation.evaluate`` in bf16: sequences/s (goal: >= 50,000).
3. ``finetune_epoch``: ``finetune.py``'s own training epoch on ARC-Easy (its code: ``prepare``, then
   ``train_epoch`` of ``routing_env.training.finetune``, bf16): seconds per epoch (goal: <= 3 s).
4. ``search``: exhaustive and MCTS routing search questions/s through ``RoutingEnv`` (goal:
   exhaustive >= 300 questions/s).
5. ``finetune_epoch_graphs``: the epoch of 3 with ``--compile graphs`` (the training step under
   ``torch.compile``, replayed from CUDA graphs; the first epoch includes the compile).
6. If time is left: ``fp32`` (evaluation and exhaustive search without autocast, for comparison) and
   ``grouped`` (evaluation with 32 experts of rank 16, where the layers take the sorted kernels).

Parts 2-4 also profile a pass, three training steps and a few searched questions (``profile_summary``:
wall vs device-busy time, launches and host waits per call, the ops that take the host's and the
device's time), so that one GPU run says where the time goes, not only how much there is.

On the GPU a part (or an anchor) that raises is recorded as its error and the others still run, and
the JSON is written after each part. ``--dry`` runs every part at tiny sizes on whatever device there is (CPU in CI; Triton through its
interpreter; the layers' fused low-rank path forced on, as a GPU takes it), so the script cannot rot;
there CUDA graphs are not captured (``graph_us`` null) and no timing means anything. Offline on a GPU
machine it needs, besides the checkout, a bundle that ``make gpu-bundle`` prepares (wheels the machine
lacks, an fp16 copy of MiniLM, ARC-Easy): see ``bench/gpu_run.sh`` and the README's "GPU" section.

    python bench/gpu.py [--dry] [--out results/bench/gpu.json] [--budget-s 240]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

#: the budget counts from here, so that importing torch and triton (seconds on a cold machine) is in it
STARTED = time.perf_counter()

import torch  # noqa: E402

if "--dry" in sys.argv and not torch.cuda.is_available():
    # A dry run on a CPU runs the Triton kernels through the interpreter (set before triton is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from routing_env.common.results import report  # noqa: E402
from routing_env.common.safefiles import atomic_write_text  # noqa: E402
from routing_env.moe.kernels import lora_moe_reference  # noqa: E402
from routing_env.moe.kernels.backend import fused_everywhere  # noqa: E402
from routing_env.moe.kernels.lowrank import lowrank_experts, use_lowrank  # noqa: E402

#: (T tokens, d width, r rank, E experts, k): issue 13's anchor, a wider expert set, a long sequence (all
#: low-rank on a GPU in bf16), and one beyond the low-rank regime (E*r = 1024: the sorted kernels).
ANCHORS = [(8192, 4096, 16, 8, 2), (8192, 2048, 16, 16, 2), (32768, 1024, 16, 8, 2), (8192, 2048, 16, 64, 2)]
#: one shape per regime of the GPU's rule (E*r = 20 and 272)
DRY_SHAPES = [(37, 48, 4, 5, 2), (37, 48, 16, 17, 2)]
#: measured/roofline goals of issue 26 (graph timing), by regime
GOALS = {"lowrank": {"fwd": 2.0, "fwd_bwd": 3.0}, "sorted": {"fwd": 3.0, "fwd_bwd": 4.0}}
EVAL_GOAL_SEQ_S, EPOCH_GOAL_S, EXHAUSTIVE_GOAL_Q_S = 50_000, 3.0, 300
SCALE = 2.0  # alpha / rank of finetune.py's defaults


class Budget:
    """Seconds left of ``--budget-s``: a part (or an anchor) starts only if its estimate fits. A dry run's
    parts are seconds each and all of them are what it checks, so a slow CI machine skips none."""

    def __init__(self, seconds: float, dry: bool) -> None:
        self.t0, self.seconds, self.dry = STARTED, seconds, dry
        self.skipped: list[str] = []  # what did not start, in order

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def allows(self, estimate_s: float) -> bool:
        return self.dry or self.elapsed() + estimate_s <= self.seconds


def error_text(e: BaseException) -> str:
    """The end of an exception's traceback, for the JSON."""
    return "".join(traceback.format_exception(type(e), e, e.__traceback__)[-3:])[-2000:]


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Microseconds per call: triton's ``do_bench`` on a GPU (L2 flushed between calls), wall clock on CPU."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: 1e3 * triton.testing.do_bench(fn, warmup=10, rep=40)

    def cpu(fn):
        fn()
        t0 = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - t0)

    return cpu


def graph_us(fn: Callable[[], object], device: torch.device, time_us) -> tuple[float | None, str | None]:
    """``(us, error)``: ``fn`` captured in a CUDA graph (after warm-up on a side stream, so that lazy
    initialisation, autotuning and the allocator's first blocks stay out of the capture) and its replay
    timed; ``(None, why)`` on a CPU or when capture fails (the run goes on: the error is a result)."""
    if device.type != "cuda":
        return None, "no CUDA device: not captured"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fn()  # noqa: F841 (the graph's outputs live as long as it is replayed)
        us = time_us(g.replay)
        del g, out
        return us, None
    except Exception as e:  # noqa: BLE001
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
        return None, f"{type(e).__name__}: {e}"[:500]


#: host-side CUDA runtime/driver calls that launch a kernel, and those that wait for the device
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")
WAIT_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cudaMemcpyAsync", "cudaStreamWaitEvent")


def profile_summary(fn: Callable[[], object], device: torch.device, calls: int = 3) -> dict:
    """Where ``calls`` calls of ``fn`` spend their time (``torch.profiler``), per call: the wall clock, the
    device's busy time (kernels and copies), the host's runtime calls that launch kernels or wait for
    the device, and the ops that take most host time (self) and most device time. Wall time far above
    device time means the host is the limit; what it does instead is in ``top_host_ms``."""
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        wall = time.perf_counter() - t0
    events = prof.key_averages()

    def dev_us(e) -> float:  # renamed across torch versions
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))

    def top(key) -> dict[str, float]:
        rows = sorted(events, key=key, reverse=True)[:12]
        return {e.key[:80]: round(key(e) / 1e3 / calls, 3) for e in rows if key(e) > 0}

    return {"calls": calls, "wall_ms_per_call": 1e3 * wall / calls,
            "device_busy_ms_per_call": sum(dev_us(e) for e in events) / 1e3 / calls,
            "launches_per_call": sum(e.count for e in events if e.key in LAUNCH_CALLS) / calls,
            "waits_per_call": {e.key: e.count / calls for e in events if e.key in WAIT_CALLS},
            "top_host_ms": top(lambda e: float(e.self_cpu_time_total)), "top_device_ms": top(dev_us)}


def copy_bandwidth(device: torch.device, nbytes: int, time_us) -> float:
    """Bytes per second of a device-to-device copy (read + write): the memory roofline's denominator."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (time_us(lambda: dst.copy_(src)) * 1e-6)


def dense_peak(device: torch.device, n: int, time_us) -> float:
    """FLOP/s of an ``[n, n] @ [n, n]`` bf16 ``torch.mm``: the achievable compute roofline, as cuBLAS reaches it."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / (time_us(lambda: torch.mm(a, b)) * 1e-6)


def expert_loop(x, A, B, idx, gates, scale):
    """Per expert: find its tokens with a mask, gather, two matmuls, scatter-add (the common pattern)."""
    out = torch.zeros(x.shape[0], B.shape[1], device=x.device, dtype=x.dtype)
    for e in range(A.shape[0]):
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        y = (x[tok] @ A[e].T) @ B[e].T * (gates[tok, slot] * scale).unsqueeze(1).to(x.dtype)
        out = out.index_add(0, tok, y)
    return out


def timings(fwd: Callable[[], torch.Tensor], inputs: tuple, dy: torch.Tensor, device, time_us, graphs: bool) -> dict:
    """Eager and graph microseconds of the forward and of forward+backward (``torch.autograd.grad``)."""
    both = lambda: torch.autograd.grad(fwd(), inputs, dy)  # noqa: E731
    out = {}
    for phase, fn in (("fwd", fwd), ("fwd_bwd", both)):
        eager = time_us(fn)  # first: a failed capture must not cost the eager number
        us, err = graph_us(fn, device, time_us) if graphs else (None, "not captured (reference only)")
        out[phase] = {"eager_us": eager, "graph_us": us, **({"graph_error": err} if err else {})}
    return out


def judge(row: dict, regime: str) -> None:
    """Ratios to the roofline and the goal per phase, on the graph timing where there is one."""
    row["over_roofline"], row["goal_met"] = {}, {}
    row["goal_over_roofline"] = GOALS[regime]
    for phase, goal in GOALS[regime].items():
        t = row["op"][phase]
        ratio = {kind: (t[f"{kind}_us"] / row["roofline_us"][phase] if t[f"{kind}_us"] else None)
                 for kind in ("eager", "graph")}
        row["over_roofline"][phase] = ratio
        judged = ratio["graph"] if ratio["graph"] is not None else ratio["eager"]
        row["goal_met"][phase] = judged <= goal
    row["goal_judged_on"] = "graph" if row["op"]["fwd"]["graph_us"] is not None else "eager"


def op_rows(device: torch.device, shapes, time_us, bandwidth: float, peak: float, budget: Budget) -> list:
    """One row per anchor (see ``op_row``); an anchor that fails on the GPU is recorded, the next still run."""
    rows = []
    for i, (T, d, r, E, k) in enumerate(shapes):
        # ~10 s per anchor on an H200 (compiles, captures, eight timings); the reference forms add a few.
        if not budget.allows(15 if i == 0 else 10):
            rows.append({"T": T, "d": d, "r": r, "E": E, "k": k, "skipped": "budget"})
            budget.skipped.append(f"ops {(T, d, r, E, k)}")
            continue
        try:
            rows.append(op_row(device, (T, d, r, E, k), time_us, bandwidth, peak, with_reference=i == 0))
        except Exception as e:
            if budget.dry:
                raise
            rows.append({"T": T, "d": d, "r": r, "E": E, "k": k, "error": error_text(e)})
    return rows


def op_row(device: torch.device, shape: tuple, time_us, bandwidth: float, peak: float, with_reference: bool) -> dict:
    """The dispatched op at one anchor in bf16, its roofline and the goal (see the module docstring)."""
    from routing_env.moe.kernels.lora_moe_triton import lora_moe_triton

    T, d, r, E, k = shape
    dtype, size = torch.bfloat16, 2
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s, std=1.0: (torch.randn(*s, device=device, dtype=dtype, generator=g) * std)  # noqa: E731
    x = rnd(T, d).requires_grad_()
    dy = rnd(T, d)
    # The GPU's dispatch rule also in a dry run on a CPU (whose own rule differs), so that the dry run
    # runs the ops the GPU run will.
    lowrank = use_lowrank(E, r, d, device if device.type == "cuda" else "cuda", dtype)
    row: dict = {"T": T, "d": d, "r": r, "E": E, "k": k, "dtype": "bfloat16",
                 "regime": "lowrank" if lowrank else "sorted"}
    if lowrank:
        W, b = rnd(d, d, std=d**-0.5), rnd(d)  # the frozen base
        router = rnd(E, d, std=d**-0.5).requires_grad_()
        a_flat = rnd(E * r, d, std=d**-0.5).requires_grad_()
        b_flat = rnd(E * r, d, std=0.01).requires_grad_()
        inputs = (x, router, a_flat, b_flat)
        fwd = lambda: lowrank_experts(x, W, b, router, a_flat, b_flat, top_k=k, renorm=True,  # noqa: E731
                                      scale=SCALE)[0]
        weights = (d * d + d + E * d + 2 * E * r * d) * size  # W, b, router, A, B
        grads = (E * d + 2 * E * r * d) * size  # dRouter, dA, dB (the base is frozen)
        fwd_bytes = weights + 2 * T * d * size + T * 2 * E * 4  # + read x, write out, the fp32 gate output
        bwd_bytes = 2 * T * d * size + grads  # read dy, write dx
        # forward: base, router, down-projections, expand; backward: dx through W, router and A, dB,
        # dRouter, dA, and dhg through B (the base weight gets no gradient)
        fwd_flops = 2 * T * (d * d + E * d + E * r * d + E * r * d)
        bwd_flops = 2 * T * (d * d + 2 * E * r * d + 2 * E * d + 2 * E * r * d)
        row["op_name"] = "lowrank_experts (base GEMM + router + experts + gate + expand)"
    else:
        A = rnd(E, r, d, std=d**-0.5).requires_grad_()
        B = rnd(E, d, r, std=0.01).requires_grad_()
        idx = torch.rand(T, E, device=device, generator=g).topk(k, dim=1).indices
        gates = torch.rand(T, k, device=device, generator=g).softmax(-1).to(dtype).requires_grad_()
        inputs = (x, A, B, gates)
        fwd = lambda: lora_moe_triton(x, A, B, idx, gates, SCALE)  # noqa: E731
        weights = E * r * 2 * d * size
        fwd_bytes = 2 * T * d * size + weights + T * k * (8 + size)  # read x, write y, A, B, ids, gates
        bwd_bytes = 3 * T * d * size + 2 * weights + T * k * (8 + 2 * size)  # read dy and x, write dx, dA/dB, dgates
        fwd_flops = 2 * T * k * r * 2 * d
        bwd_flops = 2 * fwd_flops
        row["op_name"] = "lora_moe_triton (the sorted adapter delta, random top-k routing)"
    both = {"fwd": (fwd_bytes, fwd_flops), "fwd_bwd": (fwd_bytes + bwd_bytes, fwd_flops + bwd_flops)}
    row["bytes"] = {p: nb for p, (nb, _) in both.items()}
    row["flops"] = {p: nf for p, (_, nf) in both.items()}
    row["memory_us"] = {p: 1e6 * nb / bandwidth for p, (nb, _) in both.items()}
    row["compute_us"] = {p: 1e6 * nf / peak for p, (_, nf) in both.items()}
    row["roofline_us"] = {p: max(row["memory_us"][p], row["compute_us"][p]) for p in both}
    row["bound"] = {p: "memory" if row["memory_us"][p] >= row["compute_us"][p] else "compute" for p in both}
    row["op"] = timings(fwd, inputs, dy, device, time_us, graphs=True)
    judge(row, row["regime"])
    if with_reference:  # for reference, the sorted forms of the adapter delta alone (no base GEMM), eager
        A = rnd(E, r, d, std=d**-0.5).requires_grad_()
        B = rnd(E, d, r, std=0.01).requires_grad_()
        idx = torch.rand(T, E, device=device, generator=g).topk(k, dim=1).indices
        gates = torch.rand(T, k, device=device, generator=g).softmax(-1).to(dtype).requires_grad_()
        row["reference_delta_only"] = {
            name: timings(lambda fn=fn: fn(x, A, B, idx, gates, SCALE), (x, A, B, gates), dy, device, time_us,
                          graphs=False)
            for name, fn in (("lora_moe_triton", lora_moe_triton), ("lora_moe_reference", lora_moe_reference),
                             ("expert_loop", expert_loop))}
    return row


class MiniLM:
    """``finetune.py``'s default LoRA-MoE adapters on MiniLM and the ARC-Easy splits, built once, shared."""

    def __init__(self, device: torch.device, data_dir: str | None, dry: bool) -> None:
        from routing_env.training.finetune import Config

        self.device, self.data_dir, self.dry = device, data_dir, dry
        self.cfg = Config()
        self.models: dict = {}
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def model(self, num_experts: int | None = None, rank: int | None = None):
        from routing_env.moe import build_model
        from routing_env.training.finetune import Config, moe_config

        key = (num_experts, rank)
        if key not in self.models:
            cfg = self.cfg if num_experts is None else Config(num_experts=[num_experts], rank=rank)
            self.models[key] = build_model("lora-moe", cfg.backbone, moe_config(cfg), seed=0).to(self.device).eval()
        return self.models[key]


def eval_part(mini: MiniLM, amp: torch.dtype | None, num_experts: int | None = None, rank: int | None = None) -> dict:
    """Evaluation sequences/s of the ARC-Easy dev split as a run evaluates it (tokenised once beforehand,
    ``finetune.py``'s evaluation batch size), best of three passes after a warm-up one; and once more
    with the tokenising inside, as ``evaluate`` on plain examples does."""
    from routing_env.data import load_task
    from routing_env.training.evaluation import encode_split, evaluate

    model = mini.model(num_experts, rank)
    tok = model.tokenizer_for(model.backbone_name)
    dev = load_task("arc-easy", "dev", mini.data_dir, limit=8 if mini.dry else None)  # 570 questions
    cfg, device = mini.cfg, mini.device
    split = encode_split(model, tok, dev, cfg.max_length, device)
    n_seq = sum(len(e.choices) for e in dev)
    kw = dict(batch_size=cfg.eval_batch_size, max_length=cfg.max_length, device=device, progress=False, amp_dtype=amp)
    res = evaluate(model, tok, split, **kw)  # warm-up: kernels' compile and autotuning, the allocator
    best = float("inf")
    for _ in range(1 if mini.dry else 3):
        mini.sync()
        t0 = time.perf_counter()
        evaluate(model, tok, split, **kw)
        mini.sync()
        best = min(best, time.perf_counter() - t0)
    mini.sync()
    t0 = time.perf_counter()
    evaluate(model, tok, dev, **kw)
    mini.sync()
    with_tok = time.perf_counter() - t0
    # The same without the CUDA graphs evaluate replays on a GPU: the Python-issued launches alone.
    evaluate(model, tok, split, graphs=False, **kw)
    mini.sync()
    t0 = time.perf_counter()
    evaluate(model, tok, split, graphs=False, **kw)
    mini.sync()
    eager = time.perf_counter() - t0
    profiles = {"graphs": profile_summary(lambda: evaluate(model, tok, split, **kw), device, 1),
                "eager": profile_summary(lambda: evaluate(model, tok, split, graphs=False, **kw), device, 1)}
    seq_s = n_seq / best
    return {"questions": len(dev), "sequences": n_seq, "batch_questions": cfg.eval_batch_size, "profile": profiles,
            "amp": str(amp).split(".")[-1] if amp else "fp32", "eval_s": best, "eval_sequences_per_s": seq_s,
            "eval_sequences_per_s_with_tokenising": n_seq / with_tok, "eval_sequences_per_s_without_graphs": n_seq / eager,
            "graphs": device.type == "cuda", "goal_sequences_per_s": EVAL_GOAL_SEQ_S,
            "goal_met": seq_s >= EVAL_GOAL_SEQ_S, "dev_accuracy_untrained": res.accuracy}


def finetune_epoch_part(mini: MiniLM, compile_mode: str = "none") -> dict:
    """``finetune.py``'s training epochs, through its own code: ``train`` of ``routing_env.training.finetune``
    step by step (``prepare``: set-up, model, optimiser, resume, wrapper), then ``train_epoch`` timed for
    each of its two default epochs, the first with the kernels' compile and autotuning, the second warm. Not timed: the dev evaluation and checkpoint after
    each epoch and the final test (``evaluate_and_checkpoint`` / ``test_and_report``; ``eval`` times
    evaluation). ``compile_mode``: ``finetune --compile`` (``graphs``: the step replayed as CUDA graphs)."""
    from routing_env.common.distributed import DistContext
    from routing_env.training import finetune as ft

    with tempfile.TemporaryDirectory() as tmp:
        limits = {"train_limit": 6, "eval_limit": 2, "batch_size": 2} if mini.dry else {"eval_limit": 8}
        cfg = ft.Config(method="lora-moe", task="arc-easy", epochs=2, precision="bf16", data_dir=mini.data_dir,
                        logdir=tmp, resume=False, eval_test=False, device=str(mini.device), compile=compile_mode,
                        **limits)
        source = ft.check_config(cfg)
        t0 = time.perf_counter()
        run = ft.prepare(cfg, source, "bench", Path(tmp) / "bench", DistContext())
        mini.sync()
        setup_s = time.perf_counter() - t0
        epochs = []
        for epoch in range(cfg.epochs):
            mini.sync()
            t0 = time.perf_counter()
            ft.train_epoch(run, epoch)
            mini.sync()
            epochs.append(time.perf_counter() - t0)
        # A few more of train_epoch's steps under the profiler: where a step's time goes.
        import numpy as np

        starts, rng = iter(range(0, len(run.data["train"]) - cfg.batch_size + 1, cfg.batch_size)), np.random.default_rng(0)
        curve = ft.EpochCurve(run.device)
        run.model.train()

        def step() -> None:
            first = next(starts)
            ft.train_step(run, np.arange(first, first + cfg.batch_size), cfg.epochs, rng, curve)

        profile = profile_summary(step, mini.device, 3)
        run.writer.close()
    n = len(run.data["train"])
    return {"timed": "routing_env.training.finetune.train_epoch per epoch after prepare "
                     "(no dev evaluation, checkpoint or test)",
            "train_questions": n, "batch_size": cfg.batch_size, "steps_per_epoch": run.steps_per_epoch,
            "precision": cfg.precision, "compile": compile_mode, "step_profile": profile, "setup_s": setup_s,
            "epoch_s": epochs, "first_epoch_s": epochs[0],
            "warm_epoch_s": epochs[-1], "train_questions_per_s": n / epochs[-1], "goal_epoch_s": EPOCH_GOAL_S,
            "goal_met": epochs[-1] <= EPOCH_GOAL_S}


def search_part(mini: MiniLM, precision: str, agents_run=("exhaustive", "mcts")) -> dict:
    """Questions/s of the routing searches through ``RoutingEnv`` (one batched forward per group level),
    each after a warm-up on a few other questions, from an empty prefix cache."""
    import agents
    from routing_env.env import RoutingEnv

    n = 2 if mini.dry else 64
    warm = 1 if mini.dry else 4
    env = RoutingEnv(model=mini.model(), device=str(mini.device), max_examples=n + warm, data_dir=mini.data_dir,
                     precision=precision)
    env.batch_rows = 4096
    out: dict = {"questions": n, "precision": precision}
    kws = {"mcts": {"num_simulations": 32, "batch_size": 64}, "exhaustive": {"batch_size": 64}}
    for name in agents_run:
        agents.run_agent(agents.make(name, **kws[name]), env, list(range(n, n + warm)))
        env.cache.clear()
        mini.sync()
        t0 = time.perf_counter()
        agents.run_agent(agents.make(name, **kws[name]), env, list(range(n)))
        mini.sync()
        out[f"{name}_questions_per_s"] = n / (time.perf_counter() - t0)
        few = list(range(min(n, 8)))

        def again(name=name, few=few) -> None:  # the first few questions again, from an empty cache
            env.cache.clear()
            agents.run_agent(agents.make(name, **kws[name]), env, few)

        out[f"{name}_profile"] = profile_summary(again, mini.device, 1) | {"questions": len(few)}
    if "exhaustive" in agents_run:
        out["goal_exhaustive_questions_per_s"] = EXHAUSTIVE_GOAL_Q_S
        out["goal_met"] = out["exhaustive_questions_per_s"] >= EXHAUSTIVE_GOAL_Q_S
    return out


def grouped_part(mini: MiniLM) -> dict:
    """Evaluation with 32 experts of rank 16 (``E*r = 512``, beyond the GPU's low-rank regime: the layers
    take the sorted kernels), in bf16."""
    from routing_env.moe import moe_layers

    E, r, d = moe_layers(mini.model(32, 16))[0].lora_A.shape
    lowrank = use_lowrank(E, r, d, mini.device, torch.bfloat16)
    return {"num_experts": E, "rank": r, "regime_here": "lowrank" if lowrank else "sorted",
            "eval": eval_part(mini, torch.bfloat16, num_experts=E, rank=r)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="tiny sizes on any device (CI): checks that everything runs")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--data-dir", default=os.environ.get("ROUTING_ENV_DATA"))
    ap.add_argument("--budget-s", type=float, default=240,
                    help="skip the parts (and anchors) whose estimate would end after this many seconds "
                         "(not in --dry, which runs every part)")
    ap.add_argument("--parts", default=None,
                    help="comma-separated parts to run (default: all): ops, eval, finetune_epoch, search, "
                         "finetune_epoch_graphs, fp32, grouped")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.dry:
        raise SystemExit("bench/gpu.py times a GPU; none is visible. `--dry` runs it at tiny sizes on the CPU.")
    budget = Budget(args.budget_s, args.dry)
    time_us = timer(device)
    result: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dry": args.dry,
                    "torch": torch.__version__, "budget_s": args.budget_s, "skipped": budget.skipped}
    result["copy_bandwidth_GBps"] = copy_bandwidth(device, 2**20 if args.dry else 2**30, time_us) / 1e9
    result["dense_bf16_TFLOPs"] = dense_peak(device, 128 if args.dry else 8192, time_us) / 1e12
    mini = MiniLM(device, args.data_dir, args.dry)
    # (name, estimated seconds on an H200, run), by priority
    parts = [("ops", 50, lambda: op_rows(device, DRY_SHAPES if args.dry else ANCHORS, time_us,
                                          result["copy_bandwidth_GBps"] * 1e9, result["dense_bf16_TFLOPs"] * 1e12,
                                          budget)),
             ("eval", 25, lambda: eval_part(mini, torch.bfloat16)),
             ("finetune_epoch", 40, lambda: finetune_epoch_part(mini)),
             ("search", 25, lambda: search_part(mini, "bf16")),
             # The step under torch.compile replaying CUDA graphs (a dry run only traces it: no inductor in CI).
             ("finetune_epoch_graphs", 90, lambda: finetune_epoch_part(mini, "trace" if args.dry else "graphs")),
             ("fp32", 20, lambda: {"eval": eval_part(mini, None), "search": search_part(mini, "fp32", ("exhaustive",))}),
             ("grouped", 20, lambda: grouped_part(mini))]
    # On a CPU the layers keep their composite form unless told otherwise; the dry run forces the fused
    # low-rank path a GPU takes.
    with fused_everywhere() if device.type != "cuda" else contextlib.nullcontext():
        wanted = set(args.parts.split(",")) if args.parts else {name for name, _, _ in parts}
        for name, estimate, run in parts:
            if name not in wanted:
                continue
            if not budget.allows(estimate):
                budget.skipped.append(name)
                continue
            t0 = time.perf_counter()
            try:
                result[name] = run()
            except Exception as e:
                # The GPU run happens once, unattended: a part that fails is recorded and the others still
                # run. A dry run is the check that every part works, so there it fails.
                if args.dry:
                    raise
                result[name] = {"error": error_text(e)}
            result[f"{name}_wall_s"] = time.perf_counter() - t0
            if args.out:  # what is done so far survives a run killed at the end of its slot
                atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    # Every goal in one place (None: the part did not run); in a dry run they mean nothing.
    result["goals_met"] = {
        **{f"ops {(row['T'], row['d'], row['r'], row['E'], row['k'])} {row['regime']}": row["goal_met"]
           for row in result.get("ops", []) if "goal_met" in row},
        **{part: result[part]["goal_met"] if part in result else None
           for part in ("eval", "finetune_epoch", "finetune_epoch_graphs", "search")}}
    result["wall_s"] = budget.elapsed()
    report(result, args.out, indent=1)


if __name__ == "__main__":
    main()
