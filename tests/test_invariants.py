"""Property-based tests (hypothesis) of the invariants of the entropic solvers, public API only.

Each test draws small float64 problems (2 to 12 points a side, eps between 0.15 and 2 times the
cost scale) from an integer seed and checks a property that holds whatever the data:
marginals at convergence, the gauge of a constant cost shift, transposition symmetry, batching,
permutation equivariance, zero weights, and the Sinkhorn divergence's sign, symmetry, zero on
equal measures and translation invariance. ``ConvergenceWarning`` is an error in this suite, so
every solve below must also converge.

Why eps >= 0.15 x the cost scale: Sinkhorn converges at the rate 1 - O(exp(-range(C) / eps)).
A 2 x 2 problem with uniform weights whose plan is nearly a permutation is the worst case: at
eps = 0.05 x max C it needs ~1e5 iterations to reach tol = 1e-11 (POT's ``sinkhorn_log`` needs
as many), at 0.15 a few thousand at most.

Convention: ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``.
"""

import torch
from conftest import F64, clouds, simplex, sqdist
from hypothesis import given, settings
from hypothesis import strategies as st

import otcore

TOL = 1e-11
MAX_ITER = 20_000
PROPERTY = settings(max_examples=25, deadline=None)

seeds = st.integers(0, 2**31 - 1)
sizes = st.integers(2, 12)
rel_eps = st.floats(0.15, 2.0)  # eps / cost scale (see the module docstring for the lower bound)
scales = st.floats(0.1, 10.0)


def solve(C, a, b, eps, **kw):
    return otcore.sinkhorn(C, a, b, eps=eps, tol=TOL, max_iter=MAX_ITER, **kw)


def weights(k: int, gen: torch.Generator, zeros: int = 0) -> torch.Tensor:
    """``simplex`` weights with ``zeros`` zero entries at random positions."""
    return simplex(k, gen, zeros=zeros)[torch.randperm(k, generator=gen)]


@st.composite
def problems(draw, max_zeros: int = 0):
    """(C, a, b, eps): a random (n, m) cost of scale ``scale`` and weights with up to ``max_zeros`` zeros."""
    gen = torch.Generator().manual_seed(draw(seeds))
    n, m = draw(sizes), draw(sizes)
    scale = draw(scales)
    if draw(st.booleans()):  # uniform entries
        C = scale * torch.rand(n, m, generator=gen, dtype=F64)
    else:  # squared distances between clouds, largest = scale
        x, y = clouds(n, m, draw(st.integers(1, 3)), gen)
        C = sqdist(x, y)
        C = scale * C / C.max()
    za = draw(st.integers(0, min(max_zeros, n - 1)))
    zb = draw(st.integers(0, min(max_zeros, m - 1)))
    a, b = weights(n, gen, za), weights(m, gen, zb)
    return C, a, b, draw(rel_eps) * scale


def assert_constant(d: torch.Tensor, atol: float) -> None:
    assert float((d - d.mean()).abs().max()) <= atol, d - d.mean()


@PROPERTY
@given(problems(max_zeros=3))
def test_marginals_at_convergence(problem):
    C, a, b, eps = problem
    res = solve(C, a, b, eps)
    assert bool(res.converged)
    assert 1 <= int(res.n_iter) < MAX_ITER
    assert float(res.marginal_error) <= TOL
    P = res.plan
    assert bool((P >= 0).all())
    torch.testing.assert_close(P.sum(-1), a, rtol=0, atol=1e-9)
    torch.testing.assert_close(P.sum(-2), b, rtol=0, atol=1e-9)
    # the dual value is the primal objective <P, C> + eps KL(P || a x b) at convergence
    ab = a[:, None] * b[None]
    primal = (P * C).sum() + eps * (torch.special.xlogy(P, P) - torch.special.xlogy(P, ab) - P + ab).sum()
    torch.testing.assert_close(res.value, primal, rtol=1e-9, atol=1e-9 * float(C.max()))


