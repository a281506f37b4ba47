"""Sparsity-constrained OT (otcore.sparse_ot) against POT's ot.smooth, closed forms and brute force."""

from __future__ import annotations

import contextlib
import io
import itertools
import warnings

import numpy as np
import ot
import ot.smooth
import pytest
import torch
from conftest import F64, clouds, simplex, sqdist

import otcore
from otcore.solvers.projections import sparse_simplex_projection, top_k, top_k_by_max
from otcore.solvers.sparse import _host_semi_dual, _scaled_cost, _semi_dual

GAMMA = 0.1


def _quiet(fn, *args, **kwargs):
    """Call a POT function with its stray prints (projection_sparse_simplex) silenced."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def _problem(gen, n=12, m=9):
    x, y = clouds(n, m, 2, gen)
    return sqdist(x, y), simplex(n, gen), simplex(m, gen)


def _regul(k: int, n: int, gamma: float = GAMMA):
    return ot.smooth.SquaredL2(gamma=gamma) if k >= n else ot.smooth.SparsityConstrained(max_nz=k, gamma=gamma)


def _pot_kwargs(k: int, n: int):
    return {"reg_type": "l2"} if k >= n else {"reg_type": "sparsity_constrained", "max_nz": k}


def _simplex_projection_bisect(v: torch.Tensor, mass: float) -> torch.Tensor:
    """Euclidean projection onto {p >= 0, sum p = mass} by bisection on the threshold (float64)."""
    lo, hi = float(v.min()) - mass, float(v.max())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float((v - mid).clamp(min=0).sum()) > mass else (lo, mid)
    return (v - 0.5 * (lo + hi)).clamp(min=0)


# ----------------------------------------------------------------------------- projection
@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_sparse_projection_is_the_closest_k_sparse_point(gen, k):
    v = torch.randn(4, 6, generator=gen, dtype=F64)
    mass = torch.tensor([1.0, 0.3, 2.0, 0.7], dtype=F64)
    p, theta = sparse_simplex_projection(v, k, mass)
    for i in range(v.shape[0]):  # brute force over every support of size k
        best = min(
            (torch.zeros(6, dtype=F64).index_put((torch.tensor(s),), _simplex_projection_bisect(v[i, list(s)], float(mass[i])))
             for s in itertools.combinations(range(6), min(k, 6))),
            key=lambda q, i=i: float(((q - v[i]) ** 2).sum()),
        )
        torch.testing.assert_close(p[i], best, atol=1e-10, rtol=0)
        support = p[i] > 0
        torch.testing.assert_close(p[i][support], v[i][support] - theta[i], atol=1e-12, rtol=0)
    assert int((p > 0).sum(-1).max()) <= k
    torch.testing.assert_close(p.sum(-1), mass, atol=1e-12, rtol=0)


def test_sparse_projection_matches_pot_and_breaks_ties_to_the_lower_index(gen):
    V = torch.randn(7, 5, generator=gen, dtype=F64)
    ref = _quiet(ot.utils.projection_sparse_simplex, V.numpy(), 3, axis=0)
    p, _ = sparse_simplex_projection(V.mT, 3)
    np.testing.assert_allclose(p.mT.numpy(), ref, atol=1e-12)
    tied = torch.tensor([0.5, 2.0, 0.5, 2.0, 2.0], dtype=F64)
    p, _ = sparse_simplex_projection(tied, 2)
    assert p.tolist() == [0.0, 0.5, 0.0, 0.5, 0.0]
    p, _ = sparse_simplex_projection(torch.tensor([3.0, -1.0], dtype=F64), 1, 0.0)
    assert p.tolist() == [0.0, 0.0]


def _stable_top_k(v: torch.Tensor, k: int, dim: int = -1):
    """Reference tie rule: the first k of a stable descending sort (lower index first among equals)."""
    values, index = torch.sort(v, dim=dim, descending=True, stable=True)
    return values.narrow(dim, 0, min(k, v.shape[dim])), index.narrow(dim, 0, min(k, v.shape[dim]))


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_top_k_fast_path_on_tie_free_rows_equals_the_tie_rule(gen, dtype):
    """Without ties every row's top k is unique: the single-topk path returns exactly the stable sort's."""
    v = torch.randn(3, 40, 25, generator=gen, dtype=F64).to(dtype)
    for k in (1, 4, 24, 25, 30):
        values, index = top_k(v, k)
        ref_values, ref_index = _stable_top_k(v, k)
        assert torch.equal(values, ref_values) and torch.equal(index, ref_index)


def test_top_k_with_ties_keeps_the_lower_indices_deterministically(gen):
    """Integer-valued rows are full of ties (the exact tie path): the kept set is the stable sort's,
    the same whatever the batch it comes in, call after call."""
    v = torch.randint(0, 4, (50, 12), generator=gen).to(F64)
    for k in (1, 2, 5, 11):
        values, index = top_k(v, k)
        ref_values, ref_index = _stable_top_k(v, k)
        assert torch.equal(values, ref_values)
        assert torch.equal(index.sort(-1).values, ref_index.sort(-1).values)
        again = top_k(v, k)
        assert torch.equal(again.values, values) and torch.equal(again.indices, index)
        for i in (0, 17, 49):  # one row alone (it may take the fast path) keeps the same set
            assert torch.equal(top_k(v[i], k)[1].sort().values, index[i].sort().values)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_top_k_by_max_is_the_stable_sort_order(gen, dim):
    """k passes of a maximum give the stable sort's first k, in its order, ties included."""
    for v in (torch.randn(9, 7, 5, generator=gen, dtype=F64), torch.randint(0, 3, (9, 7, 5), generator=gen).float()):
        for k in range(1, v.shape[dim] + 1):
            values, index = top_k_by_max(v, k, dim=dim)
            ref_values, ref_index = _stable_top_k(v, k, dim)
            assert torch.equal(values, ref_values) and torch.equal(index, ref_index)
            work = v.clone()  # with a scratch buffer: v is masked in place, the result is the same
            scratch = torch.empty_like(v, dtype=torch.promote_types(v.dtype, torch.float32))
            values_s, index_s = top_k_by_max(work, k, dim=dim, scratch=scratch)
            assert torch.equal(values_s, ref_values) and torch.equal(index_s, ref_index)
            assert int(torch.isinf(work).sum()) == v.numel() // v.shape[dim] * (k - 1)
    v = torch.randn(6, 5, generator=gen, dtype=F64, requires_grad=True)  # values keep the graph
    values, index = top_k_by_max(v, 2)
    (grad,) = torch.autograd.grad(values.sum(), v)
    assert torch.equal(grad, torch.zeros_like(v).scatter(-1, index, 1.0))


