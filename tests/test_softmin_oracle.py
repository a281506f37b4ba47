"""Every backend of the softmin (blocked torch, Triton) against the naive dense oracle.

The oracle (``otcore.kernels.softmin.naive``) runs on a cost computed here by explicit
differences, so values and gradients (through autograd of the oracle) are independent of the
geometry code under test. Sizes are small but awkward (1, 7 and 129 are not multiples of the
64-wide Triton tiles; d = 1 and 3 take the FMA path, d = 64 the tl.dot path); on a CPU the
Triton kernels run in Triton's interpreter.
"""

from __future__ import annotations

import pytest
import torch
from conftest import F64, KERNEL_DEVICE, simplex, sqdist
from otcore.kernels.softmin import naive

from otcore import CostMatrix, PointCloud

DEV = KERNEL_DEVICE
BACKENDS = ["torch", "triton"]


def _rand(shape, gen, shift=0.0):
    return (torch.randn(*shape, generator=gen, dtype=F64) + shift).to(DEV)


def _weights(batch, k, gen):
    """Simplex weights with one exact zero (when k > 2)."""
    return torch.stack([simplex(k, gen, zeros=1 if k > 2 else 0) for _ in range(batch)]).to(DEV)


def _oracle_cost(cost, x, y):
    sq = sqdist(x, y)
    return sq if cost == "sqeuclidean" else sq.clamp_min(1e-300).sqrt()


def _value_and_grads(fn, leaves, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, upstream)]


