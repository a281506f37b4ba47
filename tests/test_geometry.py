"""The geometry's softmin and plan products against dense float64 references."""

import pytest
import torch
from conftest import F64, clouds, simplex, sqdist
from otcore.kernels.softmin import blocked

from otcore import CostMatrix, PointCloud


def dense_softmin(C, h, w, eps, axis):
    """-eps log sum w exp((h - C)/eps) on the full matrix (float64 oracle)."""
    if axis == 0:
        C = C.mT
    return -eps * torch.logsumexp((h.unsqueeze(-2) - C) / eps + torch.log(w).unsqueeze(-2), dim=-1)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("kind", ["dense", "cloud"])
@pytest.mark.parametrize("eps", [1.0, 1e-3])
def test_softmin_matches_dense_logsumexp(gen, axis, kind, eps):
    B, n, m = 3, 37, 29
    x = torch.randn(B, n, 3, generator=gen, dtype=F64)
    y = torch.randn(B, m, 3, generator=gen, dtype=F64)
    C = sqdist(x, y)
    geom = CostMatrix(C) if kind == "dense" else PointCloud(x, y)
    k = n if axis == 0 else m
    h = torch.randn(B, k, generator=gen, dtype=F64)
    w = torch.stack([simplex(k, gen, zeros=3) for _ in range(B)])
    expected = dense_softmin(C, h, w, eps, axis)
    got = geom.softmin(h, eps, w, axis=axis)
    torch.testing.assert_close(got, expected, rtol=1e-11, atol=1e-11 * eps)


def test_fused_and_differentiable_paths_agree(gen, monkeypatch):
    """Small blocks force many blocks; the checkpointed path must equal the fused one."""
    monkeypatch.setattr(blocked, "BLOCK_ELEMENTS", 64)
    x, y = clouds(50, 40, 2, gen)
    geom = PointCloud(x, y)
    h = torch.randn(1, 40, generator=gen, dtype=F64)
    fused = geom.softmin(h, 0.1, axis=1)
    xr = x.clone().requires_grad_()
    diff = PointCloud(xr, y).softmin(h, 0.1, axis=1)
    torch.testing.assert_close(diff.detach(), fused, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cost,ref", [
    ("sqeuclidean", lambda x, y: sqdist(x, y)),
    ("euclidean", lambda x, y: sqdist(x, y).sqrt()),
    ("l1", lambda x, y: torch.cdist(x, y, p=1)),
    (3, lambda x, y: (x[:, None] - y[None]).abs().pow(3).sum(-1).pow(1 / 3)),
])
def test_point_cloud_costs(gen, cost, ref):
    x, y = clouds(11, 13, 4, gen)
    torch.testing.assert_close(PointCloud(x, y, cost=cost).materialize()[0], ref(x, y), rtol=1e-10, atol=1e-10)


def test_kernel_apply_and_cost_match_dense(gen):
    x, y = clouds(23, 17, 2, gen)
    C = sqdist(x, y)
    f = torch.randn(1, 23, generator=gen, dtype=F64)
    g = torch.randn(1, 17, generator=gen, dtype=F64)
    w = simplex(17, gen, zeros=2)[None]
    v = torch.randn(1, 17, 3, generator=gen, dtype=F64)
    K = torch.exp((f[..., :, None] + g[..., None, :] - C) / 0.3) * w[..., None, :]
    for geom in (CostMatrix(C), PointCloud(x, y)):
        torch.testing.assert_close(geom.kernel_apply(f, g, 0.3, w, v), K @ v, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(geom.kernel_cost(f, g, 0.3, w), (K * C).sum(-1), rtol=1e-11, atol=1e-12)


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
        PointCloud(torch.zeros(3, 2), torch.zeros(4, 2), cost="cosine")
    with pytest.raises(ValueError, match="empty"):
        CostMatrix(torch.zeros(0, 3))
