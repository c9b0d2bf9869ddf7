"""The grouped expert op: reference and low-rank forms against the per-token definition, values and gradients."""

from __future__ import annotations

import pytest
import torch

from routing_env.moe.kernels import lora_moe, lora_moe_lowrank, lora_moe_naive, lora_moe_reference


# float64 throughout, so torch's float64 defaults (rtol 1e-7, atol 1e-7) hold whatever the summation order.
def _problem(T: int, d_in: int, d_out: int, E: int, k: int, r: int, seed: int = 0, empty_expert: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g, dtype=torch.float64)
    A = torch.randn(E, r, d_in, generator=g, dtype=torch.float64)
    B = torch.randn(E, d_out, r, generator=g, dtype=torch.float64)
    logits = torch.randn(T, E, generator=g, dtype=torch.float64)
    if empty_expert:
        logits[:, 0] = -1e9  # expert 0 gets no token at all
    idx = logits.topk(k, dim=-1).indices
    gates = logits.softmax(-1).gather(1, idx)
    return x, A, B, idx, gates


SHAPES = [  # T, d_in, d_out, E, k, r
    (1, 7, 5, 3, 1, 2),
    (13, 33, 17, 4, 2, 3),
    (29, 10, 12, 8, 3, 4),
    (40, 9, 6, 64, 4, 2),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", [lora_moe_reference, lora_moe_lowrank, lora_moe])
def test_matches_per_token_definition(shape, impl):
    x, A, B, idx, gates = _problem(*shape)
    torch.testing.assert_close(impl(x, A, B, idx, gates, 1.7), lora_moe_naive(x, A, B, idx, gates, 1.7))


@pytest.mark.parametrize("impl", [lora_moe_reference, lora_moe_lowrank])
def test_expert_with_no_tokens(impl):
    x, A, B, idx, gates = _problem(11, 8, 6, 5, 2, 3, empty_expert=True)
    assert not (idx == 0).any()
    torch.testing.assert_close(impl(x, A, B, idx, gates, 0.5), lora_moe_naive(x, A, B, idx, gates, 0.5))


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_gradients_of_all_inputs_agree(shape):
    """x, A, B and the gates get the same gradients through every implementation."""
    base = _problem(*shape, seed=3)
    w = torch.randn(shape[0], shape[2], dtype=torch.float64)
    grads = []
    for impl in (lora_moe_naive, lora_moe_reference, lora_moe_lowrank):
        x, A, B, idx, gates = (t.clone().requires_grad_(t.is_floating_point()) for t in base)
        (impl(x, A, B, idx, gates, 2.0) * w).sum().backward()
        grads.append([x.grad, A.grad, B.grad, gates.grad])
    for other in grads[1:]:
        for g_ref, g in zip(grads[0], other):
            torch.testing.assert_close(g, g_ref)


def test_gradcheck_reference():
    x, A, B, idx, gates = _problem(6, 5, 4, 3, 2, 2, seed=5)
    args = [x.requires_grad_(), A.requires_grad_(), B.requires_grad_(), gates.requires_grad_()]
    assert torch.autograd.gradcheck(lambda x, A, B, g: lora_moe_reference(x, A, B, idx, g, 1.3), args)


def test_dispatcher_uses_the_sorted_form_for_wide_experts():
    """Many experts: the low-rank form would compute all E down-projections, so the sorted one is used."""
    x, A, B, idx, gates = _problem(5, 8, 4, 16, 2, 2)
    # Exact: the dispatcher calls the very same function on the same tensors.
    torch.testing.assert_close(lora_moe(x, A, B, idx, gates, 1.0), lora_moe_reference(x, A, B, idx, gates, 1.0),
                               rtol=0, atol=0)
