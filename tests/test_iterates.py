"""Outputs of iterates far from the optimum, zero-weight points and half-precision gradients:
finite where the mathematics is, and a warning where a dtype cannot hold the result.

An iterate cut short (``max_iter`` 1-2, eps-scaling interrupted, an unbalanced problem at tiny
eps) has potentials whose plan rows for zero-weight points may be astronomically large; the
plan itself is 0 there. References are float64 computations written here from the definitions.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import F64, clouds, simplex, sqdist
from otcore.kernels.softmin import blocked

import otcore


def _zero_first(w: torch.Tensor, k: int) -> torch.Tensor:
    w = w.clone()
    w[:k] = 0
    return w / w.sum()


def test_plan_products_of_zero_weight_rows_are_exact_zeros_however_large_their_exponents(gen):
    x, y = clouds(6, 5, 2, gen)
    C = sqdist(x, y)
    a, b = _zero_first(simplex(6, gen), 2), _zero_first(simplex(5, gen), 1)
    eps = 0.5
    f = torch.randn(6, generator=gen, dtype=F64)
    f[:2] = 1e3  # rows of zero weight whose exp((f + g - C)/eps) overflows float64
    g = torch.randn(5, generator=gen, dtype=F64)
    v = torch.randn(5, 3, generator=gen, dtype=F64)
    logits = (f[:, None] + g[None] - C) / eps
    positive = (a[:, None] > 0) & (b[None] > 0)
    log_p = torch.where(positive, logits + torch.log(a[:, None] * b[None]), float("-inf"))
    P = torch.exp(log_p)  # the plan by its definition, 0 wherever a weight is
    for geom in (otcore.CostMatrix(C), otcore.PointCloud(x, y)):
        out = geom.kernel_apply(f[None], g[None], eps, b[None], v[None], row_weights=a[None])[0]
        torch.testing.assert_close(out, P @ v, rtol=1e-9, atol=1e-300)
        assert bool((out[:2] == 0).all())
        cost = geom.kernel_cost(f[None], g[None], eps, b[None], row_weights=a[None])[0]
        torch.testing.assert_close(cost, (P * C).sum(-1), rtol=1e-9, atol=1e-300)


def test_gradients_in_zero_row_weights_stay_finite(gen):
    x, y = clouds(6, 5, 2, gen)
    a = _zero_first(simplex(6, gen), 2).requires_grad_()
    b = simplex(5, gen)
    f = torch.randn(1, 6, generator=gen, dtype=F64)
    f[0, :2] = 1e3
    g, v = torch.randn(1, 5, generator=gen, dtype=F64), torch.randn(1, 5, 2, generator=gen, dtype=F64)
    geom = otcore.PointCloud(x, y)
    out = geom.kernel_apply(f, g, 0.5, b[None], v, row_weights=a[None]).sum()
    out = out + geom.kernel_cost(f, g, 0.5, b[None], row_weights=a[None]).sum()
    (grad,) = torch.autograd.grad(out, a)
    assert bool(torch.isfinite(grad).all())


def test_weighted_exp_joins_positive_weights_into_the_exponent_and_is_zero_at_zero_ones():
    t = torch.tensor([800.0, 1.0, 900.0], dtype=F64, requires_grad=True)
    w = torch.tensor([1e-300, 0.5, 0.0], dtype=F64, requires_grad=True)
    out = blocked.weighted_exp(t, w)
    # exp(800) alone overflows float64; its product with 1e-300 is exp(800 - 690.8)
    expected = torch.exp(torch.tensor([800.0 + torch.log(torch.tensor(1e-300, dtype=F64)), 1.0], dtype=F64))
    torch.testing.assert_close(out[:2].detach(), expected * torch.tensor([1.0, 0.5], dtype=F64), rtol=1e-12, atol=0)
    assert float(out[2]) == 0.0
    gt, gw = torch.autograd.grad(out.sum(), (t, w))
    assert bool(torch.isfinite(gt).all()) and bool(torch.isfinite(gw[1:]).all())  # d/dw_0 = exp(800): inf


def test_eps_scaling_cut_short_returns_potentials_of_the_target_eps(gen):
    """With max_iter=1 the schedule would take every iteration: its last one is at the target eps."""
    C = torch.rand(8, 4, generator=gen, dtype=F64) + 1e3
    res = otcore.sinkhorn(C, eps=3e-4, max_iter=1, eps_scaling=0.5, warn=False)
    P = res.plan
    assert bool(torch.isfinite(P).all())
    # the last update is the column one, at the target eps: the columns sum to b
    torch.testing.assert_close(P.sum(0), torch.full((4,), 0.25, dtype=F64), rtol=1e-9, atol=0)


@pytest.mark.parametrize("sched", [None, 0.5])
def test_unbalanced_value_of_an_iterate_cut_short_is_a_finite_lower_bound(sched, gen):
    C = 6e3 * torch.rand(10, 2, generator=gen, dtype=F64)
    a, b = simplex(10, gen), 1.2 * simplex(2, gen)
    kw = {"eps": 7e-4, "tau_a": 0.26}
    short = otcore.sinkhorn(C.float(), a.float(), b.float(), max_iter=2, eps_scaling=sched, warn=False, **kw)
    best = otcore.sinkhorn(C, a, b, max_iter=20000, tol=1e-9, **kw)
    assert bool(best.converged)
    assert bool(torch.isfinite(short.value))
    assert float(short.value.detach()) <= float(best.value) * (1 + 1e-6) + 1e-6


def test_the_best_translation_improves_an_unbalanced_dual_value_and_vanishes_at_the_optimum(gen):
    from otcore.solvers.entropic.dual import dual_value, rho_of, translation

    x, y = clouds(12, 9, 2, gen)
    geom = otcore.PointCloud(x, y).broadcast_to(1)
    a, b = simplex(12, gen)[None], 2.0 * simplex(9, gen)[None]
    eps, rho = 0.5, rho_of(0.7, 0.5)
    res = otcore.sinkhorn(geom, a, b, eps=eps, tau_a=0.7, tau_b=0.7, tol=1e-12, max_iter=10000)
    f, g = res.f, res.g
    assert abs(float(translation(geom, a, b, f, g, rho, rho))) < 1e-9
    g_off = g + 3.0  # a dual point off the optimum: its value is a lower bound, raised by the translation
    value = float(dual_value(geom, a, b, g_off, eps=eps, rho_a=rho, rho_b=rho))
    s = geom.softmin(g_off, eps, b, axis=1)
    f_off = 0.7 * s
    untranslated = (a * rho * -torch.expm1(-f_off / rho)).sum() + (b * rho * -torch.expm1(-g_off / rho)).sum() \
        - eps * ((a * torch.expm1((f_off - s) / eps)).sum() + a.sum() * (1 - b.sum()))
    assert float(untranslated) < value <= float(res.value) + 1e-9


def test_half_clouds_are_centred_onto_exactly_the_costs_of_the_points_as_given(gen):
    x, y = clouds(30, 20, 2, gen, shift=0.5)
    xh, yh = (x + 1000).half(), (y + 1000).half()
    geom = otcore.PointCloud(xh, yh, backend="torch").to_dtype(torch.float32)
    C32 = geom.materialize()[0].double()
    torch.testing.assert_close(C32, sqdist(xh.double(), yh.double()), rtol=1e-6, atol=1e-6)


def test_a_half_gradient_beyond_the_dtype_range_warns():
    gen = torch.Generator().manual_seed(0)
    x = (1e4 * torch.rand(3, 1, generator=gen) + 1e3).half().requires_grad_()
    y = (1e4 * torch.rand(4, 1, generator=gen) + 1e3).half()
    res = otcore.sinkhorn(otcore.PointCloud(x, y), eps=8e-3, max_iter=3, grad="envelope", warn=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (grad,) = torch.autograd.grad(res.transport_cost, x)
    overflowed = not bool(torch.isfinite(grad).all())
    warned = any(issubclass(w.category, otcore.PrecisionWarning) for w in caught)
    assert overflowed and warned


def test_sns_returns_c_transforms_at_zero_weight_points(gen):
    x, y = clouds(10, 8, 2, gen)
    C = sqdist(x, y)
    a, b = _zero_first(simplex(10, gen), 3), _zero_first(simplex(8, gen), 2)
    eps = 0.05
    res = otcore.sns(C, a, b, eps=eps, tol=1e-10)
    f, g = res.f, res.g
    f_ct = -eps * torch.logsumexp(torch.log(b)[None] + (g[None] - C) / eps, dim=-1)
    g_ct = -eps * torch.logsumexp(torch.log(a)[:, None] + (f_ct[:, None] - C) / eps, dim=0)
    torch.testing.assert_close(f[:3], f_ct[:3], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g[:2], g_ct[:2], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("offset", [0.0, 1.0, 1000.0, -1000.0])
def test_centred_float32_clouds_have_exactly_the_costs_of_the_points_as_given(offset, gen):
    """The float64 re-check of a float32 solve reads these costs: they must be the inputs' own."""
    x, y = clouds(30, 20, 3, gen, shift=0.5)
    x32, y32 = (x + offset).float(), (y + offset).float()
    geom = otcore.PointCloud(x32, y32, backend="torch").to_dtype(F64)
    torch.testing.assert_close(geom.materialize()[0], sqdist(x32.double(), y32.double()), rtol=1e-12, atol=1e-9)
