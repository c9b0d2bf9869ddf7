"""Benchmark: the LoRA-MoE expert op on CPU at MiniLM shapes, forward and forward+backward, in one run.

Compares the sorted grouped reference, the low-rank form the dispatcher picks for small E*r, and the
expert loop of MoLA / MixLoRA-style code (gather, two matmuls, index_add per expert). Prints JSON.

    python bench/lora_moe_cpu.py [--reps 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from routing_env.moe.kernels import lora_moe_lowrank, lora_moe_reference


def expert_loop(x, A, B, idx, gates, scale):
    """Per expert: find its tokens with a mask, gather, two matmuls, scatter-add (the common pattern)."""
    out = torch.zeros(x.shape[0], B.shape[1])
    for e in range(A.shape[0]):
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        if tok.numel():
            y = (x[tok] @ A[e].T) @ B[e].T * (gates[tok, slot] * scale).unsqueeze(1)
            out = out.index_add(0, tok, y)
    return out


def timed(fn, backward: bool, reps: int = 5) -> float:
    def once():
        out = fn()
        if backward:
            out.sum().backward()
    once()
    t0 = time.perf_counter()
    for _ in range(reps):
        once()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    # argparse first: `--help` prints the usage and exits before any tensor is made (the run takes minutes).
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per op and shape (their mean is reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = ap.parse_args()
    if args.reps < 1:
        ap.error(f"--reps must be at least 1, got {args.reps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    for T, d_in, d_out, E, k, r in [(16384, 384, 1536, 4, 2, 8), (16384, 1536, 384, 4, 2, 8), (16384, 384, 384, 8, 2, 8)]:
        x = torch.randn(T, d_in, requires_grad=True)
        A = (torch.randn(E, r, d_in) * 0.05).requires_grad_()
        B = (torch.randn(E, d_out, r) * 0.05).requires_grad_()
        logits = torch.randn(T, E, requires_grad=True)
        idx = logits.topk(k, -1).indices
        row = {"T": T, "d_in": d_in, "d_out": d_out, "E": E, "k": k, "r": r}
        for name, op in [("sorted_reference", lora_moe_reference), ("lowrank", lora_moe_lowrank), ("expert_loop", expert_loop)]:
            f = lambda op=op: op(x, A, B, idx, logits.softmax(-1).gather(1, idx), 2.0)  # noqa: E731
            row[name] = {"forward_ms": 1e3 * timed(f, False, args.reps),
                         "forward_backward_ms": 1e3 * timed(f, True, args.reps)}
        for name in ("sorted_reference", "lowrank"):
            row[f"{name}_speedup_vs_loop"] = {
                p: row["expert_loop"][f"{p}_ms"] / row[name][f"{p}_ms"] for p in ("forward", "forward_backward")}
        results.append(row)
    print(json.dumps({"torch_threads": torch.get_num_threads(), "shapes": results}, indent=2))


if __name__ == "__main__":
    main()
