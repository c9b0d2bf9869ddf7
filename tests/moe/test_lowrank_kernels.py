"""The low-rank LoRA-MoE ops: Triton kernels against their PyTorch references, and the whole-layer op.

On CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py); the custom
ops' CPU implementations are the references. Shapes are odd on purpose: T = 1, widths that are not
powers of two, E = 2..64, ranks 1..16, k = 1..4, and selection biases that force experts in or out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from routing_env.moe.kernels.expert_gate import (BLOCK_T, block_sums, expert_gate, expert_gate_backward,  # noqa: E402
                                                 expert_gate_reference)
from routing_env.moe.kernels.expert_gate_triton import gate_backward_triton, gate_forward_triton  # noqa: E402
from routing_env.moe.kernels.lowrank import lowrank_experts, use_lowrank  # noqa: E402
from routing_env.moe.kernels.route_shrink import adapter_dx_reference, dropout_keep, route_shrink_reference  # noqa: E402
from routing_env.moe.kernels.route_shrink_triton import adapter_dx_triton, route_shrink_triton  # noqa: E402

#: Relative tolerance (max error / max magnitude of the reference). fp32: summation order only. bf16:
#: operands and outputs rounded to 8-bit mantissas (eps 2^-8 = 0.4%), against fp32 on the same bf16
#: values. A wrong expert or a lost gate is an O(1) error (test_a_wrong_expert_breaks_the_tolerance).
RTOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.bfloat16]

GATE_SHAPES = [  # T, E, r, k, renormalise
    (1, 2, 1, 1, False),
    (37, 5, 3, 2, True),
    (70, 16, 16, 4, True),
    (33, 64, 2, 2, True),
    (40, 6, 8, 1, False),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _bias(T: int, E: int, k: int) -> torch.Tensor:
    """``[R, E]`` per-row selection biases: none, a forced expert (+inf), a forced set (-inf elsewhere)."""
    R = 1 if T < 3 else next(R for R in (3, 1) if T % R == 0)
    bias = torch.zeros(R, E)
    bias[0, E - 1] = float("inf")
    if R > 1:
        bias[1] = float("-inf")
        bias[1, torch.arange(k)] = 0.0
    return bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GATE_SHAPES)
def test_gate_kernels_match_the_reference_outputs_and_gradients(shape, dtype):
    T, E, r, k, renorm = shape
    g = torch.Generator().manual_seed(T * 31 + E)
    logits, h = torch.randn(T, E, generator=g).to(dtype), torch.randn(T, E * r, generator=g).to(dtype)
    bias, w = _bias(T, E, k), (torch.rand(T, generator=g) > 0.25).float()
    loads = torch.zeros(E, dtype=torch.float64)
    hg, pc, stats = gate_forward_triton(logits, h, bias, w, loads, k, renorm, 1.5, True)
    L, H = logits.float().requires_grad_(), h.float().requires_grad_()
    hg_ref, p_ref, c_ref = expert_gate_reference(L, H, bias, k, renorm, 1.5)
    assert hg.dtype == dtype and _rel(hg, hg_ref) < RTOL[dtype]
    assert _rel(pc[:, :E], p_ref) < 1e-6 and torch.equal(pc[:, E:], c_ref)  # the same experts chosen
    assert (c_ref.sum(1) == k).all() and (c_ref[:, E - 1][: T // bias.shape[0]] == 1).all()  # the forced one is in
    assert torch.equal(loads, (w @ c_ref).double())  # integer counts: exact
    assert _rel(stats, block_sums(w[:, None] * torch.cat([p_ref, c_ref], 1))) < 1e-6
    # Backward: dhg, a gradient of the probabilities and one of the block statistics, as a loss would send.
    dhg, dprobs = torch.randn(T, E * r, generator=g), torch.randn(T, E, generator=g)
    dstats = torch.randn(stats.shape[0], 2 * E, generator=g)
    loss = (hg_ref * dhg).sum() + (p_ref * dprobs).sum() + (block_sums(w[:, None] * p_ref) * dstats[:, :E]).sum()
    dl_ref, dh_ref = torch.autograd.grad(loss, (L, H))
    for impl in (gate_backward_triton, expert_gate_backward):  # the kernel, and the op's CPU implementation
        dl, dh = impl(dhg.to(dtype), h, pc, dprobs, w, dstats, renorm, 1.5, dtype)
        assert dl.dtype == dtype and dh.dtype == dtype
        assert _rel(dl, dl_ref) < RTOL[dtype] and _rel(dh, dh_ref) < RTOL[dtype], impl.__name__


def test_gate_reads_strided_rows_and_broadcast_statistic_gradients():
    """The logits and h are column slices of route_shrink's one output; a summed statistic's gradient
    arrives broadcast over the blocks (stride 0)."""
    T, E, r = 45, 4, 3
    g = torch.Generator().manual_seed(3)
    z = torch.randn(T, E + E * r, generator=g)
    w = torch.ones(T)
    hg, pc, stats = gate_forward_triton(z[:, :E], z[:, E:], None, w, None, 2, True, 1.0, True)
    hg2, pc2, _ = gate_forward_triton(z[:, :E].contiguous(), z[:, E:].contiguous(), None, w, None, 2, True, 1.0, True)
    assert torch.equal(hg, hg2) and torch.equal(pc, pc2)
    dstats = torch.randn(2 * E, generator=g).expand(stats.shape[0], 2 * E)  # grad of stats.sum(0)
    a = gate_backward_triton(torch.ones(T, E * r), z[:, E:], pc, None, w, dstats, True, 1.0, torch.float32)
    b = gate_backward_triton(torch.ones(T, E * r), z[:, E:].contiguous(), pc, None, w, dstats.contiguous(), True, 1.0,
                             torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_wrong_expert_breaks_the_tolerance():
    T, E, r = 37, 5, 3
    g = torch.Generator().manual_seed(0)
    logits, h = torch.randn(T, E, generator=g), torch.randn(T, E * r, generator=g)
    right, _, _ = expert_gate_reference(logits, h, None, 2, True, 1.0)
    bias = torch.zeros(1, E)
    bias[0, int(logits[0].argmin())] = float("inf")  # the worst expert forced into every token's top-2
    wrong, _, _ = gate_forward_triton(logits, h, bias, None, None, 2, True, 1.0, False)
    assert _rel(wrong, right) > 100 * RTOL[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(1, 5, 2, 1), (37, 45, 5, 3), (70, 130, 4, 8)])  # T, d, E, r
def test_route_shrink_and_adapter_dx_kernels_match_the_reference(shape, p, dtype):
    T, d, E, r = shape
    g = torch.Generator().manual_seed(T + d)
    x, wr, a = (torch.randn(n, d, generator=g).to(dtype) for n in (T, E, E * r))
    seed = torch.tensor([11])
    z, xd = route_shrink_triton(x, wr, a, seed, 5, p, True)
    keep = None if p == 0 else xd != 0  # x has no exact zeros: the kernel's own mask
    if keep is not None:
        assert xd.shape == x.shape
        if keep.numel() > 1000:  # the keep rate, where the sample says something (binomial sd < 0.015)
            assert abs(float(keep.float().mean()) - (1 - p)) < 0.05
        z2, _ = route_shrink_triton(x, wr, a, seed, 5, p, False)
        assert torch.equal(z, z2)  # the same draw without storing xd
    z_ref, xd_ref = route_shrink_reference(x.float(), wr.float(), a.float(), keep, p)
    assert z.dtype == dtype and _rel(z, z_ref) < RTOL[dtype]
    if keep is not None:
        assert _rel(xd, xd_ref) < RTOL[dtype]
    dx, dh, dl = torch.randn(T, d, generator=g).to(dtype), torch.randn(T, E * r, generator=g).to(dtype), \
        torch.randn(T, E, generator=g).to(dtype)
    ref = dx.float() + adapter_dx_reference(dh, a, dl, wr, keep, p)
    adapter_dx_triton(dx, dh, a, dl, wr, seed, 5, p)  # the same seed: the same mask as the forward
    assert _rel(dx, ref) < RTOL[dtype]


def _layer_case(T=41, d_in=23, d_out=19, E=4, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g)
    W, b = torch.randn(d_out, d_in, generator=g) / d_in**0.5, torch.randn(d_out, generator=g)
    Wr, A = torch.randn(E, d_in, generator=g), torch.randn(E * r, d_in, generator=g) / d_in**0.5
    B = torch.randn(E * r, d_out, generator=g)
    return x, W, b, Wr, A, B


def _composite(x, W, b, Wr, A, B, keep, p, bias, w, k, renorm, scale):
    """The layer written as plain differentiable references: what LowRankExperts must equal."""
    z, _ = route_shrink_reference(x, Wr, A, keep, p)
    E = Wr.shape[0]
    hg, probs, chosen = expert_gate_reference(z[:, :E], z[:, E:], bias, k, renorm, scale)
    stats = block_sums(w[:, None] * torch.cat([probs, chosen], 1))
    return x @ W.t() + b + hg @ B, torch.cat([probs, chosen], 1), stats


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("k, renorm", [(2, True), (1, False)])
def test_lowrank_experts_forward_and_all_gradients_equal_the_composite(p, k, renorm):
    x, W, b, Wr, A, B = _layer_case()
    E, T = Wr.shape[0], x.shape[0]
    bias = _bias(T, E, k) if k > 1 else None
    w = (torch.rand(T, generator=torch.Generator().manual_seed(1)) > 0.2).float()
    seed = torch.tensor([5])
    ours = [t.clone().requires_grad_() for t in (x, Wr, A, B)]
    ref = [t.clone().requires_grad_() for t in (x, Wr, A, B)]
    out, pc, stats = lowrank_experts(ours[0], W, b, ours[1], ours[2], ours[3], seed=seed, salt=9, sel_bias=bias, w=w,
                                     top_k=k, renorm=renorm, scale=2.0, p_drop=p, want_stats=True)
    keep = dropout_keep((T, x.shape[1]), seed, 9, p, x.device) if p > 0 else None
    out_ref, pc_ref, stats_ref = _composite(ref[0], W, b, ref[1], ref[2], ref[3], keep, p, bias, w, k, renorm, 2.0)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(pc[:, E:], pc_ref[:, E:])
    g = torch.Generator().manual_seed(2)
    dout, dprobs = torch.randn(out.shape, generator=g), torch.randn(T, E, generator=g)
    dsum = torch.randn(2 * E, generator=g)  # the statistics are used summed over blocks, as the recorder does
    loss = lambda o, q, s: (o * dout).sum() + (q[:, :E] * dprobs).sum() + (s.sum(0) * dsum).sum()  # noqa: E731
    grads = torch.autograd.grad(loss(out, pc, stats), ours)
    grads_ref = torch.autograd.grad(loss(out_ref, pc_ref, stats_ref), ref)
    for name, a, e in zip(("x", "router", "A", "B"), grads, grads_ref):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=name)


def test_lowrank_experts_adds_loads_and_runs_without_gradients():
    x, W, b, Wr, A, B = _layer_case()
    loads = torch.zeros(Wr.shape[0], dtype=torch.float64)
    w = torch.ones(x.shape[0])
    with torch.no_grad():
        out, pc, _ = lowrank_experts(x, W, b, Wr, A, B, w=w, loads=loads, top_k=2, renorm=True, scale=2.0)
        lowrank_experts(x, W, b, Wr, A, B, w=w, loads=loads, top_k=2, renorm=True, scale=2.0)
    E = Wr.shape[0]
    assert torch.equal(loads, 2 * pc[:, E:].sum(0).double()) and float(loads.sum()) == 2 * 2 * x.shape[0]


def test_lowrank_experts_compiles_without_graph_breaks():
    import torch._dynamo

    x, W, b, Wr, A, B = _layer_case()
    Wr.requires_grad_()
    w = torch.ones(x.shape[0])

    def f(x, Wr):
        out, pc, stats = lowrank_experts(x, W, b, Wr, A, B, w=w, top_k=2, renorm=True, scale=2.0, want_stats=True)
        return out.square().mean() + stats.sum()

    torch._dynamo.reset()
    explained = torch._dynamo.explain(f)(x, Wr)
    assert explained.graph_break_count == 0, explained.break_reasons
    eager = torch.autograd.grad(f(x, Wr), Wr)[0]
    torch._dynamo.reset()
    compiled = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(x, Wr), Wr)[0]
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)  # the same kernels, traced


def test_dispatch_rule_knows_the_device_and_dtype():
    assert use_lowrank(4, 8, 384) and not use_lowrank(16, 16, 384)  # CPU: E r 4 <= d
    assert use_lowrank(16, 16, 384, "cuda", torch.bfloat16)  # GPU bf16: E r <= 256 whatever d
    assert not use_lowrank(16, 16, 384, "cuda", torch.float32) and not use_lowrank(64, 16, 4096, "cuda", torch.bfloat16)


def test_block_statistics_are_per_block_of_tokens():
    v = torch.arange(2 * BLOCK_T + 3, dtype=torch.float32)[:, None]
    sums = block_sums(v)
    assert sums.shape == (3, 1) and float(sums[2, 0]) == sum(range(2 * BLOCK_T, 2 * BLOCK_T + 3))


def test_gate_op_is_one_custom_op_the_counter_sees_once():
    from routing_env.common.opcount import OpCounter

    x, _, _, Wr, A, _ = _layer_case()
    with OpCounter() as ops:
        expert_gate(x @ Wr.t(), x @ A.t(), None, None, None, 2, True, 1.0, False)
    assert ops.launch_ops["expert_gate"] == 1 and ops.launches == 3  # two GEMMs and the gate


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_each_low_rank_op_is_one_triton_launch_and_nothing_else(monkeypatch, p):
    """The launchers allocate their outputs and launch their kernel: no other op (a zero-filled seed
    placeholder, a copy) that would be a GPU launch the CPU's count of the custom op cannot see."""
    import routing_env.moe.kernels.expert_gate_triton as gate_module
    import routing_env.moe.kernels.route_shrink_triton as shrink_module
    from routing_env.common.opcount import OpCounter

    launched: list[str] = []

    class Stub:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getitem__(self, grid):  # kernel[grid](...): record the launch, run nothing
            return lambda *args, **kwargs: launched.append(self.name)

    for module, name in ((shrink_module, "_route_shrink"), (shrink_module, "_adapter_dx"), (gate_module, "_gate_fwd"),
                         (gate_module, "_gate_bwd")):
        monkeypatch.setattr(module, name, Stub(name))
    x, _, _, Wr, A, _ = _layer_case()
    T, E, seed = x.shape[0], Wr.shape[0], torch.tensor([3])
    bias, w, dstats, dx = torch.zeros(1, E), torch.ones(T), torch.ones(2, 2 * E), torch.zeros_like(x)
    dh, dlogits = torch.ones(T, A.shape[0]), torch.ones(T, E)
    with OpCounter() as ops:
        z, _ = route_shrink_triton(x, Wr, A, seed, 1, p, True)
        _, pc, _ = gate_forward_triton(z[:, :E], z[:, E:], bias, w, None, 2, True, 1.0, True)
        gate_backward_triton(dh, z[:, E:], pc, None, w, dstats, True, 1.0, torch.float32)
        adapter_dx_triton(dx, dh, A, dlogits, Wr, seed, 1, p)
    assert launched == ["_route_shrink", "_gate_fwd", "_gate_bwd", "_adapter_dx"]
    assert ops.launches == 0, ops.launch_ops


