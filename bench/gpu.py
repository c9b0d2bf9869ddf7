"""The GPU benchmark of issue 13, in one run (about 5 minutes on one H100/H200). JSON out.

1. The LoRA-MoE expert op ``y = scale * sum_j gate[t,j] B[e_tj] A[e_tj] x[t]``, forward and
   forward+backward, at the anchor shapes: the Triton kernels, the sorted PyTorch reference, the
   expert loop of MoLA/MixLoRA-style code, the dense form (every expert on every token, gated) and
   ``torch.compile`` of the dense form, against the memory roofline (bytes that must move / the
   copy bandwidth measured in the same run).
2. MiniLM-L6 LoRA-MoE on ARC-Easy: evaluation sequences/s, training sequences/s (and the seconds an
   ARC-Easy epoch would take), MCTS and exhaustive search questions/s, in fp32 and under bf16
   autocast; and the grouped expert form (rank 32, where the dispatcher leaves the low-rank form)
   with the Triton kernel on and off.

``--dry`` runs every part at tiny sizes on whatever device there is (CPU in CI, Triton through its
interpreter), so the script cannot rot. Offline on a GPU machine it needs, besides the checkout, a
bundle that ``make gpu-bundle`` prepares (wheels the machine lacks, an fp16 copy of MiniLM, ARC-Easy):
see ``bench/gpu_run.sh`` and the README's "GPU" section.

    python bench/gpu.py [--dry] [--out results/bench/gpu.json] [--budget-s 330]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

import torch

if "--dry" in sys.argv and not torch.cuda.is_available():
    # A dry run on a CPU runs the Triton kernels through the interpreter (set before triton is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from routing_env.moe.kernels import lora_moe_lowrank, lora_moe_reference
from routing_env.moe.kernels.backend import triton_enabled
from routing_env.common.results import report

#: (T tokens, d width, r rank, E experts, k) -- issue 13's anchor, a wider expert set, a long sequence
ANCHORS = [(8192, 4096, 16, 8, 2), (8192, 2048, 16, 16, 2), (32768, 1024, 16, 8, 2)]
DRY_SHAPES = [(37, 48, 4, 5, 2)]


def expert_loop(x, A, B, idx, gates, scale):
    """Per expert: find its tokens with a mask, gather, two matmuls, scatter-add (the common pattern)."""
    out = torch.zeros(x.shape[0], B.shape[1], device=x.device, dtype=x.dtype)
    for e in range(A.shape[0]):
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        y = (x[tok] @ A[e].T) @ B[e].T * (gates[tok, slot] * scale).unsqueeze(1).to(x.dtype)
        out = out.index_add(0, tok, y)
    return out


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Microseconds per call: triton's ``do_bench`` on a GPU (cache flushed, median), wall clock on CPU."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: 1e3 * triton.testing.do_bench(fn, warmup=10, rep=50)

    def cpu(fn):
        fn()
        t0 = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - t0)

    return cpu


def copy_bandwidth(device: torch.device, nbytes: int, time_us) -> float:
    """Bytes per second of a device-to-device copy (read + write), the roofline's denominator."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / (time_us(lambda: dst.copy_(src)) * 1e-6)


def kernels(device: torch.device, shapes, dtype: torch.dtype, time_us, bandwidth: float, compile_backend: str) -> list:
    from routing_env.moe.kernels.lora_moe_triton import lora_moe_triton

    rows = []
    compiled = torch.compile(lora_moe_lowrank, backend=compile_backend, dynamic=False)
    for T, d, r, E, k in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(T, d, device=device, dtype=dtype, generator=g).requires_grad_()
        A = (torch.randn(E, r, d, device=device, dtype=dtype, generator=g) / d**0.5).requires_grad_()
        B = torch.randn(E, d, r, device=device, dtype=dtype, generator=g).requires_grad_()
        idx = torch.rand(T, E, device=device, generator=g).topk(k, dim=1).indices
        gates = torch.rand(T, k, device=device, generator=g).softmax(-1).to(dtype).requires_grad_()
        dy = torch.randn(T, d, device=device, dtype=dtype, generator=g)
        size = torch.finfo(dtype).bits // 8
        weights = E * r * 2 * d * size
        fwd_bytes = 2 * T * d * size + weights + T * k * (8 + size)  # read x, write y, A, B, ids, gates
        bwd_bytes = 3 * T * d * size + 2 * weights + T * k * (8 + 2 * size)  # read dy and x, write dx, dA/dB, dgates
        row = {"T": T, "d": d, "r": r, "E": E, "k": k, "dtype": str(dtype).split(".")[-1],
               "roofline_us": {"fwd": 1e6 * fwd_bytes / bandwidth, "fwd_bwd": 1e6 * (fwd_bytes + bwd_bytes) / bandwidth}}
        for name, fn in (("triton", lora_moe_triton), ("reference", lora_moe_reference), ("loop", expert_loop),
                         ("dense", lora_moe_lowrank), ("compile_dense", compiled)):
            fwd = lambda fn=fn: fn(x, A, B, idx, gates, 2.0)  # noqa: E731
            both = lambda fwd=fwd: torch.autograd.grad(fwd(), (x, A, B, gates), dy)  # noqa: E731
            row[name] = {"fwd_us": time_us(fwd), "fwd_bwd_us": time_us(both)}
        row["triton_over_roofline"] = {p: row["triton"][f"{p}_us"] / row["roofline_us"][p] for p in ("fwd", "fwd_bwd")}
        row["loop_over_triton"] = {p: row["loop"][f"{p}_us"] / row["triton"][f"{p}_us"] for p in ("fwd", "fwd_bwd")}
        rows.append(row)
    return rows


