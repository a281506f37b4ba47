"""Exact OT against POT's ot.emd2 and scipy's assignment solver."""

import numpy as np
import ot
import torch
from conftest import F64, clouds, simplex, sqdist
from scipy.optimize import linear_sum_assignment

import otcore


def test_emd_matches_pot(gen):
    x, y = clouds(30, 25, 3, gen)
    C = sqdist(x, y)
    a, b = simplex(30, gen), simplex(25, gen)
    res = otcore.emd(C, a, b)
    expected = ot.emd2(a.numpy(), b.numpy(), C.numpy())
    assert abs(float(res.value) - expected) <= 1e-12
    torch.testing.assert_close(res.transport_cost, res.value)
    assert float(res.marginal_error) <= 1e-12
    # dual feasibility and complementary slackness of the returned potentials
    assert float((res.f[:, None] + res.g[None] - C).max()) <= 1e-10
    assert abs(float((res.f * a).sum() + (res.g * b).sum()) - expected) <= 1e-10


def test_emd_is_the_assignment_for_uniform_equal_sizes(gen):
    C = torch.rand(3, 12, 12, generator=gen, dtype=F64)
    res = otcore.emd(C)
    for k in range(3):
        rows, cols = linear_sum_assignment(C[k].numpy())
        assert abs(float(res.value[k]) - C[k].numpy()[rows, cols].mean()) <= 1e-12
        assert bool((res.plan[k][rows, cols] > 0).all())


def test_emd_value_gradients(gen):
    x, y = clouds(10, 10, 2, gen)
    xr = x.clone().requires_grad_()
    res = otcore.emd(otcore.PointCloud(xr, y))
    (gx,) = torch.autograd.grad(res.value, xr)
    P = res.plan.detach()
    # d/dx_i sum_ij P_ij |x_i - y_j|^2 = 2 (x_i sum_j P_ij - sum_j P_ij y_j)
    expected = 2 * (x * P.sum(1, keepdim=True) - P @ y)
    torch.testing.assert_close(gx, expected, rtol=1e-10, atol=1e-12)
    C = sqdist(x, y).requires_grad_()
    (gC,) = torch.autograd.grad(otcore.emd(C).value, C)
    torch.testing.assert_close(gC, otcore.emd(C).plan.detach())


def test_emd_float32_in_float32_out(gen):
    C = torch.rand(6, 6, generator=gen).float()
    res = otcore.emd(C)
    assert res.plan.dtype == torch.float32 and res.value.dtype == torch.float32
    assert abs(float(res.value) - ot.emd2(np.full(6, 1 / 6), np.full(6, 1 / 6), C.double().numpy())) < 1e-6


def test_emd_potentials_are_pots_and_feasible_at_zero_weights(gen):
    """The potentials are ot.emd's where every weight is positive; points of zero weight (which
    the simplex leaves out) get the largest feasible potential, the c-transform of the other
    side's, and the value stays ot.emd2's."""
    x, y = clouds(12, 9, 2, gen)
    C = sqdist(x, y)
    a, b = simplex(12, gen), simplex(9, gen)
    res = otcore.emd(C, a, b)
    _, log = ot.emd(a.numpy(), b.numpy(), C.numpy(), log=True)
    torch.testing.assert_close(res.f, torch.from_numpy(log["u"]), rtol=0, atol=1e-12)
    torch.testing.assert_close(res.g, torch.from_numpy(log["v"]), rtol=0, atol=1e-12)

    a, b = simplex(12, gen, zeros=4), simplex(9, gen, zeros=3)
    res = otcore.emd(C, a, b)
    assert abs(float(res.value) - ot.emd2(a.numpy(), b.numpy(), C.numpy())) <= 1e-12
    slack = C - res.f[:, None] - res.g[None]
    assert float(slack.min()) >= -1e-12
    assert float(slack[res.plan > 0].abs().max()) <= 1e-12  # complementary slackness
    assert abs(float((res.f * a).sum() - (res.g * b).sum())) <= 1e-12  # centred as ot.emd's
    for zero, axis in ((a == 0, 1), (b == 0, 0)):
        assert int(zero.sum()) > 0
        tightest = slack.amin(axis)[zero]  # each zero-weight point's potential touches a constraint
        torch.testing.assert_close(tightest, torch.zeros_like(tightest), rtol=0, atol=1e-12)