# ----------------------------------------------------------------------------- against POT
@pytest.mark.parametrize("k", [1, 2, 3])
def test_semi_dual_objective_at_least_pots(gen, k):
    C, a, b = _problem(gen)
    A, B, M = a.numpy(), b.numpy(), C.numpy()
    regul = _regul(k, len(a))
    _, log = _quiet(ot.smooth.smooth_ot_semi_dual, A, B, M, GAMMA, log=True, **_pot_kwargs(k, len(a)))
    pot_value = _quiet(ot.smooth.semi_dual_obj_grad, log["alpha"], A, B, M, regul)[0]
    res = otcore.sparse_ot(C, a, b, k=k, gamma=GAMMA, warn=False)
    ours = _quiet(ot.smooth.semi_dual_obj_grad, res.f.numpy(), A, B, M, regul)[0]
    assert ours >= pot_value - 1e-10
    assert float(res.value) == pytest.approx(ours, abs=1e-12)  # value is S at f, by POT's formula
    # the plan is the one its potential defines, with <= k nonzeros per column summing to b
    plan = _quiet(ot.smooth.get_plan_from_semi_dual, res.f.numpy(), B, M, regul)
    np.testing.assert_allclose(res.plan.numpy(), plan, atol=1e-12)
    assert int((res.plan > 0).sum(0).max()) <= k
    torch.testing.assert_close(res.plan.sum(0), b, atol=1e-12, rtol=0)
    # g is the column threshold: T = [f + g - C]_+ / gamma on the support
    support = res.plan > 0
    torch.testing.assert_close(res.plan[support], ((res.f[:, None] + res.g[None] - C) / GAMMA)[support],
                               atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_semi_dual_objective_at_least_pots_where_k_binds(gen, dtype):
    # the asv problem, smaller: k = 4 of 100 rows, gamma a tenth of the mean cost. POT's L-BFGS-B
    # stops on its relative decrease (1e-9) short of the maximum, at a kink; otcore must not
    for _ in range(3):
        x, y = clouds(100, 100, 2, gen, shift=1.0)
        C = sqdist(x, y * 0.9).to(dtype)
        a, b = simplex(100, gen).to(dtype), simplex(100, gen).to(dtype)
        gamma = 0.1 * float(C.mean())
        A, B, M = a.double().numpy(), b.double().numpy(), C.double().numpy()  # the problem otcore sees
        regul = ot.smooth.SparsityConstrained(max_nz=4, gamma=gamma)
        _, log = _quiet(ot.smooth.smooth_ot_semi_dual, A, B, M, gamma, log=True, **_pot_kwargs(4, 100))
        pot_value = _quiet(ot.smooth.semi_dual_obj_grad, log["alpha"], A, B, M, regul)[0]
        res = otcore.sparse_ot(C, a, b, k=4, gamma=gamma, warn=False)
        assert res.f.dtype == dtype
        ours = _quiet(ot.smooth.semi_dual_obj_grad, res.f.double().numpy(), A, B, M, regul)[0]
        assert ours >= pot_value - 1e-12 * abs(pot_value)


@pytest.mark.parametrize("k", [2, 3])
def test_dual_plan_and_objective_against_pot(gen, k):
    C, a, b = _problem(gen)
    A, B, M = a.numpy(), b.numpy(), C.numpy()
    regul = _regul(k, len(a))
    _, log = _quiet(ot.smooth.smooth_ot_dual, A, B, M, GAMMA, log=True, **_pot_kwargs(k, len(a)))
    pot_value = ot.smooth.dual_obj_grad(log["alpha"], log["beta"], A, B, M, regul)[0]
    res = otcore.sparse_ot(C, a, b, k=k, gamma=GAMMA, formulation="dual", warn=False)
    ours = ot.smooth.dual_obj_grad(res.f.numpy(), res.g.numpy(), A, B, M, regul)[0]
    assert float(res.value) == pytest.approx(ours, abs=1e-12)
    assert ours >= pot_value - 1e-3 * abs(pot_value)  # nonsmooth: L-BFGS ends near, not at, a kink
    plan = ot.smooth.get_plan_from_dual(res.f.numpy(), res.g.numpy(), M, regul)
    # equal plans, except where two scores f_i + g_j - C_ij of a column tie (to rounding) at the
    # k-th largest: either choice is the projection there, and each implementation picks its own
    ours = res.plan.numpy()
    np.testing.assert_allclose(np.sort(ours, axis=0), np.sort(plan, axis=0), atol=1e-12)
    scores = np.sort(res.f.numpy()[:, None] + res.g.numpy()[None] - M, axis=0)[::-1]
    tied = np.abs(scores[k - 1] - scores[k]) <= 1e-12 * np.abs(scores).max()
    differ = ~np.isclose(ours, plan, rtol=1e-7, atol=1e-12).all(axis=0)
    assert not (differ & ~tied).any()
    assert int((res.plan > 0).sum(0).max()) <= k
    # weak duality: the dual is a relaxation of the semi-dual
    semi = otcore.sparse_ot(C, a, b, k=k, gamma=GAMMA, warn=False)
    # both are L-BFGS ascents of nonsmooth objectives that may stop at a kink (neither reports
    # converged here): with scipy 1.17's L-BFGS-B the semi-dual stops 1.3e-3 below the dual's value
    assert float(res.value) <= float(semi.value) + 3e-3 * abs(float(semi.value))


@pytest.mark.parametrize("formulation", ["semi-dual", "dual"])
def test_k_at_least_n_is_quadratic_ot(gen, formulation):
    C, a, b = _problem(gen)
    A, B, M = a.numpy(), b.numpy(), C.numpy()
    solve = ot.smooth.smooth_ot_semi_dual if formulation == "semi-dual" else ot.smooth.smooth_ot_dual
    ref = solve(A, B, M, GAMMA, reg_type="l2", stopThr=1e-14, numItermax=5000)
    res = otcore.sparse_ot(C, a, b, k=len(a) + 3, gamma=GAMMA, formulation=formulation, tol=1e-10)
    assert bool(res.converged)
    np.testing.assert_allclose(res.plan.numpy(), ref, atol=1e-6)
    # strong duality of the smooth problem: value = <T, C> + (gamma/2)|T|^2 at the (feasible) plan
    primal = (res.plan * C).sum() + GAMMA / 2 * (res.plan**2).sum()
    assert float(res.value) == pytest.approx(float(primal), rel=1e-8)
    assert float(res.marginal_error) <= 1e-9


def test_k_one_is_unregularised_ot_plus_a_constant(gen):
    """For k = 1 every column is a vertex of the simplex: S(alpha) is the c-transform semi-dual of
    unregularised OT plus (gamma/2) sum_j b_j^2, whose maximum is emd2 + that constant."""
    C, a, b = _problem(gen, n=8, m=8)
    gamma = 1e-4
    res = otcore.sparse_ot(C, a, b, k=1, gamma=gamma, warn=False, max_iter=2000)
    c_transform = (a * res.f).sum() - (b * (res.f[:, None] - C).max(0).values).sum()
    constant = gamma / 2 * (b * b).sum()
    assert float(res.value) == pytest.approx(float(c_transform + constant), rel=1e-10)
    exact = ot.emd2(a.numpy(), b.numpy(), C.numpy())
    assert float(res.value - constant) <= exact + 1e-10  # weak duality
    assert float(res.value - constant) == pytest.approx(exact, rel=1e-2)
    assert bool(((res.plan > 0).sum(0) == 1).all())


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("formulation", ["semi-dual", "dual"])
def test_gradcheck_plan_and_value_in_the_smooth_case(gen, formulation):
    C, a, b = _problem(gen, n=5, m=4)
    C = C.clone().requires_grad_(True)

    def outputs(cost):
        res = otcore.sparse_ot(cost, a, b, k=5, gamma=1.0, formulation=formulation, tol=1e-12, max_iter=2000)
        return res.plan, res.value

    torch.autograd.gradcheck(outputs, (C,), atol=1e-5, rtol=1e-4)
    value = otcore.sparse_ot(C, a, b, k=5, gamma=1.0, formulation=formulation, tol=1e-12).value
    (grad,) = torch.autograd.grad(value, C)
    plan = otcore.sparse_ot(C.detach(), a, b, k=5, gamma=1.0, formulation=formulation, tol=1e-12).plan
    torch.testing.assert_close(grad, plan, atol=1e-12, rtol=0)  # envelope theorem


def test_adam_steps_are_unrolled_exactly(gen):
    """The Adam mode differentiates its fixed number of steps: compare with finite differences."""
    C, a, b = _problem(gen, n=5, m=4)
    C = C.clone().requires_grad_(True)
    weights = torch.randn(5, 4, generator=gen, dtype=F64)

    def loss(cost):
        res = otcore.sparse_ot(cost, a, b, k=2, gamma=1.0, method="adam", max_iter=5, lr=0.05, tol=0)
        return (res.plan * weights).sum() + res.f.square().sum()

    torch.autograd.gradcheck(loss, (C,), atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------- API behaviour
@pytest.mark.parametrize(("formulation", "method"), [("semi-dual", "lbfgs"), ("dual", "lbfgs"), ("semi-dual", "adam")])
def test_batched_equals_one_by_one(gen, formulation, method):
    problems = [_problem(gen) for _ in range(3)]
    C = torch.stack([p[0] for p in problems])
    a = torch.stack([p[1] for p in problems])
    b = torch.stack([p[2] for p in problems])
    opts = {"k": 3, "gamma": GAMMA, "formulation": formulation, "method": method, "warn": False, "max_iter": 60}
    batch = otcore.sparse_ot(C, a, b, **opts)
    assert batch.plan.shape == (3, 12, 9)
    for i in range(3):
        one = otcore.sparse_ot(C[i], a[i], b[i], **opts)
        torch.testing.assert_close(batch.plan[i], one.plan, atol=1e-12, rtol=0)
        torch.testing.assert_close(batch.value[i], one.value, atol=1e-12, rtol=0)


def test_adam_reaches_the_lbfgs_optimum_and_geometry_input(gen):
    x, y = clouds(10, 10, 2, gen)
    a, b = simplex(10, gen), simplex(10, gen)
    lbfgs = otcore.sparse_ot(otcore.PointCloud(x, y), a, b, k=10, gamma=1.0, tol=1e-10)
    torch.testing.assert_close(lbfgs.plan, otcore.sparse_ot(sqdist(x, y), a, b, k=10, gamma=1.0, tol=1e-10).plan,
                               atol=1e-9, rtol=0)
    adam = otcore.sparse_ot(otcore.CostMatrix(sqdist(x, y)), a, b, k=10, gamma=1.0, method="adam", max_iter=3000,
                            lr=0.02, tol=1e-4)
    assert bool(adam.converged)
    assert float(adam.value) == pytest.approx(float(lbfgs.value), rel=1e-5)


def test_float32_keeps_dtype_and_agrees_with_float64(gen):
    C, a, b = _problem(gen)
    ref = otcore.sparse_ot(C, a, b, k=3, gamma=GAMMA, warn=False)
    for method in ("lbfgs", "adam"):
        res = otcore.sparse_ot(C.float(), a.float(), b.float(), k=3, gamma=GAMMA, method=method, warn=False)
        for t in (res.plan, res.f, res.g, res.value):
            assert t.dtype == torch.float32
    res = otcore.sparse_ot(C.float(), a.float(), b.float(), k=3, gamma=GAMMA, warn=False)
    assert float(res.value) == pytest.approx(float(ref.value), rel=1e-5)


def test_non_convergence_warns_once_and_flags(gen):
    C, a, b = _problem(gen)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = otcore.sparse_ot(C, a, b, k=12, gamma=GAMMA, max_iter=2, tol=1e-12)
    assert [w.category for w in caught] == [otcore.ConvergenceWarning]
    assert not bool(res.converged)
    assert float(res.info["error"]) > 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = otcore.sparse_ot(C, a, b, k=2, gamma=GAMMA, method="adam", tol=0)
    assert bool(res.converged)


def test_zero_weights_give_finite_results(gen):
    C, _, _ = _problem(gen)
    a, b = simplex(12, gen, zeros=3), simplex(9, gen, zeros=2)
    for formulation in ("semi-dual", "dual"):
        res = otcore.sparse_ot(C, a, b, k=2, gamma=GAMMA, formulation=formulation, warn=False, max_iter=60)
        assert bool(torch.isfinite(res.plan).all()) and bool(torch.isfinite(res.value))
        assert float(res.plan[:, :2].abs().sum()) == 0.0


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"k": 0}, "k"), ({"k": 1.5}, "k"), ({"k": "2"}, "k"), ({"k": True}, "k"),
    ({"k": 2, "gamma": 0.0}, "gamma"), ({"k": 2, "gamma": -1.0}, "gamma"), ({"k": 2, "gamma": float("nan")}, "gamma"),
    ({"k": 2, "formulation": "primal"}, "formulation"), ({"k": 2, "method": "sgd"}, "method"),
    ({"k": 2, "lr": 0.0}, "lr"), ({"k": 2, "max_iter": 0}, "max_iter"), ({"k": 2, "tol": -1.0}, "tol"),
])
def test_bad_arguments_raise_naming_them(gen, kwargs, name):
    C, a, b = _problem(gen)
    with pytest.raises(ValueError, match=name):
        otcore.sparse_ot(C, a, b, **kwargs)


