"""Gradients of every grad mode against finite differences (float64) and against each other."""

import pytest
import torch
from conftest import F64, clouds, simplex

import otcore

MODES = ["implicit", "unroll", "envelope"]
SOLVE = {"eps": 1.0, "tol": 1e-13, "max_iter": 5000}


def check(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("mode", MODES)
def test_value_gradcheck_in_cost_points_and_weights(gen, mode):
    x, y = clouds(6, 5, 2, gen)
    C = torch.rand(6, 5, generator=gen, dtype=F64).requires_grad_()
    logits = torch.randn(6, generator=gen, dtype=F64, requires_grad=True)
    b = simplex(5, gen)
    check(lambda C, la: otcore.sinkhorn(C, torch.softmax(la, 0), b, grad=mode, **SOLVE).value, C, logits)
    xr = x.clone().requires_grad_()
    check(lambda x: otcore.sinkhorn(otcore.PointCloud(x, y), grad=mode, **SOLVE).value, xr)


@pytest.mark.parametrize("mode", MODES)
def test_value_gradient_in_cost_is_the_plan(gen, mode):
    C = torch.rand(2, 7, 6, generator=gen, dtype=F64).requires_grad_()
    res = otcore.sinkhorn(C, eps=0.1, tol=1e-13, max_iter=50_000, grad=mode)
    (grad,) = torch.autograd.grad(res.value.sum(), C)
    torch.testing.assert_close(grad, res.plan.detach(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["implicit", "unroll"])
def test_plan_and_potential_gradcheck(gen, mode):
    x, y = clouds(5, 6, 2, gen)
    W = torch.randn(5, 6, generator=gen, dtype=F64)
    xr = x.clone().requires_grad_()
    logits = torch.randn(6, generator=gen, dtype=F64, requires_grad=True)
    check(lambda x, lb: (otcore.sinkhorn(otcore.PointCloud(x, y), None, torch.softmax(lb, 0), grad=mode,
                                         **SOLVE).plan * W).sum(), xr, logits)
    v = torch.randn(6, 2, generator=gen, dtype=F64)
    check(lambda x: otcore.sinkhorn(otcore.PointCloud(x, y), grad=mode, **SOLVE).apply(v).pow(2).sum(), xr)
    check(lambda x: otcore.sinkhorn(otcore.PointCloud(x, y), grad=mode, **SOLVE).transport_cost, xr)


def test_unbalanced_implicit_gradcheck(gen):
    C = torch.rand(5, 4, generator=gen, dtype=F64).requires_grad_()
    b = 1.5 * simplex(4, gen)
    W = torch.randn(5, 4, generator=gen, dtype=F64)
    check(lambda C: (otcore.sinkhorn(C, None, b, tau_a=0.8, tau_b=0.6, **SOLVE).plan * W).sum(), C)


def test_implicit_and_unrolled_gradients_of_the_plan_agree(gen):
    x, y = clouds(30, 25, 2, gen)
    W = torch.randn(30, 25, generator=gen, dtype=F64)
    grads = []
    for mode in ("implicit", "unroll"):
        xr = x.clone().requires_grad_()
        res = otcore.sinkhorn(otcore.PointCloud(xr, y), eps=0.5, tol=1e-12, max_iter=20_000, grad=mode)
        (g,) = torch.autograd.grad((res.plan * W).sum(), xr)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-7, atol=1e-9)


def test_gradients_with_zero_weights_are_finite_and_match_unroll(gen):
    C = torch.rand(8, 7, generator=gen, dtype=F64)
    a, b = simplex(8, gen, zeros=2), simplex(7, gen, zeros=1)
    W = torch.randn(8, 7, generator=gen, dtype=F64)
    grads = []
    for mode in ("implicit", "unroll"):
        Cr = C.clone().requires_grad_()
        res = otcore.sinkhorn(Cr, a, b, eps=0.5, tol=1e-13, max_iter=20_000, grad=mode)
        # gauge-invariant (equal total weight on f and g), touching zero-weight potentials too
        loss = (res.plan * W).sum() + res.f[0] + res.g[0] + res.f.mean() + res.g.mean() + res.value
        (g,) = torch.autograd.grad(loss, Cr)
        assert bool(torch.isfinite(g).all())
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-7, atol=1e-9)


def test_short_implicit_backward_warns_naming_the_option():
    gen = torch.Generator().manual_seed(5)
    C = torch.rand(15, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    res = otcore.sinkhorn(C, eps=0.05, tol=1e-10, implicit_max_iter=2)
    with pytest.warns(otcore.ConvergenceWarning, match="implicit_max_iter=2"):
        (res.f[0] ** 2).backward()
