"""The Triton LoRA-MoE kernels against the PyTorch reference: outputs and all four gradients.

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py before
Triton is first imported); on a GPU, ``TRITON_INTERPRET=0 pytest tests/moe/test_triton_kernel.py``
runs the last test compiled. Shapes are odd on purpose: T = 1, widths that are not powers of two,
k = 1..4, ranks below the 16 a ``tl.dot`` needs and between powers of two, experts with no tokens,
E = 64. Besides the numbers: the alignment's invariants and launch count, no atomics, the custom op
under ``torch.compile``, and an ahead-of-time sm_90 compile of every kernel without register spills.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest
import torch

triton = pytest.importorskip("triton")

from routing_env.common.opcount import OpCounter  # noqa: E402
from routing_env.moe.kernels import lora_moe_reference  # noqa: E402
from routing_env.moe.kernels import lora_moe_triton as module  # noqa: E402
from routing_env.moe.kernels.lora_moe_triton import (  # noqa: E402
    BLOCK_M,
    KERNELS,
    align_assignments,
    lora_moe_sorted,
    lora_moe_triton,
)

#: Relative tolerance (max error / max magnitude of the reference). fp32: summation order only,
#: a few ulps of sums over d_in and d_out. bf16: inputs, activations and outputs rounded to 8-bit
#: mantissas (eps 2^-8 = 0.4%), compared with the fp32 reference on the same bf16 values. A wrong
#: expert or a lost slot is an O(1) error, far above both.
RTOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}

SHAPES = [  # T, d_in, d_out, E, r, k
    (1, 33, 17, 3, 5, 1),
    (7, 40, 24, 4, 8, 2),
    (13, 48, 50, 8, 4, 3),
    (9, 20, 30, 64, 16, 4),  # most of the 64 experts get no token
    (40, 37, 65, 6, 24, 2),  # rank above 16: padded to 32
    (30, 70, 90, 5, 40, 2),  # rank padded to 64, d_in and d_out over one 64-wide tile
]


def _case(T, d_in, d_out, E, r, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g)
    A = torch.randn(E, r, d_in, generator=g) / d_in**0.5
    B = torch.randn(E, d_out, r, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k).long()
    gates = torch.rand(T, k, generator=g).softmax(-1)
    dy = torch.randn(T, d_out, generator=g)
    return [t.to(dtype) for t in (x, A, B, gates, dy)], idx


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _compare(shape, dtype, device: str = "cpu", tol: float | None = None, block_m: int = BLOCK_M) -> None:
    """Output and the gradients for x, A, B and gates against the fp32 reference on the same values."""
    (x, A, B, gates, dy), idx = _case(*shape, dtype)
    x, A, B, gates, dy, idx = (t.to(device) for t in (x, A, B, gates, dy, idx))
    ours = [t.clone().requires_grad_() for t in (x, A, B, gates)]
    ref = [t.float().clone().requires_grad_() for t in (x, A, B, gates)]
    y = lora_moe_triton(ours[0], ours[1], ours[2], idx, ours[3], 2.0, block_m=block_m)
    y_ref = lora_moe_reference(ref[0], ref[1], ref[2], idx, ref[3], 2.0)
    assert y.dtype == dtype and y.shape == y_ref.shape
    tol = RTOL[dtype] if tol is None else tol
    assert _rel(y, y_ref) < tol
    grads = torch.autograd.grad(y, ours, dy)
    grads_ref = torch.autograd.grad(y_ref, ref, dy.float())
    for name, g, g_ref in zip(("x", "A", "B", "gate"), grads, grads_ref):
        assert g.dtype == dtype and g.shape == g_ref.shape and _rel(g, g_ref) < tol, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference_outputs_and_all_gradients(shape, dtype):
    _compare(shape, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_several_blocks_per_expert(dtype):
    """16-row blocks: each of 3 experts gets about 80 of the 120 slots, ~5 blocks for bwd_dw to sum over."""
    _compare((60, 37, 65, 3, 24, 2), dtype, block_m=16)


def test_a_wrong_expert_breaks_the_tolerance():
    """The tolerance is tight enough to see one slot routed to another expert."""
    (x, A, B, gates, _), idx = _case(7, 40, 24, 4, 8, 2, torch.float32)
    wrong = idx.clone()
    wrong[3, 0] = (wrong[3, 0] + 1) % 4
    if (wrong[3, 0] == wrong[3, 1]).item():
        wrong[3, 0] = (wrong[3, 0] + 1) % 4
    assert _rel(lora_moe_triton(x, A, B, wrong, gates, 2.0), lora_moe_reference(x, A, B, idx, gates, 2.0)) > 100 * RTOL[torch.float32]


def test_experts_without_tokens_get_exactly_zero_gradients():
    (x, A, B, gates, dy), idx = _case(5, 24, 20, 64, 8, 2, torch.float32)
    A.requires_grad_(), B.requires_grad_()
    dA, dB = torch.autograd.grad(lora_moe_triton(x, A, B, idx, gates, 1.0), (A, B), dy)
    unused = torch.ones(64, dtype=torch.bool)
    unused[idx.unique()] = False
    assert unused.sum() >= 54 and (dA[unused] == 0).all() and (dB[unused] == 0).all()


def test_no_tokens():
    (x, A, B, gates, _), idx = _case(0, 24, 20, 4, 8, 2, torch.float32)
    A.requires_grad_()
    y = lora_moe_triton(x, A, B, idx, gates, 1.0)
    assert y.shape == (0, 20) and (torch.autograd.grad(y, A, torch.zeros_like(y))[0] == 0).all()


@pytest.mark.parametrize("block_m", [16, BLOCK_M])
@pytest.mark.parametrize("T, k, E", [(5, 2, 6), (40, 3, 4), (9, 4, 64), (100, 1, 2), (700, 3, 16)])  # last: 3 programs
def test_align_assignments_covers_every_slot_once_in_its_experts_blocks(T, k, E, block_m):
    g = torch.Generator().manual_seed(T)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    idx[idx == 1] = 0  # expert 1 gets no token
    ids, block_expert, block_start = align_assignments(idx, E, block_m)
    flat = idx.reshape(-1)
    assert ids.numel() == block_expert.numel() * block_m and block_start.numel() == E + 1
    assert sorted(ids[ids >= 0].tolist()) == list(range(flat.numel()))  # each (token, slot) once
    used = int(block_start[E])
    assert (block_expert[:used] >= 0).all() and (block_expert[used:] == -1).all()
    for e in range(E):  # expert e owns blocks [start_e, start_e+1): its slots in order, then -1 padding
        lo, hi = int(block_start[e]), int(block_start[e + 1])
        assert (block_expert[lo:hi] == e).all()
        mine = (flat == e).nonzero().flatten()
        rows = ids[lo * block_m:hi * block_m]
        assert hi - lo == -(-mine.numel() // block_m)  # no empty block, none for an empty expert
        assert torch.equal(rows[:mine.numel()].long(), mine) and (rows[mine.numel():] == -1).all()
    assert (ids[used * block_m:] == -1).all()


class _Launches:
    """Stands in for a ``@triton.jit`` kernel: counts ``kernel[grid](...)`` launches, runs nothing."""

    def __init__(self, name: str, counts: Counter) -> None:
        self.name, self.counts = name, counts

    def __getitem__(self, grid: Any):  # noqa: ANN204
        def launch(*args: Any, **kwargs: Any) -> None:
            self.counts[self.name] += 1
        return launch


def _count(monkeypatch, fn, *args) -> tuple[Counter, Counter, dict]:
    """(Triton launches, aten ops that launch a kernel, sync ops) of ``fn(*args)``: views and
    allocations (``empty*``) launch nothing on a GPU."""
    launches: Counter = Counter()
    for name in ("_align_kernel", "_fwd_kernel", "_bwd_dx_kernel", "_bwd_dw_kernel"):
        monkeypatch.setattr(module, name, _Launches(name, launches))

    class Ops(OpCounter):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            if not func.is_view and not func._schema.name.split("::")[-1].startswith(("empty", "new_empty")):
                self.ops[func._schema.name.split("::")[-1]] += 1
            return func(*args, **(kwargs or {}))

    with Ops() as ops:
        fn(*args)
    return launches, ops.ops, ops.syncs


@pytest.mark.parametrize("k", [1, 3])
def test_launch_counts_and_no_sync(monkeypatch, k):
    """align is one Triton launch; forward and backward are two each, plus the sum over k slots (B stored
    rank-major, as ``LoRAMoELinear`` holds it: read as it is, no copy)."""
    (x, A, B, gates, dy), idx = _case(9, 20, 30, 8, 5, k, torch.float32)
    B = B.transpose(1, 2).contiguous().transpose(1, 2)  # [E, d_out, r] over [E, r, d_out] memory
    launches, ops, syncs = _count(monkeypatch, align_assignments, idx, 8)
    assert launches == {"_align_kernel": 1} and sum(ops.values()) == 0 and syncs == {}
    launches, ops, syncs = _count(monkeypatch, module._forward, x, A, B, idx, gates, 2.0, BLOCK_M)
    assert launches == {"_align_kernel": 1, "_fwd_kernel": 1} and syncs == {}
    assert ops == (Counter() if k == 1 else Counter({"sum": 1}))
    plan = module._align(idx, 8, BLOCK_M)
    launches, ops, syncs = _count(monkeypatch, module._backward_impl, dy, x, A, B, idx, gates, plan, 2.0, BLOCK_M)
    assert launches == {"_bwd_dx_kernel": 1, "_bwd_dw_kernel": 1} and syncs == {}
    assert ops == (Counter() if k == 1 else Counter({"sum": 1}))


def test_no_atomics():
    """Every output element is written by one program: results are the same run to run."""
    assert "atomic_" not in inspect.getsource(module)  # tl.atomic_add, atomic_max, atomic_cas, ...


def test_custom_op_registration():
    (x, A, B, gates, _), idx = _case(9, 20, 30, 8, 5, 2, torch.float32)
    args = (x.requires_grad_(), A.requires_grad_(), B.requires_grad_(), idx, gates.requires_grad_(), 2.0, 16)
    torch.library.opcheck(lora_moe_sorted, args)  # schema, fake shapes, autograd registration, AOT dispatch


def test_torch_compile_traces_the_custom_op_without_a_graph_break():
    (x, A, B, gates, dy), idx = _case(9, 20, 30, 8, 5, 2, torch.float32)
    leaves = [t.requires_grad_() for t in (x, A, B, gates)]

    def fn(x, A, B, idx, gates):  # noqa: ANN001, ANN202
        return lora_moe_triton(x, A, B, idx, gates, 2.0) * 3.0

    y = torch.compile(fn, backend="eager", fullgraph=True)(x, A, B, idx, gates)
    y_eager = fn(x, A, B, idx, gates)
    assert torch.equal(y, y_eager)
    for g, g_eager in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(y_eager, leaves, dy)):
        assert torch.equal(g, g_eager)


AOT_CASES = [(kernel, dtype, rank) for kernel in KERNELS for dtype in ("fp32", "bf16") for rank in (16, 64)]


@pytest.fixture(scope="module")
def sm90() -> dict:
    """Every kernel compiled for sm_90 in a fresh process (here Triton was imported in interpreter mode)."""
    script = ("import json; from routing_env.moe.kernels.lora_moe_triton import compile_report as c; print(json.dumps("
              f"{{f'{{k}} {{d}} {{r}}': c(k, d, r) for k, d, r in {AOT_CASES!r}}}))")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kernel, dtype, rank", AOT_CASES)
def test_kernels_compile_for_sm90_without_spills(sm90, kernel, dtype, rank, capsys):
    """Ahead-of-time compile for the H100/H200 (sm_90), no GPU needed; report registers and memory."""
    r = sm90[f"{kernel} {dtype} {rank}"]
    with capsys.disabled():
        print(f"\nsm_90 {kernel} {dtype} rank<={rank}: {r['registers']} registers, shared {r['static_shared']} B static "
              f"+ {r['dynamic_shared']} B dynamic, spills {r['spill_bytes']} B")
    assert r["spill_bytes"] == 0  # no register spills
    assert r["static_shared"] + r["dynamic_shared"] <= 228 * 1024  # fits one SM's shared memory


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_on_the_gpu_matches_the_reference(dtype):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("run this file with TRITON_INTERPRET=0 on the GPU")
    # fp32 dots run as "ieee" (no tf32) in the kernels; 1e-4 leaves room for the reference's
    # cuBLAS summation order over d_in = 1024.
    for shape in SHAPES + [(4096, 1024, 1024, 16, 16, 2), (2048, 512, 768, 64, 64, 4)]:
        _compare(shape, dtype, "cuda", RTOL[dtype] if dtype == torch.bfloat16 else 1e-4)
    (x, A, B, gates, _), idx = _case(4096, 1024, 1024, 16, 16, 2, dtype)
    x, A, B, gates, idx = (t.cuda() for t in (x, A, B, gates, idx))
    assert torch.equal(lora_moe_triton(x, A, B, idx, gates, 2.0), lora_moe_triton(x, A, B, idx, gates, 2.0))
