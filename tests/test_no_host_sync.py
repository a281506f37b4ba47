"""With ``tol=0`` (a fixed number of iterations) and ``validate=False``, a solve reads no tensor
value on the host from input to output: what a training loop, an MoE router or a CUDA graph
needs. On the CPU ``forbid_host_reads`` fails on every host read (a torch-function mode, and
the Tensor methods themselves patched, since the mode is not active inside autograd's backward);
on CUDA, torch's own synchronisation debug mode does. The implicit backward is not covered: its
conjugate-gradient solve reads its residual on the host to stop.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import F64, clouds, simplex
from torch.overrides import TorchFunctionMode

import otcore

#: Tensor methods that copy a value to the host (``equal`` and ``nonzero`` return host data too).
HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__complex__", "equal",
              "nonzero", "numpy", "cpu"}


class ForbidHostReads(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            raise AssertionError(f"host read: {name}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def forbid_host_reads():
    """Fail on any host read, in the forward (the mode) and inside backward passes (the patches)."""

    def refuse(name):
        def method(*args, **kwargs):
            raise AssertionError(f"host read: {name}")

        return method

    patched = [n for n in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__") if hasattr(torch.Tensor, n)]
    saved = {n: getattr(torch.Tensor, n) for n in patched}
    try:
        for n in patched:
            setattr(torch.Tensor, n, refuse(n))
        with ForbidHostReads():
            yield
    finally:
        for n, method in saved.items():
            setattr(torch.Tensor, n, method)


class _ReadsInBackward(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad if bool(grad.sum() > 0) else -grad


def test_the_guard_catches_host_reads_forward_and_backward():
    t = torch.ones(3)
    for read in (lambda: bool(t.sum() > 0), lambda: t.sum().item(), lambda: float(t[0]), lambda: t.tolist()):
        with forbid_host_reads(), pytest.raises(AssertionError, match="host read"):
            read()
    x = torch.ones(3, requires_grad=True)
    out = _ReadsInBackward.apply(x).sum()
    with forbid_host_reads(), pytest.raises(AssertionError, match="host read"):
        torch.autograd.grad(out, x)


def _solves(x, y, a, b):
    """Each solve the training-loop contract covers, returning the tensors a model would use."""
    options = {"tol": 0, "validate": False, "max_iter": 7}
    cloud = otcore.PointCloud(x, y, validate=False)
    C = ((x[:, None] - y[None]) ** 2).sum(-1)
    yield "sinkhorn cloud", lambda: [(r := otcore.sinkhorn(cloud, a, b, eps=0.3, **options)).value, r.f, r.g,
                                     r.transport_cost, r.apply(y), r.marginal_error]
    yield "sinkhorn dense unbalanced", lambda: [otcore.sinkhorn(C, a, b, eps=0.3, tau_a=0.9, tau_b=0.8, **options).value]
    yield "sinkhorn unroll", lambda: [otcore.sinkhorn(cloud, a, b, eps=0.3, grad="unroll", **options).value]
    yield "divergence", lambda: [otcore.sinkhorn_divergence(x, y, a, b, eps=0.3, **options)]
    yield "divergence x, x", lambda: [otcore.sinkhorn_divergence(x, x, a, a, eps=0.3, **options)]


CASES = ["sinkhorn cloud", "sinkhorn dense unbalanced", "sinkhorn unroll", "divergence", "divergence x, x"]


@pytest.mark.parametrize("name", CASES)
def test_fixed_iteration_solves_read_nothing_on_the_host(name, gen):
    x, y = clouds(20, 15, 2, gen)
    a, b = simplex(20, gen), simplex(15, gen)
    solve = dict(_solves(x, y, a, b))[name]
    with forbid_host_reads():
        outputs = solve()
    for t in outputs:  # outside the mode: the values are real and finite
        assert bool(torch.isfinite(t).all()), name


def test_fixed_iteration_solve_runs_exactly_max_iter_and_matches_the_checked_one(gen):
    x, y = clouds(20, 15, 2, gen)
    fixed = otcore.sinkhorn(otcore.PointCloud(x, y), eps=0.3, tol=0, max_iter=400, validate=False)
    checked = otcore.sinkhorn(otcore.PointCloud(x, y), eps=0.3, tol=1e-12, max_iter=400)
    assert int(fixed.n_iter) == 400 and bool(fixed.converged)
    assert int(checked.n_iter) < 400
    torch.testing.assert_close(fixed.value, checked.value, rtol=1e-12, atol=0)
    assert float(fixed.info["error"][0]) <= 1e-12


@pytest.mark.parametrize("grad", ["unroll", "envelope"])
def test_backward_reads_nothing_on_the_host(grad, gen):
    x, y = clouds(20, 15, 2, gen)
    x = x.requires_grad_()
    loss = otcore.sinkhorn(otcore.PointCloud(x, y, validate=False), eps=0.3, tol=0, max_iter=5, validate=False,
                           grad=grad).value
    with forbid_host_reads():
        (grad,) = torch.autograd.grad(loss, x)
    assert grad.dtype == F64 and bool(torch.isfinite(grad).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's sync debug mode needs CUDA")
def test_no_cuda_synchronisation(gen):
    x, y = (t.cuda().float() for t in clouds(500, 400, 3, gen))
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = otcore.sinkhorn(otcore.PointCloud(x, y, validate=False), eps=0.3, tol=0, max_iter=20, validate=False)
        value = res.value + otcore.sinkhorn_divergence(x, y, eps=0.3, tol=0, max_iter=20, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(torch.isfinite(value))