def test_bad_inputs_raise(gen):
    C, a, b = _problem(gen)
    with pytest.raises(ValueError, match="a"):
        otcore.sparse_ot(C, a[:-1], b, k=2)
    with pytest.raises(ValueError, match="mass"):
        otcore.sparse_ot(C, a, 2 * b, k=2)
    bad = C.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        otcore.sparse_ot(bad, a, b, k=2)


def test_host_semi_dual_equals_the_torch_objective(gen):
    """The numpy evaluation L-BFGS uses on the CPU: the same value and gradient as ``_semi_dual``
    (a zero-mass column, k = 1, k < n and k >= n)."""
    C, a, _ = _problem(gen)
    b = simplex(9, gen, zeros=1)
    scaled = _scaled_cost(C[None], GAMMA)
    for k in (1, 3, 12, 20):
        negated = _host_semi_dual(scaled[0], a.numpy(), b.numpy(), gamma=GAMMA, k=k)
        for _ in range(3):
            alpha = C.amin(-1) + 0.1 * torch.randn(12, generator=gen, dtype=F64)
            value, grad = _semi_dual(alpha[None], scaled, a[None], b[None], gamma=GAMMA, k=k, plan=False)[:2]
            minus_value, minus_grad = negated(alpha.numpy())
            assert minus_value == pytest.approx(-float(value), abs=1e-12)
            np.testing.assert_allclose(minus_grad, -grad[0].numpy(), atol=1e-12)


