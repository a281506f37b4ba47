"""The cosine cost 1 - cos(x, y) on point clouds: against scipy's and POT's metric="cosine"."""

from __future__ import annotations

import numpy as np
import ot
import scipy.spatial.distance
import torch
from conftest import F64, simplex

import otcore


def test_cosine_costs_are_scipys(gen):
    x = torch.randn(2, 30, 5, generator=gen, dtype=F64) + 0.3
    y = torch.randn(2, 20, 5, generator=gen, dtype=F64)
    y[1, 4] = 0.0  # a zero vector: cosine 0 from everything (cost 1)
    C = otcore.PointCloud(x, y, cost="cosine").materialize()
    for k in range(2):
        ref = scipy.spatial.distance.cdist(x[k].numpy(), y[k].numpy(), metric="cosine")
        ref[np.isnan(ref)] = 1.0  # scipy leaves 0/0 undefined
        np.testing.assert_allclose(C[k].numpy(), ref, rtol=0, atol=1e-14)
    assert otcore.PointCloud(x, y, cost="cosine").cost_range() >= float((C.amax((-2, -1)) - C.amin((-2, -1))).max())


def test_sinkhorn_and_divergence_on_the_cosine_cost(gen):
    x = torch.randn(25, 4, generator=gen, dtype=F64)
    y = torch.randn(18, 4, generator=gen, dtype=F64) + 0.5
    a, b = simplex(25, gen), simplex(18, gen)
    res = otcore.sinkhorn(otcore.PointCloud(x, y, cost="cosine"), a, b, eps=0.05, tol=1e-12)
    M = ot.dist(x.numpy(), y.numpy(), metric="cosine")
    P = ot.sinkhorn(a.numpy(), b.numpy(), M, 0.05, method="sinkhorn_log", stopThr=1e-14, numItermax=100_000)
    torch.testing.assert_close(res.plan, torch.from_numpy(P), rtol=0, atol=1e-10)
    # scale invariance (cosine sees directions only), and the debiased divergence is 0 on one measure
    scaled = otcore.sinkhorn(otcore.PointCloud(3 * x, y, cost="cosine"), a, b, eps=0.05, tol=1e-12)
    torch.testing.assert_close(scaled.value, res.value, rtol=1e-12, atol=0)
    assert float(otcore.sinkhorn_divergence(x, y, a, b, eps=0.05, cost="cosine")) > 0
    assert float(otcore.sinkhorn_divergence(x, 2 * x, a, a, eps=0.05, cost="cosine", tol=1e-4)) <= 1e-4


def test_cosine_gradients_pass_gradcheck(gen):
    x = torch.randn(6, 3, generator=gen, dtype=F64, requires_grad=True)
    y = torch.randn(5, 3, generator=gen, dtype=F64)

    def value(x):
        return otcore.sinkhorn(otcore.PointCloud(x, y, cost="cosine"), eps=0.2, tol=1e-13).value

    assert torch.autograd.gradcheck(value, (x,), atol=1e-7)
