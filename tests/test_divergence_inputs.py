"""Sinkhorn divergence on cost matrices and geometries, unbalanced (rho), and GeomLoss's spelling
(p, blur, reach, scaling) of ``SinkhornLoss``, against POT's solvers and Sejourne et al.'s formula."""

import ot
import pytest
import torch
from conftest import F64, clouds, simplex, sqdist

import otcore
from otcore.geometry import CostMatrix, PointCloud


def _kl(p, q):
    """Generalised KL(p || q) = sum p log(p / q) - |p| + |q|."""
    return (torch.special.xlogy(p, p) - torch.special.xlogy(p, q)).sum() - p.sum() + q.sum()


def pot_ot_eps(a, b, C, eps, rho=None):
    """OT_eps(a, b) (+ rho KL marginal penalties) from POT's plan: <P, C> + eps KL(P || a x b) (+ ...)."""
    if rho is None:
        P = ot.sinkhorn(a.numpy(), b.numpy(), C.numpy(), eps, method="sinkhorn_log", stopThr=1e-15,
                        numItermax=200_000)
    else:
        P = ot.unbalanced.sinkhorn_unbalanced(a.numpy(), b.numpy(), C.numpy(), eps, rho, method="sinkhorn",
                                              stopThr=1e-15, numItermax=200_000)
    P = torch.from_numpy(P)
    value = (P * C).sum() + eps * _kl(P.flatten(), torch.outer(a, b).flatten())
    if rho is not None:
        value = value + rho * (_kl(P.sum(1), a) + _kl(P.sum(0), b))
    return value


def pot_divergence(x, y, a, b, eps, rho=None, cost=sqdist):
    """Sejourne et al. 2019, Def. 6: OT(a, b) - OT(a, a)/2 - OT(b, b)/2 + eps/2 (|a| - |b|)^2."""
    value = (pot_ot_eps(a, b, cost(x, y), eps, rho) - 0.5 * pot_ot_eps(a, a, cost(x, x), eps, rho)
             - 0.5 * pot_ot_eps(b, b, cost(y, y), eps, rho))
    return value + 0.5 * eps * (a.sum() - b.sum()) ** 2


def distances(x, y):
    """|x - y| by explicit differences (torch.cdist's matrix-product form rounds differently)."""
    return sqdist(x, y).sqrt()


def _weights(n, m, gen, mass_a=1.0):
    return simplex(n, gen) * mass_a, simplex(m, gen)


def test_point_cloud_and_cost_matrices_give_the_divergence_of_points(gen):
    x, y = clouds(30, 25, 2, gen)
    a, b = _weights(30, 25, gen)
    for cost, matrix in (("sqeuclidean", sqdist), ("euclidean", distances)):
        expected = pot_divergence(x, y, a, b, 0.4, cost=matrix)
        options = {"eps": 0.4, "tol": 1e-13, "max_iter": 50_000}
        got_points = otcore.sinkhorn_divergence(x, y, a, b, cost=cost, **options)
        got_cloud = otcore.sinkhorn_divergence(PointCloud(x, y, cost=cost), a=a, b=b, **options)
        got_costs = otcore.sinkhorn_divergence(matrix(x, y), a=a, b=b, self_costs=(matrix(x, x), CostMatrix(matrix(y, y))),
                                               **options)
        for got in (got_points, got_cloud, got_costs):
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_gradient_in_the_cross_cost_matrix_is_pots_plan(gen):
    x, y = clouds(20, 15, 2, gen)
    a, b = _weights(20, 15, gen)
    C = sqdist(x, y).requires_grad_()
    s = otcore.sinkhorn_divergence(C, a=a, b=b, self_costs=(sqdist(x, x), sqdist(y, y)), eps=0.3, tol=1e-13,
                                   max_iter=50_000)
    (grad,) = torch.autograd.grad(s, C)
    plan = ot.sinkhorn(a.numpy(), b.numpy(), C.detach().numpy(), 0.3, method="sinkhorn_log", stopThr=1e-15,
                       numItermax=200_000)
    torch.testing.assert_close(grad, torch.from_numpy(plan), rtol=1e-7, atol=1e-12)


