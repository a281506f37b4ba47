"""The geometry's softmin and plan products against dense float64 references."""

import pytest
import torch
from conftest import F64, clouds, simplex, sqdist

from otcore import CostMatrix, PointCloud


@pytest.mark.parametrize("cost,ref", [
    ("sqeuclidean", lambda x, y: sqdist(x, y)),
    ("euclidean", lambda x, y: sqdist(x, y).sqrt()),
    ("l1", lambda x, y: torch.cdist(x, y, p=1)),
    (3, lambda x, y: (x[:, None] - y[None]).abs().pow(3).sum(-1).pow(1 / 3)),
])
def test_point_cloud_costs(gen, cost, ref):
    x, y = clouds(11, 13, 4, gen)
    torch.testing.assert_close(PointCloud(x, y, cost=cost).materialize()[0], ref(x, y), rtol=1e-10, atol=1e-10)


def test_softmin_gradients_with_zero_weights_are_finite(gen):
    C = torch.rand(6, 5, generator=gen, dtype=F64, requires_grad=True)
    h = torch.randn(1, 5, generator=gen, dtype=F64, requires_grad=True)
    w = simplex(5, gen, zeros=2)[None].requires_grad_()
    out = CostMatrix(C).softmin(h, 0.2, w, axis=1)
    grads = torch.autograd.grad(out.sum(), (C, h, w))
    assert all(bool(torch.isfinite(t).all()) for t in grads)
    # d/dw_j of -eps log sum_j w_j e_j at w_j = 0 is -eps e_j / sum: compare with the dense formula
    e = torch.exp((h - C) / 0.2)
    expected = (-0.2 * e / (e * w).sum(-1, keepdim=True)).sum(0, keepdim=True)
    torch.testing.assert_close(grads[2], expected, rtol=1e-10, atol=1e-12)


def test_bad_geometry_inputs():
    with pytest.raises(ValueError, match="C"):
        CostMatrix(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="dimension"):
        PointCloud(torch.zeros(3, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="x"):
        PointCloud(torch.tensor([[float("inf"), 0.0]]), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="cost"):
        PointCloud(torch.zeros(3, 2), torch.zeros(4, 2), cost="hamming")
    with pytest.raises(ValueError, match="empty"):
        CostMatrix(torch.zeros(0, 3))
