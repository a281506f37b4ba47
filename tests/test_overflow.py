"""Plan products combine exponents before exponentiating: potentials far beyond exp's range
(|f|/eps >> 88 in float32, >> 709 in float64) still give finite plan products, marginal errors,
implicit gradients and Hessian-free Newton steps."""

import importlib

import numpy as np
import ot
import pytest
import torch
from conftest import F64, sqdist
from otcore.kernels.softmin import naive

import otcore


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_offset_costs_give_finite_marginal_error_and_apply(dtype):
    gen = torch.Generator().manual_seed(0)
    C = (torch.rand(30, 20, generator=gen, dtype=F64) + 10 * (1 if dtype == torch.float32 else 100)).to(dtype)
    res = otcore.sinkhorn(C, eps=0.1)
    assert bool(res.converged)
    assert float(res.f.abs().max()) / 0.1 > (100 if dtype == torch.float32 else 800)  # beyond exp's range
    # POT's log-domain plan of the same problem (float64) is the reference
    P = torch.from_numpy(ot.sinkhorn(np.full(30, 1 / 30), np.full(20, 1 / 20), C.double().numpy(), 0.1,
                                     method="sinkhorn_log", stopThr=1e-12, numItermax=100_000))
    rows_cols = (P.sum(1) - 1 / 30).abs().sum() + (P.sum(0) - 1 / 20).abs().sum()
    error = res.marginal_error
    assert bool(torch.isfinite(error)) and float(error) <= 1e-4 and float(rows_cols) <= 1e-12
    v = torch.randn(20, 3, generator=gen, dtype=F64)
    close = {"rtol": 1e-3, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-5, "atol": 1e-7}
    torch.testing.assert_close(res.apply(v.to(dtype)).double(), P @ v, **close)
    torch.testing.assert_close(res.apply(torch.ones(30, dtype=dtype), transpose=True).double(), P.sum(0), **close)


def test_kernel_apply_with_large_opposite_potentials_matches_the_oracle():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(1, 40, 2, generator=gen, dtype=F64), torch.randn(1, 30, 2, generator=gen, dtype=F64)
    f = torch.full((1, 40), 900.0, dtype=F64) + torch.randn(1, 40, generator=gen, dtype=F64)
    g = torch.full((1, 30), -900.0, dtype=F64) + torch.randn(1, 30, generator=gen, dtype=F64)
    w, v = torch.full((1, 30), 1 / 30, dtype=F64), torch.randn(1, 30, 2, generator=gen, dtype=F64)
    for eps in (1.0, 0.5):
        got = otcore.PointCloud(x, y).kernel_apply(f, g, eps, w, v)
        torch.testing.assert_close(got, naive.kernel_apply(sqdist(x, y), f, g, w, v, eps), rtol=1e-10, atol=0)


def test_implicit_gradient_of_offset_clouds_is_finite():
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(30, 2, generator=gen).requires_grad_()
    y = torch.rand(20, 2, generator=gen) + 3
    res = otcore.sinkhorn(otcore.PointCloud(x, y), eps=0.1)
    res.transport_cost.backward()
    assert bool(torch.isfinite(x.grad).all())
    x64 = x.detach().double().requires_grad_()
    ref = otcore.sinkhorn(otcore.PointCloud(x64, y.double()), eps=0.1, tol=1e-10)
    ref.transport_cost.backward()
    assert float((x.grad.double() - x64.grad).norm() / x64.grad.norm()) < 1e-2


def test_hessian_free_sns_with_offset_costs():
    gen = torch.Generator().manual_seed(3)
    C = torch.rand(40, 40, generator=gen, dtype=F64) + 1
    res = otcore.sns(C, eps=1 / 1200, hessian="dense", tol=1e-8)
    assert bool(res.converged) and bool(torch.isfinite(res.marginal_error)) and float(res.marginal_error) <= 1e-8
    # the materialised plan (exp of the combined exponent, no plan product) agrees on the marginals
    dense = (res.plan.sum(1) - 1 / 40).abs().sum() + (res.plan.sum(0) - 1 / 40).abs().sum()
    assert float(dense) <= 1e-8
    torch.testing.assert_close(res.marginal_error, dense, rtol=0, atol=1e-12)  # sums of ~1: rounding


def test_half_precision_clouds_far_from_the_origin_on_the_torch_path():
    """|x|^2 + |y|^2 - 2 x.y cancels at |x| ~ 1e3 unless the clouds are centred (in float32)."""
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(50, 2, generator=gen) + 1000).half()
    y = (torch.randn(40, 2, generator=gen) + 1000.5).half()
    res = otcore.sinkhorn(otcore.PointCloud(x, y, backend="torch"), eps=0.1)
    exact = otcore.sinkhorn(sqdist(x.double(), y.double()), eps=0.1, tol=1e-10)
    assert res.value.dtype == torch.float16
    torch.testing.assert_close(res.value.double(), exact.value, rtol=2e-3, atol=0)


