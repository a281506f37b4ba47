"""otcore.nn.SinkhornLoss: the divergence (or OT_eps value) as a module, warm-started across calls."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch
from conftest import F64, clouds, simplex, sqdist

import otcore
from otcore.losses import divergence
from otcore.solvers.entropic import scaling_loop


def _ot_eps_pot(x, y, a, b, eps):
    """OT_eps = <P, C> + eps KL(P || a x b) from POT's float64 log-domain plan."""
    C = sqdist(x, y).detach().double().numpy()
    a, b = a.double().numpy(), b.double().numpy()
    P = ot.sinkhorn(a, b, C, eps, method="sinkhorn_log", stopThr=1e-13, numItermax=100_000)
    positive = P > 0
    kl = (P[positive] * np.log(P[positive] / np.outer(a, b)[positive])).sum() - P.sum() + a.sum() * b.sum()
    return float((P * C).sum() + eps * kl)


@pytest.fixture
def iterations(monkeypatch):
    """The iterations each divergence solve ran, in call order."""
    runs = []
    loop, scaling_solves = divergence.fixed_point_loop, divergence._scaling_solves

    def recorded(*args, **kwargs):
        outcome = loop(*args, **kwargs)
        runs.append(int(outcome.n_iter.max()))
        return outcome

    def recorded_scaling(*args, **kwargs):  # the scaling iterations (CPU, dense enough)
        outcome, finished = scaling_solves(*args, **kwargs)
        runs.append(int(outcome.n_iter.max()))
        return outcome, finished

    monkeypatch.setattr(divergence, "fixed_point_loop", recorded)
    monkeypatch.setattr(divergence, "_scaling_solves", recorded_scaling)
    return runs


def test_debiased_loss_is_the_divergence_of_pots_three_problems(gen):
    x, y = clouds(30, 25, 2, gen)
    a, b = simplex(30, gen), simplex(25, gen)
    loss = otcore.nn.SinkhornLoss(eps=0.5, tol=1e-11)
    expected = _ot_eps_pot(x, y, a, b, 0.5) - 0.5 * _ot_eps_pot(x, x, a, a, 0.5) - 0.5 * _ot_eps_pot(y, y, b, b, 0.5)
    for _ in range(2):  # cold, then warm from its own optimum
        assert abs(float(loss(x, y, a, b)) - expected) <= 1e-9


def test_plain_loss_is_the_entropic_ot_value(gen):
    x, y = clouds(20, 15, 3, gen)
    a, b = simplex(20, gen), simplex(15, gen)
    value = otcore.nn.SinkhornLoss(eps=0.3, debias=False, tol=1e-11)(x, y, a, b)
    assert abs(float(value) - _ot_eps_pot(x, y, a, b, 0.3)) <= 1e-9


