"""Adaptive over-relaxation of Sinkhorn's row updates: the same fixed point as plain Sinkhorn (and
POT), fewer iterations where Sinkhorn is slow, zero-weight rows exact, omega from the measured
contraction factor (Young's formula) and its safeguard."""

import math

import ot
import torch
from conftest import F64, clouds, simplex, sqdist

import otcore
from otcore.solvers.entropic import overrelaxation
from otcore.solvers.entropic.overrelaxation import Overrelaxation


def test_omega_follows_youngs_formula_and_backs_off_when_the_error_climbs():
    theta = torch.tensor([0.99, 0.5, 1.2], dtype=F64)  # slow, fast, not contracting
    relax = Overrelaxation()
    for k in range(overrelaxation.WINDOW):
        relax.observe(theta**k, theta, theta)
    assert relax.factor.omega is not None
    expected = [min(overrelaxation.CAP, 2 / (1 + math.sqrt(1 - t))) for t in (0.99, 0.5)] + [1.0]
    torch.testing.assert_close(relax.factor.omega.squeeze(-1), torch.tensor(expected, dtype=F64))
    best = theta ** (overrelaxation.WINDOW - 1)
    climb = best * torch.tensor([2 * overrelaxation.BLOWUP, 1.0, 1.0], dtype=F64)
    relax.observe(climb, theta, theta)  # the first problem climbs
    torch.testing.assert_close(relax.factor.omega.squeeze(-1), torch.tensor([1 + (expected[0] - 1) / 2, *expected[1:]],
                                                                     dtype=F64))


def test_a_restarted_problem_is_measured_afresh_from_plain_iterations_and_the_others_keep_omega():
    from otcore.solvers.entropic.overrelaxation import RelaxationFactor

    window = overrelaxation.WINDOW

    def young(t):
        return min(overrelaxation.CAP, 2 / (1 + math.sqrt(1 - t)))

    factor = RelaxationFactor()
    first = torch.tensor([0.9, 0.5], dtype=F64)
    for k in range(1, window + 1):
        factor.observe(k, first**k, lambda: (first, first))
    torch.testing.assert_close(factor.omega.squeeze(-1), torch.tensor([young(0.9), young(0.5)], dtype=F64))
    factor.restart(torch.tensor([True, False]))
    torch.testing.assert_close(factor.omega.squeeze(-1), torch.tensor([1.0, young(0.5)], dtype=F64))  # plain
    second = torch.tensor([0.99, 0.95], dtype=F64)  # a new start: iterations counted from 1 again
    for k in range(1, window + 1):
        factor.observe(k, second**k, lambda: (second, second))
    torch.testing.assert_close(factor.omega.squeeze(-1), torch.tensor([young(0.99), young(0.5)], dtype=F64))


def test_same_solution_as_pot_in_fewer_iterations(gen):
    x, y = clouds(60, 50, 2, gen)
    a, b = simplex(60, gen), simplex(50, gen)
    C = sqdist(x, y)
    eps = 0.001 * float(C.max())
    options = {"eps": eps, "tol": 1e-10, "max_iter": 50_000, "domain": "log"}
    relaxed = otcore.sinkhorn(C, a, b, **options)
    plain = otcore.sinkhorn(C, a, b, overrelax=False, **options)
    P = ot.sinkhorn(a.numpy(), b.numpy(), C.numpy(), eps, method="sinkhorn_log", stopThr=1e-13, numItermax=200_000)
    torch.testing.assert_close(relaxed.plan, torch.from_numpy(P), rtol=0, atol=1e-9)
    torch.testing.assert_close(relaxed.value, plain.value, rtol=1e-10, atol=0)
    assert bool(relaxed.converged) and int(relaxed.n_iter) < 0.7 * int(plain.n_iter)


def test_zero_weight_rows_keep_their_exact_c_transform(gen):
    x, y = clouds(30, 20, 2, gen)
    a, b = simplex(30, gen, zeros=4), simplex(20, gen)
    C = sqdist(x, y)
    eps = 0.02 * float(C.max())
    res = otcore.sinkhorn(C, a, b, eps=eps, tol=1e-10, max_iter=20_000, domain="log")
    assert int(res.n_iter) > overrelaxation.WINDOW  # relaxation was on
    c_transform = -eps * torch.logsumexp((res.g[None] - C) / eps + b.log()[None], dim=1)
    torch.testing.assert_close(res.f[:4], c_transform[:4], rtol=0, atol=1e-12)


def test_a_batch_relaxes_each_problem_by_its_own_factor(gen):
    x = torch.randn(2, 40, 2, generator=gen, dtype=F64)
    y = torch.randn(2, 40, 2, generator=gen, dtype=F64) + 1
    C = sqdist(x, y)
    C[1] = C[1] * 0.05  # the second problem at a 20 times larger relative eps: fast, little to relax
    options = {"eps": 0.3, "tol": 1e-10, "max_iter": 20_000, "domain": "log"}
    batch = otcore.sinkhorn(C, **options)
    for k in range(2):
        alone = otcore.sinkhorn(C[k], **options)
        torch.testing.assert_close(batch.value[k], alone.value, rtol=1e-12, atol=0)
        assert int(batch.n_iter[k]) == int(alone.n_iter)