def float64_marginal_error(C: torch.Tensor, f: torch.Tensor, g: torch.Tensor, eps: float) -> float:
    """|P1 - a|_1 + |P^T 1 - b|_1 of the uniform-weight plan of (f, g), evaluated in float64."""
    n, m = C.shape
    P = torch.exp((f.double()[:, None] + g.double()[None] - C.double()) / eps) / (n * m)
    return float((P.sum(1) - 1 / n).abs().sum() + (P.sum(0) - 1 / m).abs().sum())


@pytest.mark.parametrize("offset,eps", [(0.0, 1e-3), (10.0, 0.1), (10.0, 0.01)])
def test_float32_converged_flag_holds_in_float64(offset, eps):
    """Where float32 potentials are large against eps, ``converged`` is what float64 confirms."""
    C = torch.rand(30, 20, generator=torch.Generator().manual_seed(0)) + offset
    res = otcore.sinkhorn(C, eps=eps, max_iter=5000)
    assert bool(res.converged)
    assert float64_marginal_error(C, res.f, res.g, eps) <= 1e-4


@pytest.mark.parametrize("eps,judgements", [(0.01, [True, False]), (0.002, [False])])
def test_float32_stop_is_judged_in_float64_only_where_it_can_pass(monkeypatch, eps, judgements):
    """A float32 stop whose rounding bound u (|f| + |g|) / eps exceeds tol / 10 is accepted only
    if its float64 error leaves room for twice that bound (``margin``); otherwise the solve goes
    on to tol / 4 and float64 judges again (``margin`` False). Where the room alone exceeds tol,
    the first judgement, which could not pass, is skipped: the result is the one it would give."""
    solver = importlib.import_module("otcore.solvers.entropic.sinkhorn")
    C = torch.rand(30, 20, generator=torch.Generator().manual_seed(0)) + 1.0
    with monkeypatch.context() as never_skipped:
        never_skipped.setattr(solver, "beyond_margin", lambda *args, **kwargs: False)
        judged_always = otcore.sinkhorn(C, eps=eps, max_iter=5000)
    real, margins = solver.certified, []

    def spy(*args, **kwargs):
        margins.append(kwargs.get("margin", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(solver, "certified", spy)
    res = otcore.sinkhorn(C, eps=eps, max_iter=5000)
    for got, want in ((res.f, judged_always.f), (res.g, judged_always.g), (res.n_iter, judged_always.n_iter),
                      (res.converged, judged_always.converged),
                      (res.info["error_float64"], judged_always.info["error_float64"])):
        assert torch.equal(got, want)
    rounding = torch.finfo(torch.float32).eps * float(res.f.abs().max() + res.g.abs().max()) / eps
    assert 1e-5 < rounding and (2 * rounding >= 1e-4) == (judgements == [False])  # the premise
    assert margins == judgements
    assert bool(res.converged) and float64_marginal_error(C, res.f, res.g, eps) <= 1e-4


def test_float32_cannot_vouch_for_tol_at_a_large_offset():
    """|f|/eps ~ 1e4: float32 rounding alone (~6e-4) exceeds tol; the solve says so."""
    C = torch.rand(30, 20, generator=torch.Generator().manual_seed(0)) + 1000
    with pytest.warns(otcore.ConvergenceWarning, match="float64"):
        res = otcore.sinkhorn(C, eps=0.1)
    assert not bool(res.converged)
    assert float64_marginal_error(C, res.f, res.g, 0.1) > 1e-4
    assert float(res.info["error_float64"]) > 1e-4


def test_half_outputs_beyond_range_are_not_converged():
    """Clouds at scale 1e3 have costs ~1e6 > float16's 65504: the cast outputs are not passed off."""
    gen = torch.Generator().manual_seed(3)
    x, y = (torch.rand(30, 2, generator=gen) * 1e3).half(), (torch.rand(20, 2, generator=gen) * 1e3).half()
    with pytest.warns(otcore.ConvergenceWarning, match="range of torch.float16"):
        res = otcore.sinkhorn(otcore.PointCloud(x, y), eps=1e5)
    assert not bool(res.converged) and not bool(torch.isfinite(res.f).all())
    with pytest.warns(otcore.ConvergenceWarning, match="range of torch.float16"):
        exact = otcore.emd(otcore.PointCloud(x, y))
    assert not bool(exact.converged)
    fine = otcore.sinkhorn(otcore.PointCloud(x / 100, y / 100), eps=10.0)  # in range: converged as usual
    assert bool(fine.converged) and bool(torch.isfinite(fine.f).all())


def test_plan_with_zero_weights_at_tiny_eps_is_finite():
    """Zero-weight rows and columns at eps = 1e-4 x the cost scale: P = 0 there, not 0 * inf."""
    bad = 0
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        C = torch.rand(8, 7, generator=gen)
        a, b = torch.rand(8, generator=gen), torch.rand(7, generator=gen)
        a[:2], b[:1] = 0, 0
        res = otcore.sinkhorn(C, a / a.sum(), b / b.sum(), eps=1e-4, max_iter=200, warn=False)
        P = res.plan
        bad += not bool(torch.isfinite(P).all())
        assert bool((P[:2] == 0).all()) and bool((P[:, :1] == 0).all())
    assert bad == 0