def test_batched_cost_matrices_match_one_problem_at_a_time(gen):
    x = torch.randn(2, 12, 2, generator=gen, dtype=F64)
    y = torch.randn(2, 10, 2, generator=gen, dtype=F64) + 1
    s = otcore.sinkhorn_divergence(sqdist(x, y), self_costs=(sqdist(x, x), sqdist(y, y)), eps=0.5, tol=1e-12)
    assert s.shape == (2,)
    for k in range(2):
        torch.testing.assert_close(s[k], pot_divergence(x[k], y[k], torch.full((12,), 1 / 12, dtype=F64),
                                                        torch.full((10,), 1 / 10, dtype=F64), 0.5),
                                   rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mass_a", [1.0, 1.4])
def test_unbalanced_divergence_matches_pot(gen, mass_a):
    x, y = clouds(25, 30, 2, gen)
    a, b = _weights(25, 30, gen, mass_a)
    expected = pot_divergence(x, y, a, b, 0.3, rho=0.8)
    got = otcore.sinkhorn_divergence(x, y, a, b, eps=0.3, rho=0.8, tol=1e-13, max_iter=50_000)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert float(got) > 0


def test_unbalanced_divergence_is_zero_on_identical_inputs_and_its_gradient_is_exact(gen):
    x, y = clouds(8, 7, 2, gen)
    a, b = _weights(8, 7, gen, 1.3)
    assert float(otcore.sinkhorn_divergence(x, x.clone(), a, a.clone(), eps=0.3, rho=0.5)) == 0.0

    def divergence(x, a):
        return otcore.sinkhorn_divergence(x, y, a, b, eps=0.5, rho=0.7, tol=1e-14, max_iter=100_000)

    torch.autograd.gradcheck(divergence, (x.clone().requires_grad_(), a.clone().requires_grad_()), atol=1e-7)


def test_geomloss_spelling_is_geomloss_problem(gen):
    """p = 2: cost |x - y|^2 / 2, eps = blur^2, rho = reach^2; p = 1: cost |x - y|, eps = blur, rho = reach."""
    x, y = clouds(20, 25, 2, gen)
    a, b = _weights(20, 25, gen, 1.2)
    for p, blur, reach in ((2, 0.5, 0.8), (1, 0.4, 1.5), (2, 0.6, None)):
        half = (lambda u, v: 0.5 * sqdist(u, v)) if p == 2 else distances
        wa = a if reach is not None else a / a.sum()
        expected = pot_divergence(x, y, wa, b, blur ** p, None if reach is None else reach ** p, cost=half)
        loss = otcore.nn.SinkhornLoss(p=p, blur=blur, reach=reach, tol=1e-13, max_iter=50_000)
        torch.testing.assert_close(loss(x, y, wa, b), expected, rtol=1e-9, atol=1e-12)
    # debias=False: GeomLoss's OT_eps alone, in its units
    biased = otcore.nn.SinkhornLoss(blur=0.5, debias=False, tol=1e-13, max_iter=50_000)(x, y, a / a.sum(), b)
    torch.testing.assert_close(biased, pot_ot_eps(a / a.sum(), b, 0.5 * sqdist(x, y), 0.25), rtol=1e-9, atol=1e-12)


def test_annealed_geomloss_loss_reaches_the_same_value(gen):
    x, y = clouds(20, 25, 2, gen)
    plain = otcore.nn.SinkhornLoss(p=2, blur=0.3, tol=1e-12, max_iter=50_000)(x, y)
    annealed = otcore.nn.SinkhornLoss(p=2, blur=0.3, scaling=0.7, tol=1e-12, max_iter=50_000)(x, y)
    torch.testing.assert_close(annealed, plain, rtol=1e-8, atol=1e-12)


def test_bad_inputs_raise_value_errors(gen):
    x, y = clouds(6, 5, 2, gen)
    Cxy, Cxx, Cyy = sqdist(x, y), sqdist(x, x), sqdist(y, y)
    asymmetric = Cxx.clone()
    asymmetric[0, 1] += 1.0
    cases = [
        (lambda: otcore.sinkhorn_divergence(x, eps=0.1), "y is missing"),
        (lambda: otcore.sinkhorn_divergence(PointCloud(x, y), y, eps=0.1), "leave y"),
        (lambda: otcore.sinkhorn_divergence(PointCloud(x, y), cost="euclidean", eps=0.1), "leave y, cost"),
        (lambda: otcore.sinkhorn_divergence(PointCloud(x, y), eps=0.1, self_costs=(Cxx, Cyy)), "self_costs"),
        (lambda: otcore.sinkhorn_divergence(CostMatrix(Cxy), eps=0.1), "self_costs"),
        (lambda: otcore.sinkhorn_divergence(Cxy, eps=0.1, self_costs=(Cxx,)), "pair"),
        (lambda: otcore.sinkhorn_divergence(Cxy, eps=0.1, self_costs=(Cyy, Cxx)), r"C_xx\) must have shape \(6, 6\)"),
        (lambda: otcore.sinkhorn_divergence(Cxy, eps=0.1, self_costs=(asymmetric, Cyy)), "symmetric"),
        (lambda: otcore.sinkhorn_divergence(x, y, eps=0.1, rho=0.0), "rho"),
        (lambda: otcore.sinkhorn_divergence(x, y, simplex(6, gen) * 2, eps=0.1), "mass"),
        (lambda: otcore.nn.SinkhornLoss(eps=0.1, blur=0.1), "eps or blur"),
        (lambda: otcore.nn.SinkhornLoss(blur=0.1, rho=1.0, reach=1.0), "rho or reach"),
        (lambda: otcore.nn.SinkhornLoss(blur=0.1, p=3), "p must be 1 or 2"),
        (lambda: otcore.nn.SinkhornLoss(p=2), "eps is missing"),
        (lambda: otcore.nn.SinkhornLoss(blur=0.1, cost="euclidean"), "cost"),
        (lambda: otcore.nn.SinkhornLoss(blur=0.1, scaling=1.5), "scaling"),
        (lambda: otcore.nn.SinkhornLoss(blur=-0.1), "blur"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