def test_warm_start_cuts_iterations_and_keeps_value_and_gradient(gen, iterations):
    """A training-like sequence: x moves a little between calls. The warm-started loss matches the
    cold divergence (value and gradient) at every step, with fewer iterations."""
    x, y = clouds(40, 35, 2, gen)
    loss = otcore.nn.SinkhornLoss(eps=0.05, tol=1e-10, max_iter=20_000)
    step = 1e-3 * torch.randn(40, 2, generator=gen, dtype=F64)
    warm_runs, cold_runs = [], []
    for t in range(4):
        xt = (x + t * step).requires_grad_()
        value = loss(xt, y)
        (grad,) = torch.autograd.grad(value, xt)
        warm_runs.append(iterations[-1])
        xc = (x + t * step).requires_grad_()
        cold = otcore.sinkhorn_divergence(xc, y, eps=0.05, tol=1e-10, max_iter=20_000)
        (grad_cold,) = torch.autograd.grad(cold, xc)
        cold_runs.append(iterations[-1])
        torch.testing.assert_close(value, cold, rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(grad, grad_cold, rtol=1e-6, atol=1e-9)
    assert warm_runs[0] == cold_runs[0]
    assert max(warm_runs[1:]) < 0.7 * min(cold_runs[1:])  # linear convergence: log(start error / tol)


@pytest.mark.parametrize("warm", [True, False])
def test_a_start_far_from_the_optimum_goes_through_coarser_eps(gen, iterations, monkeypatch, warm):
    """A cold start, or a warm one after a large move, is far from the optimum at small eps: the
    coarse-to-fine ladder (``scaling_loop.LADDER``) reaches the divergence (tol 1e-4; a reference
    at tol 1e-6) in fewer iterations than the direct solve, all its stages' iterations counted."""
    x, y = clouds(80, 80, 2, gen)
    moved = x + 0.1 * (y.mean(0) - x)  # every point a tenth of the way to y's mean

    def solve():
        loss = otcore.nn.SinkhornLoss(eps=0.02, tol=1e-4, max_iter=20_000)
        if warm:
            loss(x, y)
        return float(loss(moved, y)), iterations[-1]

    reference = float(otcore.sinkhorn_divergence(moved, y, eps=0.02, tol=1e-6, max_iter=100_000))
    value, laddered = solve()
    monkeypatch.setattr(scaling_loop, "LADDER_TOL", 0.0)  # no tol is below it: the direct solve
    value_direct, direct = solve()
    for v in (value, value_direct):
        assert abs(v - reference) <= 1e-5 * abs(reference)
    assert laddered < 0.7 * direct


def test_the_ladders_stages_are_over_relaxed(gen, monkeypatch):
    """Each coarse stage measures its own omega and reaches ``LADDER_TOL`` in fewer iterations
    than the same stage run plain from the same start."""
    x, y = clouds(80, 80, 2, gen)
    stages, run = [], scaling_loop.run_scaling_loop

    def recorded(kernel, a, b, f, g, *, max_iter, tol, factor=None):
        outcome, finished = run(kernel, a, b, f, g, max_iter=max_iter, tol=tol, factor=factor)
        if tol == scaling_loop.LADDER_TOL:  # a coarse stage: run it again, plain
            plain, _ = run(kernel, a, b, f, g, max_iter=max_iter, tol=tol)
            stages.append((kernel.eps, factor.omega, int(outcome.n_iter), int(plain.n_iter), bool(plain.converged)))
        return outcome, finished

    monkeypatch.setattr(scaling_loop, "run_scaling_loop", recorded)
    otcore.sinkhorn_divergence(x, y, eps=0.02, tol=1e-4, max_iter=20_000)
    assert [eps for eps, *_ in stages] == [pytest.approx(0.02 * r) for r in scaling_loop.LADDER]
    for _, omega, relaxed, plain, converged in stages:
        assert omega is not None and float(omega) > 1.2 and converged and relaxed < plain


def test_tol_zero_takes_no_ladder(gen, iterations, monkeypatch):
    """``tol=0`` (no stopping test) runs exactly ``max_iter`` iterations at eps: the same
    divergence as with the ladder switched off."""
    x, y = clouds(80, 80, 2, gen)
    value = otcore.sinkhorn_divergence(x, y, eps=0.02, tol=0, max_iter=300)
    assert iterations[-1] == 300
    monkeypatch.setattr(scaling_loop, "LADDER_TOL", 0.0)
    torch.testing.assert_close(value, otcore.sinkhorn_divergence(x, y, eps=0.02, tol=0, max_iter=300), rtol=0, atol=0)


def test_the_ladder_treats_each_problem_of_a_batch_on_its_own(gen):
    """A batch of a far problem (shifted clouds, small eps) and a near one (nearly identical
    clouds): each problem's divergence is the one it has solved alone, to the last digits."""
    x, y = clouds(80, 80, 2, gen)
    near = x + 0.02 * torch.randn(x.shape, generator=gen, dtype=F64)
    xs, ys = torch.stack((x, x)), torch.stack((y, near))
    batched = otcore.sinkhorn_divergence(xs, ys, eps=0.02, tol=1e-4, max_iter=20_000)
    for k in range(2):
        alone = otcore.sinkhorn_divergence(xs[k], ys[k], eps=0.02, tol=1e-4, max_iter=20_000)
        torch.testing.assert_close(batched[k], alone, rtol=1e-10, atol=0.0)


def test_reset_and_new_shapes_start_cold(gen, iterations):
    x, y = clouds(25, 20, 2, gen)
    loss = otcore.nn.SinkhornLoss(eps=0.05, tol=1e-9)
    loss(x, y)
    cold = iterations[-1]
    loss(x, y)
    assert iterations[-1] < cold  # warm: already at the optimum
    loss.reset()
    loss(x, y)
    assert iterations[-1] == cold
    loss(x[:24], y)  # other shapes: no stored start applies, and nothing fails
    assert iterations[-1] > 2


def test_bad_options_raise_value_errors():
    for kwargs, name in (({"eps": 0.0}, "eps"), ({"eps": 0.1, "max_iter": 0}, "max_iter"),
                         ({"eps": 0.1, "eps_scaling": 1.5}, "eps_scaling")):
        with pytest.raises(ValueError, match=name):
            otcore.nn.SinkhornLoss(**kwargs)