def _assert_close(got, want, rtol):
    for g, w in zip(got, want, strict=True):
        scale = float(w.abs().max()) or 1.0
        torch.testing.assert_close(g.to(w.dtype), w, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, m", [(1, 7), (7, 129), (129, 1)])
@pytest.mark.parametrize("d", [1, 3, 64])
@pytest.mark.parametrize("cost", ["sqeuclidean", "euclidean"])
def test_point_cloud_softmin_and_gradients(backend, n, m, d, cost, gen):
    x, y = _rand((2, n, d), gen), _rand((2, m, d), gen, shift=0.5)
    eps = 0.25 * d + 0.25
    for axis, k in ((1, m), (0, n)):
        h, w = _rand((2, k), gen), _weights(2, k, gen)
        upstream = _rand((2, n if axis == 1 else m), gen)

        def oracle(x, y, h, w, axis=axis):
            C = _oracle_cost(cost, x, y)
            return naive.softmin(C if axis == 1 else C.mT, h, w, eps)

        def tested(x, y, h, w, axis=axis):
            return PointCloud(x, y, cost=cost, backend=backend).softmin(h, eps, w, axis=axis)

        want = _value_and_grads(oracle, (x, y, h, w), upstream)
        _assert_close(_value_and_grads(tested, (x, y, h, w), upstream), want, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [1.0, 1e-3])
@pytest.mark.parametrize("small_on_numpy", [True, False])  # a small CPU cost's no-grad log-sum-exp (or torch's)
def test_dense_softmin_and_gradients(backend, eps, small_on_numpy, gen, monkeypatch):
    from otcore.geometry import cost_matrix

    if not small_on_numpy:
        monkeypatch.setattr(cost_matrix, "TORCH_GRAIN", 0)
    # C^T of a contiguous tensor: the Triton kernel reads C through its strides
    C = (3 * torch.rand(2, 129, 7, generator=gen, dtype=F64)).to(DEV).mT
    for axis, k in ((1, 129), (0, 7)):
        h, w = _rand((2, k), gen), _weights(2, k, gen)
        if eps < 0.01:  # zero weights far above the others: their w-gradient overflows (naive.py)
            w = w + 0.01
        upstream = _rand((2, 7 if axis == 1 else 129), gen)

        def oracle(C, h, w, axis=axis):
            return naive.softmin(C if axis == 1 else C.mT, h, w, eps)

        def tested(C, h, w, axis=axis):
            return CostMatrix(C, backend=backend).softmin(h, eps, w, axis=axis)

        want = _value_and_grads(oracle, (C, h, w), upstream)
        _assert_close(_value_and_grads(tested, (C, h, w), upstream), want, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_small_dense_softmin_on_numpy_matches_torch_in_low_precision(dtype, gen, monkeypatch):
    """A small CPU cost's softmin (NumPy) and torch's, in the cost's own dtype, both within that
    dtype's rounding of the float64 oracle, on either axis (a zero weight included)."""
    from otcore.geometry import cost_matrix

    C = (3 * torch.rand(2, 30, 20, generator=gen, dtype=F64))
    for axis, k in ((1, 20), (0, 30)):
        h, w = _rand((2, k), gen).cpu(), _weights(2, k, gen).cpu()
        want = naive.softmin(C if axis == 1 else C.mT, h, w, 0.05)
        got = []
        for grain in (cost_matrix.TORCH_GRAIN, 0):
            monkeypatch.setattr(cost_matrix, "TORCH_GRAIN", grain)
            got.append(CostMatrix(C.to(dtype), backend="torch").softmin(h.to(dtype), 0.05, w.to(dtype), axis=axis))
        for out in got:
            assert out.dtype == dtype
            torch.testing.assert_close(out.double(), want, rtol=0, atol=20 * torch.finfo(dtype).eps * float(want.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 3, 20])
def test_plan_products(backend, k, gen):
    """kernel_apply (both directions; FMA columns for k < 16, tl.dot above) and kernel_cost."""
    x, y = _rand((2, 70, 5), gen), _rand((2, 90, 5), gen, shift=0.4)
    C = torch.cdist(x, y) ** 1.5
    f, g = _rand((2, 70), gen), _rand((2, 90), gen)
    a, b = _weights(2, 70, gen), _weights(2, 90, gen)
    v, u = _rand((2, 90, k), gen), _rand((2, 70, k), gen)
    for geom, dense in ((PointCloud(x, y, backend=backend), sqdist(x, y)), (CostMatrix(C, backend=backend), C)):
        pairs = [
            (geom.kernel_apply(f, g, 0.5, b, v), naive.kernel_apply(dense, f, g, b, v, 0.5)),
            (geom.kernel_apply(g, f, 0.5, a, u, axis=0), naive.kernel_apply(dense.mT, g, f, a, u, 0.5)),
            (geom.kernel_cost(f, g, 0.5, b), naive.kernel_cost(dense, f, g, b, 0.5)),
        ]
        for got, want in pairs:
            torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11 * float(want.abs().max()))


def test_blocked_path_with_many_blocks_matches_the_oracle(gen, monkeypatch):
    """Tiny blocks force many of them, in the fused no-grad path and the checkpointed one."""
    from otcore.kernels.softmin import blocked

    monkeypatch.setattr(blocked, "BLOCK_ELEMENTS", 64)
    x, y = _rand((1, 50, 2), gen), _rand((1, 40, 2), gen, shift=1.0)
    h, w = _rand((1, 40), gen), _weights(1, 40, gen)
    want = naive.softmin(sqdist(x, y), h, w, 0.1)
    torch.testing.assert_close(PointCloud(x, y, backend="torch").softmin(h, 0.1, w), want, rtol=1e-12, atol=1e-12)
    xr = x.clone().requires_grad_()
    got = PointCloud(xr, y, backend="torch").softmin(h, 0.1, w)
    torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weighted", [True, False])
def test_weighted_lse_drops_underflowing_terms_exactly(gen, weighted):
    """``blocked.weighted_lse`` over scores spread across 300 units (most terms underflow, which it
    zeroes rather than exponentiating) against float64 logsumexp: equal to rounding, a row of
    -inf scores stays -inf, and the gradient matches autograd's of the reference."""
    from otcore.kernels.softmin import blocked

    s = (-300.0 * torch.rand(4, 50, generator=gen, dtype=torch.float32)).requires_grad_()
    with torch.no_grad():
        s[:, 7] = 0.0  # each row's largest term
    w = simplex(50, gen).float()[None].expand(4, 50) if weighted else None
    ref_s = s.detach().double().requires_grad_()
    ref = torch.logsumexp(ref_s + (0.0 if w is None else w.double().log()), dim=-1)
    out = blocked.weighted_lse(s, w)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(out.sum(), s)
    (ref_grad,) = torch.autograd.grad(ref.sum(), ref_s)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-30)
    empty = blocked.weighted_lse(torch.full((1, 5), float("-inf")), None if w is None else w[:1, :5])
    assert bool(torch.isneginf(empty).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("weights", ["none", "positive", "with_zeros"])
def test_block_softmin_grad_is_autograd_of_block_softmin(gen, dtype, weights):
    """``blocked.block_softmin_grad`` (closed form) against autograd through ``block_softmin``, in
    h, w and the costs, at a small eps where many terms underflow, with zero weights whose
    exponents lie above the row's largest kept one."""
    from otcore.kernels.softmin import blocked

    cost = _rand((2, 30, 40), gen).abs().to(dtype)
    h = _rand((2, 40), gen).to(dtype)
    w = None if weights == "none" else _weights(2, 40, gen).to(dtype)
    if weights == "with_zeros":
        w[:, :5] = 0.0
        h[:, :5] += 5.0  # the zero-weight columns hold the largest scores: clamped at EXP_CEIL
    eps, grad_out = 0.02, _rand((2, 30), gen).to(dtype)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (cost, h, w)]
    out = blocked.block_softmin(leaves[0], leaves[1], leaves[2], eps)
    wanted = [t for t in leaves if t is not None]
    expected = dict(zip(("cost", "h", "w"), torch.autograd.grad(out, wanted, grad_out), strict=False))
    grad_h, grad_w, grad_cost = blocked.block_softmin_grad(cost, h, w, grad_out, eps, (True, w is not None, True))
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for name, got in (("cost", grad_cost), ("h", grad_h), ("w", grad_w)):
        if name in expected:
            want = expected[name]
            torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()), msg=name)
    assert grad_w is None or weights != "none"