@pytest.fixture(scope="module")
def sm90() -> dict:
    """Every low-rank kernel compiled for sm_90 in a fresh process (here Triton runs interpreted)."""
    script = (
        "import json\n"
        "from routing_env.moe.kernels import expert_gate_triton as g, route_shrink_triton as s\n"
        "out = {}\n"
        "for d in ('bf16', 'fp32'):\n"
        "    for E, r in ((4, 8), (16, 16), (64, 4)):\n"
        "        for k in g.KERNELS: out[f'{k} {d} E{E} r{r}'] = g.compile_report(k, d, E, r)\n"
        "    for k in s.KERNELS: out[f'{k} {d}'] = s.compile_report(k, d)\n"
        "print(json.dumps(out))\n")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_lowrank_kernels_compile_for_sm90_without_spills(sm90, capsys):
    """Ahead-of-time compile for the H100/H200 (sm_90), no GPU needed; report registers and memory."""
    assert len(sm90) == 2 * (3 * 2 + 2)
    with capsys.disabled():
        for name, r in sm90.items():
            print(f"\nsm_90 {name}: {r['registers']} registers, shared {r['static_shared']} B static + "
                  f"{r['dynamic_shared']} B dynamic, spills {r['spill_bytes']} B", end="")
    for name, r in sm90.items():
        assert r["spill_bytes"] == 0, name
        assert r["static_shared"] + r["dynamic_shared"] <= 228 * 1024, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_lowrank_kernels_on_the_gpu_match_their_references(dtype):
    """Each compiled kernel against its CPU reference on the same (rounded) inputs, up to T = 4096, d = 1024,
    E = 16, r = 16. The gate's reference is given the GPU's own choices: bf16 logits tie often, and
    which of two tied experts wins is a convention, not a kernel's correctness (measured on an H200:
    fp32 choices all equal; bf16 ones differ on tied tokens only)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("run this file with TRITON_INTERPRET=0 on the GPU")
    for T, d, E, r in [(41, 23, 4, 3), (300, 200, 16, 16), (4096, 1024, 16, 16), (4096, 1024, 4, 8)]:
        g = torch.Generator().manual_seed(0)
        x, wr = torch.randn(T, d, generator=g).to(dtype), torch.randn(E, d, generator=g).to(dtype)
        a = (torch.randn(E * r, d, generator=g) / d**0.5).to(dtype)
        z, _ = route_shrink_triton(x.cuda(), wr.cuda(), a.cuda(), None, 0, 0.0, False)
        z_ref, _ = route_shrink_reference(x.float(), wr.float(), a.float(), None, 0.0)
        assert _rel(z.cpu(), z_ref) < RTOL[dtype]
        w = torch.ones(T)
        hg, pc, stats = gate_forward_triton(z[:, :E], z[:, E:], None, w.cuda(), None, 2, True, 2.0, True)
        zc, pcc = z.cpu().float(), pc.cpu()
        forced = torch.where(pcc[:, E:].bool(), 0.0, float("-inf"))  # [T, E]: the GPU's experts
        hg_ref, p_ref, c_ref = expert_gate_reference(zc[:, :E], zc[:, E:], forced, 2, True, 2.0)
        assert torch.equal(pcc[:, E:], c_ref) and _rel(pcc[:, :E], p_ref) < 1e-6
        assert _rel(hg.cpu(), hg_ref) < RTOL[dtype] and _rel(stats.cpu(), block_sums(w[:, None] * pcc)) < 1e-5
        if dtype == torch.float32:  # no ties to speak of: the GPU's choices are the reference's own
            assert torch.equal(pcc[:, E:], expert_gate_reference(zc[:, :E], zc[:, E:], None, 2, True, 2.0)[2])
        dhg = torch.randn(T, E * r, generator=g).to(dtype)
        dl, dh = gate_backward_triton(dhg.cuda(), z[:, E:], pc, None, None, None, True, 2.0, dtype)
        dl_ref, dh_ref = expert_gate_backward(dhg, z[:, E:].cpu(), pcc, None, None, None, True, 2.0, dtype)
        assert _rel(dl.cpu(), dl_ref) < RTOL[dtype] and _rel(dh.cpu(), dh_ref) < RTOL[dtype]
        dx, dlg = torch.randn(T, d, generator=g).to(dtype), torch.randn(T, E, generator=g).to(dtype)
        dhh = torch.randn(T, E * r, generator=g).to(dtype)
        ref = dx.float() + adapter_dx_reference(dhh, a, dlg, wr, None, 0.0)
        dx_gpu = dx.cuda()
        adapter_dx_triton(dx_gpu, dhh.cuda(), a.cuda(), dlg.cuda(), wr.cuda(), None, 0, 0.0)
        assert _rel(dx_gpu.cpu(), ref) < RTOL[dtype]
