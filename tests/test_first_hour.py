"""What a new user met in their first hour (issue #17, "Defects"): each item is a test here.

The README's code blocks are run by ``test_readme.py``.
"""

import re
import warnings

import numpy as np
import ot
import pytest
import torch
from conftest import F64, clouds, simplex, sqdist

import otcore

X, Y = clouds(12, 9, 2, torch.Generator().manual_seed(0))


# --- sinkhorn_divergence: options checked up front, its own name in errors, the caller's line in
# warnings, never below 0 ---

@pytest.mark.parametrize("name,value", [("eps", 0), ("eps", -1.0), ("eps", float("nan")), ("eps", "0.1"),
                                        ("tol", -1.0), ("max_iter", 1.5), ("max_iter", 0), ("grad", "magic"),
                                        ("eps_scaling", 1.5), ("check_every", 0)])
def test_divergence_refuses_bad_options_naming_them(name, value):
    options = {"eps": 0.1, name: value}
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        otcore.sinkhorn_divergence(X, Y, **options)


def test_divergence_typo_names_the_divergence():
    with pytest.raises(TypeError, match=r"sinkhorn_divergence\(\).*max_iters"):
        otcore.sinkhorn_divergence(X, Y, eps=0.1, max_iters=10)


@pytest.mark.parametrize("solve", [
    lambda: otcore.sinkhorn_divergence(X, Y, eps=0.01, max_iter=2),
    lambda: otcore.sinkhorn(sqdist(X, Y), eps=0.01, max_iter=2),
    lambda: otcore.sns(sqdist(X, Y), eps=0.01, max_iter=1, sinkhorn_iter=1),
    lambda: otcore.nn.SinkhornLoss(eps=0.01, max_iter=2)(X, Y),
], ids=["sinkhorn_divergence", "sinkhorn", "sns", "SinkhornLoss"])
def test_convergence_warning_points_at_the_callers_line(solve):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        solve()
    ours = [w for w in caught if issubclass(w.category, otcore.ConvergenceWarning)]
    assert len(ours) == 1
    assert ours[0].filename == __file__


@pytest.mark.parametrize("dtype,shift", [(F64, 1e-9), (torch.float32, 1e-6)])
@pytest.mark.parametrize("eps", [0.5, 0.1])
def test_divergence_of_nearly_identical_clouds_is_not_negative(dtype, shift, eps):
    """Computed separately (each within tol), the three terms can leave a difference below 0
    (here -3e-6 in float32 and -5e-8 in float64 without the clamp); the divergence is >= 0."""
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(0), dtype=F64).to(dtype).requires_grad_()
    s = otcore.sinkhorn_divergence(x, x.detach() + shift, eps=eps, warn=False)
    assert float(s.detach()) >= 0.0
    assert float(s.detach()) <= 30 * shift ** 2 + (1e-5 if dtype == torch.float32 else 1e-12)  # S ~ |x - y|^2
    (grad,) = torch.autograd.grad(s, x)
    assert bool(torch.isfinite(grad).all())
    assert float(grad.abs().max()) < (1e-4 if dtype == torch.float32 else 1e-7)  # the minimum: gradient ~ 0


def test_divergence_far_from_zero_is_not_clamped():
    """The clamp acts only below 0: a positive divergence keeps its value and gradient."""
    gen = torch.Generator().manual_seed(3)
    x, y = clouds(10, 8, 2, gen)
    x = x.requires_grad_()
    s = otcore.sinkhorn_divergence(x, y, eps=0.5, tol=1e-11, max_iter=20_000)
    (grad,) = torch.autograd.grad(s, x)
    h = 1e-6
    e = torch.zeros_like(x)
    e[0, 0] = h
    finite = (otcore.sinkhorn_divergence(x.detach() + e, y, eps=0.5, tol=1e-12, max_iter=20_000)
              - otcore.sinkhorn_divergence(x.detach() - e, y, eps=0.5, tol=1e-12, max_iter=20_000)) / (2 * h)
    assert float(s.detach()) > 0.1
    torch.testing.assert_close(grad[0, 0], finite, rtol=1e-5, atol=1e-8)


# --- validation messages ---

def test_weight_shape_error_reports_the_shape_passed():
    C = sqdist(*clouds(50, 40, 2, torch.Generator().manual_seed(1)))
    wrong = torch.full((40,), 1 / 40, dtype=F64)
    for solve in (lambda: otcore.sinkhorn(C, wrong, eps=0.1), lambda: otcore.emd(C, wrong)):
        with pytest.raises(ValueError, match=re.escape("a has shape (40,)")):
            solve()