def minilm(device: torch.device, data_dir: str | None, dry: bool) -> dict:
    """Sequences/s of evaluation and training, questions/s of search, fp32 vs bf16, kernel on vs off."""
    import agents
    from routing_env.data import load_task
    from routing_env.env import RoutingEnv
    from routing_env.training.evaluation import batch_encoder, evaluate, iterate_batches
    from routing_env.moe import MoEConfig, RoutingPlan, build_model
    from routing_env.common.utils import autocast

    n_eval, n_train, n_search = (8, 4, 2) if dry else (512, 512, 64)
    dev = load_task("arc-easy", "dev", data_dir, limit=n_eval)
    train = load_task("arc-easy", "train", data_dir, limit=n_train)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {}
    for label, moe, amp in (("fp32", MoEConfig(), None), ("bf16", MoEConfig(), torch.bfloat16),
                            ("bf16_grouped_rank32_kernel_on", MoEConfig(rank=32), torch.bfloat16),
                            ("bf16_grouped_rank32_kernel_off", MoEConfig(rank=32), torch.bfloat16)):
        os.environ["ROUTING_GYM_TRITON"] = "0" if label.endswith("kernel_off") else "1"
        triton_enabled.cache_clear()
        model = build_model("lora-moe", "minilm", moe, seed=0).to(device)
        tok = model.tokenizer_for("minilm")
        row: dict = {}
        for rep in range(2):  # the first pass warms up (allocator, kernels' autotuning)
            sync()
            t0 = time.perf_counter()
            res = evaluate(model, tok, dev, batch_size=64, device=device, progress=False, amp_dtype=amp)
            sync()
            row["eval_sequences_per_s"] = sum(len(e.choices) for e in dev) / (time.perf_counter() - t0)
        encode = batch_encoder(model, tok, 128)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()
        batches = [encode(b).to(device) for b in iterate_batches(train, 16)]
        for rep in range(2):
            sync()
            t0 = time.perf_counter()
            for batch in batches:
                with model.routed(RoutingPlan(compute_aux=True)) as rec, autocast(device, amp):
                    loss = torch.nn.functional.cross_entropy(model(batch).float(), batch.labels)
                    loss = loss + 0.01 * torch.stack(rec.aux_losses).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sync()
            dt = time.perf_counter() - t0
        row["train_sequences_per_s"] = sum(int(b.choice_mask.sum()) for b in batches) / dt
        row["arc_easy_epoch_s"] = dt * 2251 / len(train)
        env = RoutingEnv(model=model.eval(), device=str(device), max_examples=n_search, data_dir=data_dir,
                         precision="bf16" if amp else "fp32")
        env.batch_rows = 4096  # one batched forward per group level
        for name, kw in (("mcts", {"num_simulations": 32, "batch_size": 64}), ("exhaustive", {"batch_size": 64})):
            env.cache.clear()
            sync()
            t0 = time.perf_counter()
            agents.run_agent(agents.make(name, **kw), env, list(range(n_search)))
            sync()
            row[f"search_{name}_questions_per_s"] = n_search / (time.perf_counter() - t0)
        row["dev_accuracy_untrained"] = res.accuracy
        out[label] = row
    os.environ.pop("ROUTING_GYM_TRITON", None)
    triton_enabled.cache_clear()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="tiny sizes on any device (CI): checks that everything runs")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--data-dir", default=os.environ.get("ROUTING_ENV_DATA"))
    ap.add_argument("--budget-s", type=float, default=330,
                    help="skip the parts that would start after this (not in --dry, which runs every part)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.dry:
        raise SystemExit("bench/gpu.py times a GPU; none is visible. `--dry` runs it at tiny sizes on the CPU.")
    t0 = time.perf_counter()
    time_us = timer(device)
    result: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dry": args.dry,
                    "torch": torch.__version__, "skipped": []}
    result["copy_bandwidth_GBps"] = copy_bandwidth(device, 2**20 if args.dry else 2**30, time_us) / 1e9
    parts = [("kernels_bf16", lambda: kernels(device, DRY_SHAPES if args.dry else ANCHORS, torch.bfloat16, time_us,
                                               result["copy_bandwidth_GBps"] * 1e9, "eager" if args.dry else "inductor")),
             ("kernels_fp32", lambda: kernels(device, DRY_SHAPES if args.dry else ANCHORS[:1], torch.float32, time_us,
                                               result["copy_bandwidth_GBps"] * 1e9, "eager" if args.dry else "inductor")),
             ("minilm", lambda: minilm(device, args.data_dir, args.dry))]
    for name, run in parts:
        # The budget keeps a GPU run inside its slot; a dry run's parts are seconds each and all of them are
        # what it checks, so a slow or busy CI machine must not skip one.
        if not args.dry and time.perf_counter() - t0 > args.budget_s:
            result["skipped"].append(name)
            continue
        result[name] = run()
        result[f"{name}_wall_s"] = time.perf_counter() - t0
    report(result, args.out, indent=1)


if __name__ == "__main__":
    main()
