"""The Triton LoRA-MoE kernels against the PyTorch reference: outputs and all four gradients.

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py before
Triton is first imported); on a GPU, ``TRITON_INTERPRET=0 pytest tests/moe/test_triton_kernel.py``
runs the last test compiled. Shapes are odd on purpose: T = 1, widths that
are not powers of two, k = 1..4, ranks below the 16 a ``tl.dot`` needs, experts with no tokens, E = 64.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from routing_env.moe.kernels import lora_moe, lora_moe_reference  # noqa: E402
from routing_env.moe.kernels.lora_moe_triton import BLOCK_M, align_assignments, lora_moe_triton  # noqa: E402

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
]


def _case(T, d_in, d_out, E, r, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g)
    A = torch.randn(E, r, d_in, generator=g) / d_in**0.5
    B = torch.randn(E, d_out, r, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    gates = torch.rand(T, k, generator=g).softmax(-1)
    dy = torch.randn(T, d_out, generator=g)
    return [t.to(dtype) for t in (x, A, B, gates, dy)], idx


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference_outputs_and_all_gradients(shape, dtype):
    (x, A, B, gates, dy), idx = _case(*shape, dtype)
    ours = [t.clone().requires_grad_() for t in (x, A, B, gates)]
    ref = [t.float().clone().requires_grad_() for t in (x, A, B, gates)]  # fp32 on the same (rounded) values
    y = lora_moe_triton(ours[0], ours[1], ours[2], idx, ours[3], 2.0)
    y_ref = lora_moe_reference(ref[0], ref[1], ref[2], idx, ref[3], 2.0)
    assert y.dtype == dtype and y.shape == y_ref.shape
    grads = torch.autograd.grad(y, ours, dy)
    grads_ref = torch.autograd.grad(y_ref, ref, dy.float())
    assert _rel(y, y_ref) < RTOL[dtype]
    for name, g, g_ref in zip(("x", "A", "B", "gate"), grads, grads_ref):
        assert g.dtype == dtype and _rel(g, g_ref) < RTOL[dtype], name


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


def test_align_assignments_covers_every_slot_once_in_its_experts_blocks():
    idx = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 2], [1, 0]])  # expert 4 and 5 empty
    ids, block_expert = align_assignments(idx, 6)
    assert ids.numel() == block_expert.numel() * BLOCK_M
    real = ids[ids >= 0]
    assert sorted(real.tolist()) == list(range(idx.numel()))  # each (token, slot) once
    for b, e in enumerate(block_expert.tolist()):
        block = ids[b * BLOCK_M:(b + 1) * BLOCK_M]
        if e < 0:
            assert (block == -1).all()
        else:
            assert (idx.reshape(-1)[block[block >= 0]] == e).all() and (block >= 0).any()
    assert sorted(e for e in block_expert.tolist() if e >= 0) == [0, 1, 2, 3]  # no block for an empty expert


def test_dispatch_uses_the_reference_off_the_gpu():
    (x, A, B, gates, _), idx = _case(7, 40, 24, 8, 8, 2, torch.float32)  # E * r * 4 > d_in: the grouped form
    assert torch.equal(lora_moe(x, A, B, idx, gates, 2.0), lora_moe_reference(x, A, B, idx, gates, 2.0))


@pytest.fixture(scope="module")
def sm90() -> dict:
    """Every kernel compiled for sm_90 in a fresh process (here Triton was imported in interpreter mode)."""
    script = ("import json; from routing_env.moe.kernels.lora_moe_triton import compile_report as c; print(json.dumps("
              "{f'{k} {d} {r}': c(k, d, r) for k in ('fwd', 'bwd') for d, r in (('bf16', 16), ('fp32', 16), ('bf16', 64))}))")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
@pytest.mark.parametrize("dtype, rank", [("bf16", 16), ("fp32", 16), ("bf16", 64)])
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
    for shape in SHAPES + [(4096, 1024, 1024, 16, 16, 2)]:
        (x, A, B, gates, dy), idx = _case(*shape, dtype)
        x, A, B, gates, dy, idx = (t.cuda() for t in (x, A, B, gates, dy, idx))
        ours = [t.clone().requires_grad_() for t in (x, A, B, gates)]
        ref = [t.float().clone().requires_grad_() for t in (x, A, B, gates)]
        y = lora_moe(ours[0], ours[1], ours[2], idx, ours[3], 2.0) if shape[3] * shape[4] * 4 > shape[1] else \
            lora_moe_triton(ours[0], ours[1], ours[2], idx, ours[3], 2.0)
        y_ref = lora_moe_reference(ref[0], ref[1], ref[2], idx, ref[3], 2.0)
        tol = RTOL[dtype] if dtype == torch.bfloat16 else 2e-3  # tf32 is not used for fp32 (ieee); 2e-3 for atomics' order
        assert _rel(y, y_ref) < tol
        for g, g_ref in zip(torch.autograd.grad(y, ours, dy), torch.autograd.grad(y_ref, ref, dy.float())):
            assert _rel(g, g_ref) < tol