@PROPERTY
@given(problems(max_zeros=2), st.floats(-3.0, 3.0))
def test_constant_cost_shift_moves_value_only(problem, rel_shift):
    C, a, b, eps = problem
    t = rel_shift * float(C.max())
    res, shifted = solve(C, a, b, eps), solve(C + t, a, b, eps)
    torch.testing.assert_close(shifted.plan, res.plan, rtol=0, atol=1e-9)
    torch.testing.assert_close(shifted.value, res.value + t, rtol=0, atol=1e-9 * (float(C.max()) + abs(t)))


@PROPERTY
@given(problems(max_zeros=2))
def test_transposed_problem_has_transposed_solution(problem):
    C, a, b, eps = problem
    res, tr = solve(C, a, b, eps), solve(C.T, b, a, eps)
    torch.testing.assert_close(tr.plan, res.plan.T, rtol=0, atol=1e-9)
    torch.testing.assert_close(tr.value, res.value, rtol=1e-9, atol=1e-9 * float(C.max()))
    # swapped potentials up to the gauge (f + s, g - s), on the points of positive weight (see
    # test_zero_weight_row_potential_is_a_c_transform for the others)
    ia, ib = a > 0, b > 0
    s = (tr.f - res.g)[ib]
    assert_constant(s, atol=1e-7 * eps)
    torch.testing.assert_close(tr.g[ia], res.f[ia] - s.mean(), rtol=0, atol=1e-7 * eps)


@settings(max_examples=15, deadline=None)
@given(seeds, sizes, sizes, scales, rel_eps)
def test_batch_equals_one_by_one(seed, n, m, scale, rel):
    gen = torch.Generator().manual_seed(seed)
    B = 3
    powers = torch.tensor([1.0, 2.0, 0.5], dtype=F64)[:, None, None]  # differently shaped costs
    C = scale * torch.rand(B, n, m, generator=gen, dtype=F64) ** powers
    a = torch.stack([weights(n, gen, k % 2) for k in range(B)])  # zero weights in some problems
    b = torch.stack([weights(m, gen, (k + 1) % 2) for k in range(B)])
    eps = rel * scale
    batch = solve(C, a, b, eps)
    assert batch.plan.shape == (B, n, m) and batch.value.shape == (B,) and batch.f.shape == (B, n)
    assert bool(batch.converged.all())
    for k in range(B):
        one = solve(C[k], a[k], b[k], eps)
        torch.testing.assert_close(batch.plan[k], one.plan, rtol=0, atol=1e-10)
        torch.testing.assert_close(batch.value[k], one.value, rtol=1e-10, atol=1e-10 * scale)
        torch.testing.assert_close(batch.f[k], one.f, rtol=0, atol=1e-9 * eps)
        torch.testing.assert_close(batch.g[k], one.g, rtol=0, atol=1e-9 * eps)
        assert int(batch.n_iter[k]) == int(one.n_iter)


@PROPERTY
@given(problems(max_zeros=2), seeds)
def test_permutation_equivariance(problem, perm_seed):
    C, a, b, eps = problem
    n, m = C.shape
    gen = torch.Generator().manual_seed(perm_seed)
    p, q = torch.randperm(n, generator=gen), torch.randperm(m, generator=gen)
    res = solve(C, a, b, eps)
    rows = solve(C[p], a[p], b, eps)  # rows only
    torch.testing.assert_close(rows.plan, res.plan[p], rtol=0, atol=1e-10)
    torch.testing.assert_close(rows.f, res.f[p], rtol=0, atol=1e-9 * eps)
    torch.testing.assert_close(rows.g, res.g, rtol=0, atol=1e-9 * eps)
    both = solve(C[p][:, q], a[p], b[q], eps)  # rows and columns
    torch.testing.assert_close(both.plan, res.plan[p][:, q], rtol=0, atol=1e-10)
    torch.testing.assert_close(both.f, res.f[p], rtol=0, atol=1e-9 * eps)
    torch.testing.assert_close(both.g, res.g[q], rtol=0, atol=1e-9 * eps)
    torch.testing.assert_close(both.value, res.value, rtol=1e-10, atol=1e-10 * float(C.max()))


