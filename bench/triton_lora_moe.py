"""Time the LoRA-MoE expert op on a GPU: Triton kernels vs the PyTorch reference (sorted, per-expert
matmuls) vs the low-rank form, forward and forward+backward, at one LLM-width shape. JSON out.

    python bench/triton_lora_moe.py --tokens 4096 --width 1024 --experts 16 --rank 16 --top-k 2
"""

from __future__ import annotations

import argparse
import json

import torch

from routing_env.moe.kernels import lora_moe_lowrank, lora_moe_reference


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default in (("tokens", 4096), ("width", 1024), ("experts", 16), ("rank", 16), ("top-k", 2)):
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark times GPU kernels; no CUDA device")
    import triton.testing

    from routing_env.moe.kernels.lora_moe_triton import lora_moe_triton

    dev, dt = "cuda", getattr(torch, a.dtype)
    T, d, E, r, k = a.tokens, a.width, a.experts, a.rank, a.top_k
    x = torch.randn(T, d, device=dev, dtype=dt, requires_grad=True)
    A = (torch.randn(E, r, d, device=dev, dtype=dt) / d**0.5).requires_grad_()
    B = torch.randn(E, d, r, device=dev, dtype=dt).requires_grad_()
    idx = torch.rand(T, E, device=dev).topk(k, dim=1).indices
    gates = torch.rand(T, k, device=dev, dtype=dt).softmax(-1).requires_grad_()
    dy = torch.randn(T, d, device=dev, dtype=dt)
    out = {"shape": {"T": T, "d": d, "E": E, "r": r, "k": k, "dtype": a.dtype}, "device": torch.cuda.get_device_name()}
    for name, fn in (("triton", lora_moe_triton), ("reference", lora_moe_reference), ("lowrank", lora_moe_lowrank)):
        fwd = lambda: fn(x, A, B, idx, gates, 2.0)  # noqa: E731
        both = lambda: torch.autograd.grad(fwd(), (x, A, B, gates), dy)  # noqa: E731
        out[name] = {"fwd_us": 1e3 * triton.testing.do_bench(fwd), "fwd_bwd_us": 1e3 * triton.testing.do_bench(both)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
