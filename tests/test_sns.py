"""Sinkhorn-Newton-Sparse against a converged Sinkhorn, POT, a dense linear solve and the paper's case."""

import ot
import pytest
import scipy.linalg
import torch
from conftest import F64, clouds, simplex, sqdist

import otcore
from otcore.core.problem import prepare_problem
from otcore.solvers.entropic import newton_direct
from otcore.solvers.entropic.sns import _DualState, newton_direction


@pytest.mark.parametrize("hessian", ["direct", "sparse", "dense"])
def test_same_plan_as_converged_sinkhorn(gen, hessian):
    x, y = clouds(60, 50, 2, gen)
    C = sqdist(x, y)
    a, b = simplex(60, gen), simplex(50, gen)
    eps = 0.01 * float(C.max())
    ref = otcore.sinkhorn(C, a, b, eps=eps, tol=1e-12, max_iter=200_000)
    res = otcore.sns(C, a, b, eps=eps, tol=1e-11, hessian=hessian)
    assert bool(res.converged) and float(res.marginal_error) <= 1e-11
    assert (res.plan - ref.plan).abs().sum() <= 1e-9
    torch.testing.assert_close(res.value, ref.value, rtol=1e-11, atol=1e-12)
    assert int(res.n_iter) == int(res.info["sinkhorn_iter"]) + int(res.info["newton_iter"][0])


def test_value_gradient_is_the_plan_and_implicit_matches_sinkhorn(gen):
    C = torch.rand(2, 30, 25, generator=gen, dtype=F64).requires_grad_()
    W = torch.randn(30, 25, generator=gen, dtype=F64)
    res = otcore.sns(C, eps=0.02, tol=1e-12)
    (gv,) = torch.autograd.grad(res.value.sum(), C)
    torch.testing.assert_close(gv, res.plan.detach(), rtol=1e-9, atol=1e-12)
    (gp,) = torch.autograd.grad((res.plan * W).sum(), C)
    ref = otcore.sinkhorn(C, eps=0.02, tol=1e-12, max_iter=100_000)
    (gr,) = torch.autograd.grad((ref.plan * W).sum(), C)
    torch.testing.assert_close(gp, gr, rtol=1e-7, atol=1e-9)