@PROPERTY
@given(problems(max_zeros=4))
def test_zero_weights_give_zero_rows_and_columns(problem):
    C, a, b, eps = problem
    res = solve(C, a, b, eps)
    P = res.plan
    for t in (P, res.f, res.g, res.value, res.marginal_error):
        assert bool(torch.isfinite(t).all())
    assert bool((P[a == 0] == 0).all()) and bool((P[:, b == 0] == 0).all())
    # on the support, the plan of the problem without the zero-weight points
    ia, ib = a > 0, b > 0
    reduced = solve(C[ia][:, ib], a[ia], b[ib], eps)
    torch.testing.assert_close(P[ia][:, ib], reduced.plan, rtol=0, atol=1e-9)
    torch.testing.assert_close(res.value, reduced.value, rtol=1e-9, atol=1e-9 * float(C.max()))


def test_zero_weight_row_potential_is_a_c_transform():
    C = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=F64)
    a = torch.tensor([0.0, 1.0], dtype=F64, requires_grad=True)
    b = torch.tensor([0.5, 0.5], dtype=F64)
    res = solve(C, a, b, 1.0)
    res.value.backward()
    # moving mass h onto the zero-weight point changes the value at the rate softmin(C, g; b)_0 - f_1
    h = 1e-7
    moved = solve(C, torch.tensor([h, 1 - h], dtype=F64), b, 1.0).value
    slope = float((moved - res.value.detach()) / h)
    autograd = float(a.grad[0] - a.grad[1])
    assert abs(autograd - slope) <= 1e-5, f"autograd {autograd:.6f} vs finite difference {slope:.6f}"
    c_transform = -torch.logsumexp(torch.log(b) + res.g - C, dim=1)  # eps = 1
    torch.testing.assert_close(res.f, c_transform, rtol=0, atol=1e-10)


@st.composite
def cloud_pairs(draw):
    """(x, y, a, b, eps) with a, b None (uniform) or random weights."""
    gen = torch.Generator().manual_seed(draw(seeds))
    n, m, d = draw(sizes), draw(sizes), draw(st.integers(1, 3))
    x, y = clouds(n, m, d, gen, shift=draw(st.floats(0.0, 2.0)))
    a, b = (weights(n, gen), weights(m, gen)) if draw(st.booleans()) else (None, None)
    eps = draw(rel_eps) * float(sqdist(x, y).max())
    return x, y, a, b, eps


def divergence(x, y, a, b, eps):
    return otcore.sinkhorn_divergence(x, y, a, b, eps=eps, tol=TOL, max_iter=MAX_ITER)


@PROPERTY
@given(cloud_pairs(), st.lists(st.floats(-5.0, 5.0), min_size=3, max_size=3))
def test_divergence_sign_symmetry_and_translation(pair, shift):
    x, y, a, b, eps = pair
    scale = float(sqdist(x, y).max())
    S = divergence(x, y, a, b, eps)
    assert S.shape == () and S.dtype == F64
    assert float(S) >= -1e-10
    torch.testing.assert_close(divergence(y, x, b, a, eps), S, rtol=1e-9, atol=1e-10 * scale)
    v = torch.tensor(shift[: x.shape[1]], dtype=F64)
    torch.testing.assert_close(divergence(x + v, y + v, a, b, eps), S, rtol=1e-9, atol=1e-10 * scale)


@PROPERTY
@given(seeds, sizes, st.integers(1, 3), st.booleans(), rel_eps)
def test_divergence_vanishes_on_equal_measures(seed, n, d, uniform, rel):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=F64)
    a = None if uniform else weights(n, gen)
    scale = float(sqdist(x, x).max())
    eps = rel * scale
    assert abs(float(divergence(x, x, a, a, eps))) <= 1e-12
    assert abs(float(divergence(x, x.clone(), None if a is None else a.clone(), a, eps))) <= 1e-12
    # the same measure with its points listed in another order: S = 0 up to the solver's tolerance
    p = torch.randperm(n, generator=gen)
    assert abs(float(divergence(x, x[p], a, None if a is None else a[p], eps))) <= 1e-9 * scale
