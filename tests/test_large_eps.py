"""eps far above the costs' range: the potentials' variation is a tiny fraction of each
exp(s - top), which a max-shifted log-sum-exp rounds away (error eps * u). The centred
log-sum-exp keeps it; references are POT in float64 and the eps -> inf limit <a x b, C>.
"""

from __future__ import annotations

import ot
import pytest
import torch
from conftest import F64, clouds, simplex, sqdist
from otcore.kernels.softmin import blocked

import otcore


@pytest.mark.parametrize("eps", [1e2, 1e4, 1e6])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_value_and_transport_cost_match_pot_in_float64(eps, dtype, gen):
    x, y = clouds(40, 30, 2, gen)
    a, b = simplex(40, gen), simplex(30, gen)
    C = sqdist(x, y)
    independent = float(a @ C @ b)
    plan = ot.sinkhorn(a.numpy(), b.numpy(), C.numpy(), eps, method="sinkhorn_log", stopThr=1e-14)
    cost_ref = float((plan * C.numpy()).sum())
    tol, rtol = (1e-6, 2e-6) if dtype == torch.float32 else (1e-13, 1e-11)
    res = otcore.sinkhorn(otcore.PointCloud(x.to(dtype), y.to(dtype)), a.to(dtype), b.to(dtype), eps=eps, tol=tol)
    assert bool(res.converged)
    assert float(res.transport_cost) == pytest.approx(cost_ref, rel=rtol)
    # cost_ref <= value <= <a x b, C>: the independent coupling is feasible with zero entropy term
    assert cost_ref * (1 - rtol) <= float(res.value) <= independent * (1 + rtol)


@pytest.mark.parametrize(("dtype", "eps"), [(torch.float32, 1e10), (F64, 1e17)])
def test_value_reaches_the_independent_coupling_limit(dtype, eps, gen):
    x, y = clouds(40, 30, 2, gen)
    C = sqdist(x, y)
    res = otcore.sinkhorn(otcore.CostMatrix(C.to(dtype)), eps=eps)
    assert float(res.value) == pytest.approx(float(C.mean()), rel=10 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("grad", ["implicit", "unroll", "envelope"])
def test_gradient_at_large_eps_is_the_independent_couplings(grad, gen):
    x, y = clouds(40, 30, 2, gen)
    x32 = x.float().requires_grad_()
    otcore.sinkhorn(otcore.PointCloud(x32, y.float()), eps=1e6, grad=grad).value.backward()
    # d/dx_i sum_j a_i b_j |x_i - y_j|^2 with uniform weights; the eps-dependent part is O(1/eps)
    limit = 2 * (x - y.mean(0)) / 40
    torch.testing.assert_close(x32.grad.double(), limit, rtol=0, atol=1e-6)


def test_centred_lse_keeps_the_differences_between_rows_of_nearly_equal_scores(gen):
    """Scores within 1e-6 of each other in float32: what the solver sees at eps = 10^6 x the
    costs. The rows' log-sum-exps share log(sum w), whose rounding is one constant shift (it
    cancels in a balanced problem); what must survive is how the rows differ."""
    w = simplex(50, gen).float()
    s = (1e-6 * torch.randn(20, 50, generator=gen, dtype=F64)).float()
    exact = torch.logsumexp(s.double() + w.double().log(), dim=-1)  # the float32 inputs' own lse

    def row_differences(lse):
        return lse.double() - lse.double().mean()

    centred = (row_differences(blocked.centred_lse(s, w)) - row_differences(exact)).abs().max()
    plain = (row_differences(blocked.weighted_lse(s, w)) - row_differences(exact)).abs().max()
    spread = float(row_differences(exact).abs().max())
    assert float(centred) <= 1e-3 * spread
    assert float(plain) > 0.05 * spread  # the plain max-shifted form loses it (why both exist)


def test_centred_lse_rows_far_below_their_top_fall_back_exactly(gen):
    """A tiny weight at the top and the mass 30 below: the expm1 form would cancel, the fallback
    (the max-shifted form) is exact; gradients stay finite in both branches."""
    s = torch.tensor([[0.0, -30.0, -30.0], [0.0, -1e-3, 2e-3]], dtype=F64, requires_grad=True)
    w = torch.tensor([1e-20, 0.5, 0.5], dtype=F64)
    lse = blocked.centred_lse(s, w)
    torch.testing.assert_close(lse, torch.logsumexp(s.detach() + w.log(), dim=-1), rtol=1e-12, atol=0)
    (grad,) = torch.autograd.grad(lse.sum(), s)
    softmax = torch.softmax(s.detach() + w.log(), dim=-1)
    torch.testing.assert_close(grad, softmax, rtol=1e-12, atol=0)
