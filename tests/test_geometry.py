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


def test_cost_matrix_range_and_finiteness_from_one_read(gen):
    """``CostMatrix`` validates finiteness and caches ``cost_range`` (the batch's smallest max C -
    min C) from each problem's extremes: on a strided (transposed, expanded) batch as on the
    stored one, and a non-finite entry anywhere raises with its count."""
    C = torch.randn(3, 5, 4, generator=gen, dtype=F64) * torch.tensor([1.0, 0.1, 10.0], dtype=F64)[:, None, None]
    expected = float((C.amax((-2, -1)) - C.amin((-2, -1))).min())
    assert CostMatrix(C).cost_range() == expected
    assert CostMatrix(C.mT).cost_range() == expected
    assert CostMatrix(C[1]).cost_range() == float(C[1].max() - C[1].min())
    assert CostMatrix(C[:1].expand(4, 5, 4)).cost_range() == float(C[0].max() - C[0].min())
    for dtype, scale in ((torch.float16, 4e4), (torch.float32, 1.0)):  # cached at validation = recomputed
        D = (C[2] * scale).clamp(-6e4, 6e4).to(dtype)  # float16: a range beyond its largest number
        assert CostMatrix(D).with_tensors(D).cost_range() == CostMatrix(D).cost_range()
    for bad in (float("nan"), float("inf"), -float("inf")):
        D = C.clone()
        D[2, 1, 3] = D[0, 0, 0] = bad
        with pytest.raises(ValueError, match=r"C holds 2 non-finite"):
            CostMatrix(D.mT)


@pytest.mark.parametrize("cost", ["sqeuclidean", "cosine"])
def test_stored_costs_match_recomputed_ones_and_follow_in_place_changes(gen, cost, monkeypatch):
    """A small PointCloud keeps C and C^T (``DENSE_COSTS_BYTES``): its softmins (both axes) and
    gradients equal those of a cloud that recomputes its costs, and an in-place change of the
    points (a cosine cloud holds a view of x) is seen at the next call."""
    from otcore.geometry import point_cloud

    x, y = clouds(9, 7, 3, gen)
    h_rows, h_cols = torch.randn(1, 7, generator=gen, dtype=F64), torch.randn(1, 9, generator=gen, dtype=F64)
    w_rows, w_cols = simplex(7, gen)[None], simplex(9, gen)[None]

    def softmins(geom):
        return geom.softmin(h_rows, 0.3, w_rows, axis=1), geom.softmin(h_cols, 0.3, w_cols, axis=0)

    stored = PointCloud(x, y, cost=cost)
    softmins(stored)  # the first pass recomputes its costs; they are kept from the second on
    first = softmins(stored)
    assert "_dense" in stored.__dict__
    monkeypatch.setattr(point_cloud, "DENSE_COSTS_BYTES", 0)
    recomputed = softmins(PointCloud(x, y, cost=cost))
    assert "_dense" not in stored.with_tensors(*stored.tensors).__dict__
    monkeypatch.undo()
    for got, want in zip(first, recomputed, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if cost == "cosine":
        x.mul_(-1.0)  # the cloud's x is a view of this tensor: its version counter moves
        monkeypatch.setattr(point_cloud, "DENSE_COSTS_BYTES", 0)
        after = softmins(PointCloud(x, y, cost=cost))
        monkeypatch.undo()
        for got, want in zip(softmins(stored), after, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(after[0], recomputed[0])
    xr = x.clone().requires_grad_()
    out = PointCloud(xr, y, cost=cost).softmin(h_rows, 0.3, w_rows, axis=1).sum() + \
        PointCloud(xr, y, cost=cost).softmin(h_cols, 0.3, w_cols, axis=0).sum()
    dense = CostMatrix(sqdist(xr, y) if cost == "sqeuclidean" else
                       1 - torch.nn.functional.normalize(xr, dim=-1) @ torch.nn.functional.normalize(y, dim=-1).T)
    out_dense = dense.softmin(h_rows, 0.3, w_rows, axis=1).sum() + dense.softmin(h_cols, 0.3, w_cols, axis=0).sum()
    torch.testing.assert_close(torch.autograd.grad(out, xr)[0], torch.autograd.grad(out_dense, xr)[0],
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("numpy_entries", [0, 2**20])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_cost_matrix_range_is_exact_on_either_module(monkeypatch, numpy_entries, dtype):
    """``cost_range`` of a dense cost (batched, transposed strides) is the smallest max C - min C
    of its problems, reduced by NumPy (small CPU costs) or torch alike; a NaN is refused."""
    from otcore import _arrays

    monkeypatch.setattr(_arrays, "NUMPY_REDUCTION_ENTRIES", numpy_entries)
    gen = torch.Generator().manual_seed(0)
    C = (torch.randn(3, 20, 30, generator=gen, dtype=F64) * torch.tensor([1.0, 3.0, 0.5], dtype=F64)[:, None, None])
    C = C.to(dtype).mT
    want = min(float(c.double().max() - c.double().min()) for c in C)
    assert CostMatrix(C).cost_range() == want
    C = C.clone()
    C[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        CostMatrix(C)