@pytest.mark.filterwarnings("ignore:divide by zero")  # POT takes log(a) of the zero weight
@pytest.mark.parametrize("module", ["numpy", "torch"])
@pytest.mark.parametrize("n, m", [(45, 30), (25, 40)])
def test_direct_newton_matches_sparse_and_pot(gen, monkeypatch, n, m, module):
    """The direct (Cholesky) path, the sparse CG path and POT's log-domain Sinkhorn give one plan;
    n < m takes the transposed elimination, a zero weight the empty-row guard. The direct path
    runs on NumPy for small CPU problems and on torch for larger ones and on GPUs."""
    if module == "torch":
        monkeypatch.setattr(newton_direct, "NUMPY_MAX_WORK", 0)
    modules = []
    solver_init = newton_direct._Solver.__init__

    def recording(self, xp, *args):
        modules.append(xp.__name__)
        solver_init(self, xp, *args)

    monkeypatch.setattr(newton_direct._Solver, "__init__", recording)
    x, y = clouds(n, m, 2, gen)
    C = sqdist(x, y)
    a, b = simplex(n, gen), simplex(m, gen)
    a[3] = 0.0
    a = a / a.sum()
    eps = 0.005 * float(C.max())
    direct = otcore.sns(C, a, b, eps=eps, tol=1e-11, hessian="direct")
    assert modules == [module]
    sparse = otcore.sns(C, a, b, eps=eps, tol=1e-11, hessian="sparse")
    expected = ot.sinkhorn(a.numpy(), b.numpy(), C.numpy(), eps, method="sinkhorn_log", stopThr=1e-14,
                           numItermax=200_000)
    assert bool(direct.converged) and float(direct.marginal_error) <= 1e-11
    assert int(direct.n_iter) == int(direct.info["sinkhorn_iter"]) + int(direct.info["newton_iter"][0])
    assert (direct.plan - sparse.plan).abs().sum() <= 1e-9
    assert (direct.plan - torch.from_numpy(expected)).abs().sum() <= 1e-9
    torch.testing.assert_close(direct.value, sparse.value, rtol=1e-11, atol=1e-12)
    # potentials up to the gauge (f + k, g - k)
    pair = lambda res: (res.f[:, None] + res.g[None])[a > 0]
    torch.testing.assert_close(pair(direct), pair(sparse), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("factoring", ["lapack", "torch"])
def test_a_failed_factorisation_is_a_rejected_step(gen, monkeypatch, factoring):
    """Where the Schur complement does not factor (LAPACK's potrf or ``cholesky_ex`` reports it,
    as for a plan close to a permutation), the direct path rejects the step and shifts more: it
    still reaches the plan of the unhindered solve, in more Newton iterations."""
    x, y = clouds(30, 25, 2, gen)
    C, a, b = sqdist(x, y), simplex(30, gen), simplex(25, gen)
    eps = 0.005 * float(C.max())
    if factoring == "torch":  # the path of GPUs and large systems
        monkeypatch.setattr(newton_direct, "NUMPY_MAX_WORK", 0)
    plain = otcore.sns(C, a, b, eps=eps, tol=1e-11, hessian="direct")
    calls = []
    if factoring == "torch":
        factor = torch.linalg.cholesky_ex

        def failing_thrice(S):
            calls.append(1)
            L, info = factor(S)
            return L, (info + 1 if len(calls) <= 3 else info)

        monkeypatch.setattr(torch.linalg, "cholesky_ex", failing_thrice)
    else:
        lapack = scipy.linalg.get_lapack_funcs

        def with_failing_potrf(names, arrays):
            potrf, potrs = lapack(names, arrays)

            def failing_thrice(S, **kwargs):
                calls.append(1)
                L, info = potrf(S, **kwargs)
                return L, (info + 1 if len(calls) <= 3 else info)

            return failing_thrice, potrs

        monkeypatch.setattr(newton_direct.scipy.linalg, "get_lapack_funcs", with_failing_potrf)
    hindered = otcore.sns(C, a, b, eps=eps, tol=1e-11, hessian="direct")
    assert len(calls) > 3 and bool(hindered.converged)
    assert int(hindered.info["newton_iter"][0]) > int(plain.info["newton_iter"][0])
    assert (hindered.plan - plain.plan).abs().sum() <= 1e-9


def test_newton_direction_equals_dense_solve(gen):
    n, m, eps = 7, 5, 0.3
    C = torch.rand(1, n, m, generator=gen, dtype=F64)
    problem = prepare_problem(C, simplex(n, gen)[None], simplex(m, gen)[None], balanced=True)
    f = torch.randn(1, n, generator=gen, dtype=F64) * 0.1
    g = torch.randn(1, m, generator=gen, dtype=F64) * 0.1
    state = _DualState(problem.geom, C, problem.a, problem.b, f, g, eps)
    shift = torch.tensor([1e-3], dtype=F64)
    d, _ = newton_direction(state, problem.geom, problem.a, problem.b, eps, shift, torch.zeros(1, dtype=F64),
                            rtol=1e-14, max_iter=100)
    P = state.P[0]
    H = torch.cat([torch.cat([torch.diag(P.sum(1)), P], 1), torch.cat([P.T, torch.diag(P.sum(0))], 1)]) / eps
    expected = torch.linalg.solve(H + 1e-3 * torch.eye(n + m, dtype=F64), state.grad[0])
    torch.testing.assert_close(d[0], expected, rtol=1e-9, atol=1e-12)


def test_random_assignment_case_of_the_paper():
    """C ~ U[0, 1], uniform weights, eta = 1200 (eps = 1/1200), n = 500, float64."""
    gen = torch.Generator().manual_seed(0)
    C = torch.rand(500, 500, generator=gen, dtype=F64)
    res = otcore.sns(C, eps=1 / 1200, tol=1e-10)
    assert bool(res.converged) and float(res.marginal_error) <= 1e-10
    assert int(res.n_iter) < 100
    with pytest.warns(otcore.ConvergenceWarning):
        plain = otcore.sinkhorn(C, eps=1 / 1200, tol=1e-10, max_iter=10_000)
    assert not bool(plain.converged)


def test_float32_and_batched(gen):
    C = torch.rand(3, 40, 40, generator=gen, dtype=F64)
    res = otcore.sns(C.float(), eps=0.01, tol=1e-4)
    ref = otcore.sinkhorn(C, eps=0.01, tol=1e-12, max_iter=100_000)
    assert res.plan.dtype == torch.float32 and bool(res.converged.all())
    assert float((res.plan.double() - ref.plan).abs().sum(dim=(1, 2)).max()) <= 1e-3
    for k in range(3):
        one = otcore.sns(C[k], eps=0.01, tol=1e-10)
        torch.testing.assert_close(otcore.sns(C, eps=0.01, tol=1e-10).plan[k], one.plan, rtol=1e-8, atol=1e-12)


def test_bad_options_and_non_convergence(gen):
    C = torch.rand(10, 10, generator=gen, dtype=F64)
    with pytest.raises(ValueError, match="grad"):
        otcore.sns(C, eps=0.1, grad="unroll")
    with pytest.raises(ValueError, match="hessian"):
        otcore.sns(C, eps=0.1, hessian="full")
    with pytest.raises(ValueError, match="eps"):
        otcore.sns(C, eps=0.0)
    with pytest.warns(otcore.ConvergenceWarning) as record:
        res = otcore.sns(C, eps=1e-3, tol=1e-14, max_iter=3, sinkhorn_iter=2)
    assert len(record) == 1 and not bool(res.converged)


def _log_sinkhorn(C, a, b, eps, iters):
    """The plan of float64 log-domain Sinkhorn after ``iters`` iterations (a row, then a column
    c-transform) from zero potentials."""
    f, g = torch.zeros_like(a), torch.zeros_like(b)
    for _ in range(iters):
        f = -eps * torch.logsumexp(b.log() + (g - C) / eps, dim=1)
        g = -eps * torch.logsumexp(a.log()[:, None] + (f[:, None] - C) / eps, dim=0)
    return a[:, None] * b * torch.exp((f[:, None] + g - C) / eps)


@pytest.mark.parametrize("n, m, rel_eps, offset, shift", [(45, 30, 5e-3, 0.0, 1.0), (25, 40, 1e-3, 1e3, 1.0),
                                                          (30, 30, 2e-4, 0.0, 2.0)])
def test_direct_warm_up_is_log_domain_sinkhorn(gen, n, m, rel_eps, offset, shift):
    """The direct path's own warm-up (scalings of a held plan, log-domain iterations where the
    plan lost the mass that decides them: the far target cloud's columns after the first row
    update) gives Sinkhorn's iterates, whatever constant the cost carries; with max_iter =
    sinkhorn_iter they are the result."""
    x, y = clouds(n, m, 2, gen, shift=shift)
    C = sqdist(x, y)
    a, b = simplex(n, gen), simplex(m, gen)
    a[3] = 0.0
    a = a / a.sum()
    eps = rel_eps * float(C.max())
    for iters in (1, 4, 12):
        res = otcore.sns(C + offset, a, b, eps=eps, tol=0, max_iter=iters, sinkhorn_iter=iters, hessian="direct")
        assert int(res.info["sinkhorn_iter"]) == iters and int(res.info["newton_iter"][0]) == 0
        assert (res.plan - _log_sinkhorn(C, a, b, eps, iters)).abs().sum() <= 1e-11


def test_direct_warm_up_stops_where_sinkhorn_does(gen):
    """An easy problem converges within the warm-up: it stops at sinkhorn's iteration, with its plan."""
    C = torch.rand(40, 30, generator=gen, dtype=F64)
    ref = otcore.sinkhorn(C, eps=0.5, tol=1e-9, max_iter=20, domain="log")  # from zero, checked every iteration
    assert bool(ref.converged) and 2 < int(ref.n_iter) < 20
    res = otcore.sns(C, eps=0.5, tol=1e-9, hessian="direct")
    assert bool(res.converged) and int(res.info["newton_iter"][0]) == 0
    assert int(res.info["sinkhorn_iter"]) == int(ref.n_iter)
    assert (res.plan - ref.plan).abs().sum() <= 1e-12