def test_weights_keep_their_mass():
    """Weights of total mass 2 are not normalised: the plan is twice that of the normalised
    weights (POT's plan for them), so transport_cost and the exact value double."""
    gen = torch.Generator().manual_seed(2)
    x, y = clouds(15, 11, 2, gen)
    a, b = simplex(15, gen), simplex(11, gen)
    C = sqdist(x, y)
    eps = 0.2
    P = torch.from_numpy(ot.sinkhorn(a.numpy(), b.numpy(), C.numpy(), eps, method="sinkhorn_log", stopThr=1e-13,
                                     numItermax=100_000))
    res = otcore.sinkhorn(C, 2 * a, 2 * b, eps=eps, tol=1e-11, max_iter=100_000)
    torch.testing.assert_close(res.plan, 2 * P, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(res.transport_cost, 2 * (P * C).sum(), rtol=1e-8, atol=0)
    exact = ot.emd2(a.numpy(), b.numpy(), C.numpy())
    torch.testing.assert_close(otcore.emd(C, 2 * a, 2 * b).value, torch.tensor(2 * exact, dtype=F64),
                               rtol=1e-10, atol=0)


@pytest.mark.parametrize("solve", [
    lambda **kw: otcore.sinkhorn(sqdist(X, Y), eps=0.1, **kw),
    lambda **kw: otcore.sns(sqdist(X, Y), eps=0.1, **kw),
    lambda **kw: otcore.emd(sqdist(X, Y), **kw),
    lambda **kw: otcore.sinkhorn_divergence(X, Y, eps=0.1, **kw),
], ids=["sinkhorn", "sns", "emd", "sinkhorn_divergence"])
@pytest.mark.parametrize("value", [1.5, 10.0001, "10", None, True])
def test_max_iter_must_be_an_integer(solve, value):
    with pytest.raises(ValueError, match="max_iter"):
        solve(max_iter=value)


@pytest.mark.parametrize("solve", [
    lambda eps: otcore.sinkhorn(sqdist(X, Y), eps=eps),
    lambda eps: otcore.sns(sqdist(X, Y), eps=eps),
    lambda eps: otcore.sinkhorn_divergence(X, Y, eps=eps),
], ids=["sinkhorn", "sns", "sinkhorn_divergence"])
def test_eps_requiring_grad_is_refused(solve):
    eps = torch.tensor(0.3, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="eps is not differentiable"):
        solve(eps)
    # a constant tensor is read as its number
    value = lambda out: out.value if isinstance(out, otcore.OTResult) else out
    torch.testing.assert_close(value(solve(eps.detach())), value(solve(0.3)), rtol=0, atol=0)


# --- repr(OTResult) ---

def test_result_repr_is_concise_and_computes_nothing():
    res = otcore.sinkhorn(sqdist(X, Y), eps=0.3, tol=1e-9)
    text = repr(res)
    assert text.startswith("OTResult(") and "\n" not in text and len(text) < 200
    assert "operator" not in text and "info" not in text and "tensor(" not in text
    assert "f: (12,)" in text and "g: (9,)" in text
    assert f"n_iter={int(res.n_iter)}" in text and "converged=True" in text and "eps=0.3" in text
    value = float(re.search(r"value=([^,]+),", text).group(1))
    assert value == pytest.approx(float(res.value), rel=1e-3)
    error = float(re.search(r"error=([^,]+),", text).group(1))
    assert error == pytest.approx(float(res.info["error"]), rel=1e-3)
    assert "marginal_error" not in res.__dict__  # the repr did not run a plan product
    # once computed, the marginal error itself is shown; compare with a float64 dense reference
    computed = res.marginal_error
    P = res.plan
    reference = float((P.sum(1) - 1 / 12).abs().sum() + (P.sum(0) - 1 / 9).abs().sum())
    shown = float(re.search(r"marginal_error=([^,]+),", repr(res)).group(1))
    assert shown == pytest.approx(reference, rel=1e-3, abs=1e-15)
    assert shown == pytest.approx(float(computed), rel=1e-3)


def test_batched_result_repr():
    C = torch.stack([sqdist(X, Y), 2 * sqdist(X, Y), 3 * sqdist(X, Y)])
    res = otcore.sinkhorn(C, eps=0.5, tol=1e-9)
    text = repr(res)
    assert "batch=3" in text and "f: (3, 12)" in text and "g: (3, 9)" in text
    values = [float(v) for v in re.search(r"value=\[([^\]]+)\]", text).group(1).split(", ")]
    np.testing.assert_allclose(values, res.value.tolist(), rtol=1e-3)
    assert repr(otcore.emd(sqdist(X, Y))).endswith("converged=True)")  # no eps, no error for exact OT


def test_numpy_inputs_are_refused_with_the_conversion_to_use():
    C = np.random.default_rng(0).random((5, 4))
    for call, name in ((lambda: otcore.sinkhorn(C, eps=0.1), "C"),
                       (lambda: otcore.emd(C), "C"),
                       (lambda: otcore.sinkhorn_divergence(C, C, eps=0.1), "x"),
                       (lambda: otcore.PointCloud(torch.zeros(3, 2), [[0.0, 1.0]]), "y")):
        with pytest.raises(ValueError, match=rf"{name} must be a torch.Tensor.*torch.as_tensor\({name}\)"):
            call()


def test_a_compiled_model_with_the_divergence_matches_eager():
    """torch.compile of a model calling sinkhorn_divergence: same value and gradient as eager (the
    solve runs in the log domain under tracing, with graph breaks at its host reads)."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(2, 2)
    x, y = torch.randn(50, 2, generator=gen), torch.randn(40, 2, generator=gen)

    def loss(x, y):
        return otcore.sinkhorn_divergence(lin(x), y, eps=0.1)

    compiled = torch.compile(loss)
    value = compiled(x, y)
    (grad,) = torch.autograd.grad(value, lin.weight)
    eager = loss(x, y)
    (grad_eager,) = torch.autograd.grad(eager, lin.weight)
    torch.testing.assert_close(value, eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, grad_eager, rtol=1e-5, atol=1e-6)
