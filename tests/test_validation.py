"""Every bad input raises a ValueError naming the argument."""

import pytest
import torch
from conftest import F64

import otcore

C = torch.rand(4, 3, dtype=F64)
U4, U3 = torch.full((4,), 0.25, dtype=F64), torch.full((3,), 1 / 3, dtype=F64)


@pytest.mark.parametrize("solver", [
    lambda c, a, b, **kw: otcore.sinkhorn(c, a, b, eps=kw.get("eps", 0.1)),
    lambda c, a, b, **kw: otcore.emd(c, a, b),
])
@pytest.mark.parametrize("a,b,match", [
    (torch.tensor([0.5, 0.5, 0.5, -0.5], dtype=F64), U3, "a"),
    (U4, torch.tensor([0.5, float("nan"), 0.5], dtype=F64), "b"),
    (U4, torch.tensor([0.5, float("inf"), 0.5], dtype=F64), "b"),
    (torch.full((5,), 0.2, dtype=F64), U3, "a"),
    (U4, torch.full((2,), 0.5, dtype=F64), "b"),
    (U4, 2 * U3, "mass"),
    (torch.zeros(4, dtype=F64), U3, "a"),
])
def test_bad_weights(solver, a, b, match):
    with pytest.raises(ValueError, match=match):
        solver(C, a, b)


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        otcore.sinkhorn(C, eps=eps)


def test_bad_options():
    with pytest.raises(ValueError, match="grad"):
        otcore.sinkhorn(C, eps=0.1, grad="magic")
    with pytest.raises(ValueError, match="tau_a"):
        otcore.sinkhorn(C, eps=0.1, tau_a=1.5)
    with pytest.raises(ValueError, match="tol"):
        otcore.sinkhorn(C, eps=0.1, tol=-1)
    with pytest.raises(ValueError, match="max_iter"):
        otcore.sinkhorn(C, eps=0.1, max_iter=0)
    with pytest.raises(ValueError, match="eps_scaling"):
        otcore.sinkhorn(C, eps=0.1, eps_scaling=1.5)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="check_every"):
            otcore.sinkhorn(C, eps=0.1, check_every=bad)
        with pytest.raises(ValueError, match="check_every"):
            otcore.sinkhorn_divergence(torch.rand(4, 2), torch.rand(3, 2), eps=0.1, check_every=bad)
    with pytest.raises(ValueError, match="max_iter"):
        otcore.sinkhorn(C, eps=0.1, max_iter=1.5)


def test_bad_costs_and_points():
    with pytest.raises(ValueError, match="C"):
        otcore.sinkhorn(torch.tensor([[0.0, float("nan")], [1.0, 0.0]]), eps=0.1)
    with pytest.raises(ValueError, match="dimension"):
        otcore.sinkhorn_divergence(torch.zeros(3, 2), torch.zeros(3, 3), eps=0.1)
    with pytest.raises(ValueError, match="y"):
        otcore.sinkhorn_divergence(torch.zeros(3, 2), torch.tensor([[float("nan"), 0.0]]), eps=0.1)
    with pytest.raises(ValueError, match="batch"):
        otcore.sinkhorn(torch.rand(2, 4, 3), torch.rand(3, 4).softmax(-1), eps=0.1)


def test_unequal_masses_are_fine_when_unbalanced():
    res = otcore.sinkhorn(C, U4, 2 * U3, eps=0.1, tau_a=0.9, tau_b=0.9)
    assert bool(res.converged)


def test_mass_tolerance_scales_with_dtype():
    b32 = U3.float() * (1 + 1e-6)  # within float32 rounding of a sum
    otcore.sinkhorn(C.float(), U4.float(), b32, eps=0.1)
    with pytest.raises(ValueError, match="mass"):
        otcore.sinkhorn(C, U4, U3 * (1 + 1e-6), eps=0.1)
