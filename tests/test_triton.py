"""The Triton kernels: finite differences in float64, half precision, batching, compile, and whole
solves on the Triton backend against the same solves on the torch backend.

On a machine without a GPU they run under Triton's interpreter (``TRITON_INTERPRET=1``, set in
conftest), so the sizes stay small but awkward: 1, 7 and 129 are not multiples of the 64-wide
tiles, d = 1 and 3 take the FMA path and d = 64 the tensor-core (tl.dot) path.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import F64, KERNEL_DEVICE, simplex

import otcore
from otcore.geometry import CostMatrix, PointCloud
from otcore.geometry import backends as backend_module

DEV = KERNEL_DEVICE
SIZES = [(1, 7), (7, 129), (129, 1)]


def _points(shape, gen, shift=0.0, dtype=F64):
    return (torch.randn(*shape, generator=gen, dtype=F64) + shift).to(dtype=dtype, device=DEV)


def _weights(batch, k, gen):
    """Weights on the simplex with one zero entry (when there are at least three)."""
    w = torch.stack([simplex(k, gen, zeros=1 if k > 2 else 0) for _ in range(batch)])
    return w.to(DEV)


def _softmin_and_grads(make_geom, backend, tensors, h, w, eps, axis):
    """Softmin and the gradients of <G, softmin> w.r.t. (*tensors, h, w) for a fixed G."""
    leaves = [t.detach().clone().requires_grad_() for t in (*tensors, h, w)]
    out = make_geom(*leaves[:-2], backend=backend).softmin(leaves[-2], eps, leaves[-1], axis=axis)
    upstream = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    return [out.detach(), *torch.autograd.grad(out, leaves, upstream)]


def _assert_same(reference, kernel, rtol):
    for ref, got in zip(reference, kernel, strict=True):
        scale = float(ref.abs().max()) or 1.0
        torch.testing.assert_close(got.to(ref.dtype), ref, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("cost", ["sqeuclidean", "euclidean", "dense"])
def test_kernel_gradients_pass_gradcheck(cost, gen):
    """Finite differences in float64 of the fused backward, weights included."""
    x, y = _points((2, 4, 3), gen), _points((2, 5, 3), gen, shift=0.3)
    h, w = _points((2, 5), gen), _weights(2, 5, gen) + 0.05
    if cost == "dense":
        tensors = (torch.cdist(x, y).detach(),)
        make = lambda C: CostMatrix(C, backend="triton")
    else:
        tensors = (x, y)
        make = lambda x, y: PointCloud(x, y, cost=cost, backend="triton")
    leaves = [t.detach().clone().requires_grad_() for t in (*tensors, h, w)]

    def softmin(*args):
        return make(*args[:-2]).softmin(args[-2], 0.7, args[-1], axis=1)

    assert torch.autograd.gradcheck(softmin, leaves, atol=1e-7)


def _relative_rmse(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach()
    return float((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [3, 64])
def test_low_precision_points_accumulate_in_float32(dtype, d, gen):
    """Half points are read as they are and accumulated in float32: against float64 on the same
    (rounded) points the error is float32's; against the unrounded points it is the input's."""
    x64, y64 = _points((1, 129, d), gen), _points((1, 70, d), gen, shift=0.5)
    h64, eps = _points((1, 70), gen), 0.5 * d
    x, y = x64.to(dtype), y64.to(dtype)
    leaves = [x.clone().requires_grad_(), y.clone().requires_grad_()]
    out = PointCloud(*leaves, backend="triton").softmin(h64.float(), eps)
    assert out.dtype == torch.float32
    grads = torch.autograd.grad(out.sum(), leaves)
    assert grads[0].dtype == dtype

    rounded = [x.double().requires_grad_(), y.double().requires_grad_()]
    want = PointCloud(*rounded, backend="torch").softmin(h64, eps)
    want_grads = torch.autograd.grad(want.sum(), rounded)
    assert _relative_rmse(out, want) < 1e-5
    half_rounding = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[dtype]
    for got, ref in zip(grads, want_grads, strict=True):
        assert _relative_rmse(got, ref) < half_rounding  # the gradients are returned in ``dtype``
    exact = PointCloud(x64, y64, backend="torch").softmin(h64, eps)
    assert _relative_rmse(out, exact) < half_rounding


def test_ragged_batch_by_zero_weight_padding_matches_separate_solves(gen):
    """Clouds of sizes (5, 9) and (12, 7) in one padded batch: padded points get weight 0."""
    shapes = [(5, 9), (12, 7)]
    n_max, m_max = (max(s[i] for s in shapes) for i in (0, 1))
    x = torch.zeros(2, n_max, 2, dtype=F64, device=DEV)
    y = torch.zeros(2, m_max, 2, dtype=F64, device=DEV)
    a = torch.zeros(2, n_max, dtype=F64, device=DEV)
    b = torch.zeros(2, m_max, dtype=F64, device=DEV)
    separate = []
    for i, (n, m) in enumerate(shapes):
        xi, yi = _points((n, 2), gen), _points((m, 2), gen, shift=1.0)
        ai, bi = simplex(n, gen).to(DEV), simplex(m, gen).to(DEV)
        x[i, :n], y[i, :m], a[i, :n], b[i, :m] = xi, yi, ai, bi
        separate.append(otcore.sinkhorn(PointCloud(xi, yi, backend="torch"), ai, bi, eps=0.5, tol=1e-10))
    batched = otcore.sinkhorn(PointCloud(x, y, backend="triton"), a, b, eps=0.5, tol=1e-10)
    for i, (n, m) in enumerate(shapes):
        torch.testing.assert_close(batched.value[i], separate[i].value, rtol=1e-9, atol=0)
        plan = batched.plan[i]
        torch.testing.assert_close(plan[:n, :m], separate[i].plan, rtol=0, atol=1e-12)
        assert float(plan[n:].abs().sum() + plan[:, m:].abs().sum()) == 0.0


@pytest.mark.parametrize("grad", ["implicit", "unroll"])
def test_sinkhorn_and_divergence_gradients_match_reference(grad, gen):
    x, y = _points((30, 3), gen), _points((40, 3), gen, shift=0.7)
    results = {}
    for backend in ("torch", "triton"):
        xs = x.clone().requires_grad_()
        out = otcore.sinkhorn(PointCloud(xs, y, backend=backend), eps=1.0, tol=1e-11, grad=grad)
        div = otcore.sinkhorn_divergence(xs, y, eps=1.0, tol=1e-11, backend=backend)
        loss = out.value + (out.f**2).mean() + div
        results[backend] = (out.f.detach(), out.g.detach(), loss.detach(), torch.autograd.grad(loss, xs)[0])
    _assert_same(results["torch"], results["triton"], rtol=1e-8)


def test_backend_choice_and_errors(monkeypatch):
    x = torch.randn(6, 2, dtype=F64)
    assert PointCloud(x.float(), x.float()).backend == "torch"  # auto on the CPU
    assert CostMatrix(torch.rand(3, 4)).backend == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        PointCloud(x, x, backend="keops")
    with pytest.raises(ValueError, match="p-norm"):
        PointCloud(x, x, cost=3, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        CostMatrix(torch.rand(3, 4), backend="triton")
    cuda = torch.device("cuda")
    # "auto" on CUDA: Triton for float32/half when it imports, the torch path for float64
    assert backend_module.resolve_backend("auto", cuda, torch.float32, None) == "triton"
    assert backend_module.resolve_backend("auto", cuda, torch.float64, None) == "torch"
    assert backend_module.resolve_backend("auto", cuda, torch.bfloat16, "no kernel") == "torch"


def test_auto_falls_back_with_one_log_line(monkeypatch, caplog):
    reason = "triton does not import (simulated by test_auto_falls_back_with_one_log_line)"
    monkeypatch.setattr(backend_module, "triton_import_error", lambda: reason)
    cuda = torch.device("cuda")
    with caplog.at_level("WARNING", logger="otcore"):
        for _ in range(3):
            assert backend_module.resolve_backend("auto", cuda, torch.float32, None) == "torch"
    assert [r.getMessage() for r in caplog.records].count(
        f"otcore: Triton kernels unavailable ({reason}); using the torch backend") == 1
    with pytest.raises(ValueError, match="simulated"):
        backend_module.resolve_backend("triton", cuda, torch.float32, None)


def test_show_config_reports_versions_and_backends(capsys):
    config = otcore.show_config()
    printed = capsys.readouterr().out
    assert config["torch"] == torch.__version__ and torch.__version__ in printed
    assert config["triton interpreter (TRITON_INTERPRET)"] is (DEV.type == "cpu")
    expected = "triton" if DEV.type == "cuda" else "torch"
    assert config["backends"]["PointCloud sqeuclidean/euclidean"] == expected
    assert config["backends"]["PointCloud p-norm"] == "torch"
    import numpy
    import ot
    import scipy
    assert (config["numpy"], config["scipy"]) == (numpy.__version__, scipy.__version__)
    assert config["POT"].startswith(ot.__version__) and config["torch threads"] == torch.get_num_threads()


def test_import_does_no_triton_work():
    code = "import sys, torch, otcore; otcore.sinkhorn(torch.rand(4, 5), eps=1.0); print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_torch_compile_keeps_the_kernels_whole(gen):
    """The kernels are opaque custom ops: a compiled softmin loss equals eager, gradients too."""
    x, y, h = _points((2, 9, 3), gen), _points((2, 11, 3), gen), _points((2, 11), gen)

    def loss(x, y, h):
        geom = PointCloud(x, y, backend="triton")
        return geom.softmin(h, 0.5).square().sum() + geom.softmin(geom.softmin(h, 0.5), 0.5, axis=0).sum()

    compiled = torch.compile(loss, backend="aot_eager")
    results = []
    for fn in (loss, compiled):
        leaves = [t.clone().requires_grad_() for t in (x, y, h)]
        value = fn(*leaves)
        results.append([value.detach(), *torch.autograd.grad(value, leaves)])
    _assert_same(results[0], results[1], rtol=1e-12)


@pytest.mark.parametrize("hessian", ["sparse", "dense"])
def test_sns_runs_on_the_kernels(hessian, gen):
    """SNS's warm-up softmins and (Hessian-free) CG plan products go through the kernels."""
    x, y = _points((20, 2), gen), _points((25, 2), gen, shift=1.0)
    plans = [
        otcore.sns(PointCloud(x, y, backend=backend), eps=0.05, tol=1e-10, hessian=hessian).plan
        for backend in ("torch", "triton")
    ]
    torch.testing.assert_close(plans[1], plans[0], rtol=0, atol=1e-12)
