"""A user's callable cost c(x, y) on point clouds: the same solve as on the materialised matrix."""

from __future__ import annotations

import ot
import pytest
import torch
from conftest import F64, simplex

import otcore


def weighted_l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A cost that is not translation invariant: |x - y|_1 weighted by 1 + |x|^2."""
    return torch.cdist(x, y, p=1) * (1 + x.pow(2).sum(-1, keepdim=True))


def test_callable_cost_solves_like_its_matrix(gen):
    x = torch.randn(30, 3, generator=gen, dtype=F64) + 2.0
    y = torch.randn(22, 3, generator=gen, dtype=F64)
    a, b = simplex(30, gen), simplex(22, gen)
    C = weighted_l1(x, y)
    res = otcore.sinkhorn(otcore.PointCloud(x, y, cost=weighted_l1), a, b, eps=0.5, tol=1e-12)
    P = ot.sinkhorn(a.numpy(), b.numpy(), C.numpy(), 0.5, method="sinkhorn_log", stopThr=1e-14, numItermax=100_000)
    torch.testing.assert_close(res.plan, torch.from_numpy(P), rtol=0, atol=1e-10)
    assert otcore.PointCloud(x, y, cost=weighted_l1).cost_range() == pytest.approx(float(C.max() - C.min()))
    # gradients through the callable equal those through the explicit matrix
    xs = x.clone().requires_grad_()
    value = otcore.sinkhorn(otcore.PointCloud(xs, y, cost=weighted_l1), a, b, eps=0.5, tol=1e-12).value
    (grad,) = torch.autograd.grad(value, xs)
    xm = x.clone().requires_grad_()
    (grad_matrix,) = torch.autograd.grad(otcore.sinkhorn(weighted_l1(xm, y), a, b, eps=0.5, tol=1e-12).value, xm)
    torch.testing.assert_close(grad, grad_matrix, rtol=1e-8, atol=1e-10)


def test_callable_cost_in_the_divergence_and_the_monge_gap(gen):
    x = torch.randn(20, 2, generator=gen, dtype=F64)
    y = torch.randn(15, 2, generator=gen, dtype=F64) + 1
    l1 = otcore.sinkhorn_divergence(x, y, eps=0.3, cost=lambda s, t: torch.cdist(s, t, p=1), tol=1e-10)
    torch.testing.assert_close(l1, otcore.sinkhorn_divergence(x, y, eps=0.3, cost="l1", tol=1e-10), rtol=1e-10, atol=0)
    gap = otcore.neural.monge_gap(x, 2 * x, cost=lambda s, t: torch.cdist(s, t, p=1), eps=0.3)
    torch.testing.assert_close(gap, otcore.neural.monge_gap(x, 2 * x, cost="l1", eps=0.3), rtol=1e-10, atol=1e-12)


def test_a_callable_of_the_wrong_shape_names_the_cost(gen):
    x, y = torch.randn(5, 2, generator=gen, dtype=F64), torch.randn(4, 2, generator=gen, dtype=F64)
    with pytest.raises(ValueError, match=r"cost: a callable c\(x, y\) must return a floating tensor of shape"):
        otcore.sinkhorn(otcore.PointCloud(x, y, cost=lambda s, t: s.sum(-1)), eps=0.1)