def test_typical_small_problems_converge_without_warning(gen):
    """k = 4 on 100 x 100 (the asv problem's shape): no ConvergenceWarning by default; converged
    means the objective rose by <= 1e-6 relatively over the last 10 iterations (info["gain"]),
    and a run cut short is flagged, with its gain above that."""
    for _ in range(4):
        x, y = clouds(100, 100, 2, gen, shift=1.0)
        C = sqdist(x, y * 0.9)
        a, b = simplex(100, gen), simplex(100, gen)
        gamma = 0.1 * float(C.mean())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            res = otcore.sparse_ot(C, a, b, k=4, gamma=gamma)
        assert bool(res.converged) and float(res.info["gain"]) <= 1e-6
        regul = ot.smooth.SparsityConstrained(max_nz=4, gamma=gamma)
        values = [_quiet(ot.smooth.semi_dual_obj_grad, f.numpy(), a.numpy(), b.numpy(), C.numpy(), regul)[0]
                  for f in (res.f, otcore.sparse_ot(C, a, b, k=4, gamma=gamma, max_iter=2000).f)]
        assert values[1] - values[0] <= 1e-4 * abs(values[0])  # a run 4x longer gains little
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = otcore.sparse_ot(C, a, b, k=4, gamma=gamma, max_iter=5)
    assert [w.category for w in caught] == [otcore.ConvergenceWarning]
    assert not bool(res.converged) and float(res.info["gain"]) > 1e-6
