"""Sinkhorn against POT's log-domain solver, EMD, closed forms and its own invariances."""

import numpy as np
import ot
import pytest
import torch
from conftest import F64, clouds, simplex, sqdist, xlogy_kl

import otcore


def pot_plan(a, b, C, eps):
    return ot.sinkhorn(a.numpy(), b.numpy(), C.numpy(), eps, method="sinkhorn_log", stopThr=1e-15,
                       numItermax=200_000)


@pytest.mark.parametrize("rel_eps", [1.0, 0.1, 0.01])
def test_plan_matches_pot_sinkhorn_log(gen, rel_eps):
    x, y = clouds(40, 30, 2, gen)
    C = sqdist(x, y)
    a, b = simplex(40, gen), simplex(30, gen)
    eps = rel_eps * float(C.max())
    res = otcore.sinkhorn(C, a, b, eps=eps, tol=1e-13, max_iter=100_000)
    P = torch.from_numpy(pot_plan(a, b, C, eps))
    assert bool(res.converged)
    assert (res.plan - P).abs().sum() <= 1e-8
    torch.testing.assert_close(res.transport_cost, (P * C).sum(), rtol=1e-9, atol=0)
    # value = <P, C> + eps KL(P || a x b), from the plan itself
    primal = (res.plan * C).sum() + eps * xlogy_kl(res.plan, a[:, None] * b[None])
    torch.testing.assert_close(res.value, primal, rtol=1e-10, atol=1e-12)
    assert float(res.marginal_error) <= 1e-12


def test_transport_cost_tends_to_emd(gen):
    x, y = clouds(30, 30, 2, gen)
    C = sqdist(x, y)
    a, b = simplex(30, gen), simplex(30, gen)
    exact = ot.emd2(a.numpy(), b.numpy(), C.numpy())
    gaps = []
    for rel in (1e-1, 1e-2, 3e-3):
        res = otcore.sinkhorn(C, a, b, eps=rel * float(C.max()), tol=1e-10, max_iter=200_000)
        gaps.append(float(res.transport_cost) - exact)
    assert gaps[0] > gaps[1] > gaps[2] > -1e-9
    assert gaps[2] < 2e-2 * exact


def test_unbalanced_matches_pot(gen):
    C = torch.rand(25, 20, generator=gen, dtype=F64)
    a, b = simplex(25, gen), 2 * simplex(20, gen)
    eps, rho = 0.1, 0.5
    tau = rho / (rho + eps)
    res = otcore.sinkhorn(C, a, b, eps=eps, tau_a=tau, tau_b=tau, tol=1e-13, max_iter=50_000)
    P = torch.from_numpy(ot.unbalanced.sinkhorn_unbalanced(
        a.numpy(), b.numpy(), C.numpy(), eps, rho, reg_type="kl", stopThr=1e-15, numItermax=200_000))
    assert (res.plan - P).abs().sum() <= 1e-9
    Pt = res.plan
    primal = ((Pt * C).sum() + eps * xlogy_kl(Pt, a[:, None] * b[None])
              + rho * xlogy_kl(Pt.sum(1), a) + rho * xlogy_kl(Pt.sum(0), b))
    torch.testing.assert_close(res.value, primal, rtol=1e-9, atol=1e-12)


def test_batched_equals_one_by_one(gen):
    B, n, m = 4, 20, 15
    x = torch.randn(B, n, 2, generator=gen, dtype=F64)
    y = torch.randn(B, m, 2, generator=gen, dtype=F64) * torch.linspace(0.3, 3, B, dtype=F64)[:, None, None]
    a = torch.stack([simplex(n, gen) for _ in range(B)])
    b = torch.stack([simplex(m, gen) for _ in range(B)])
    batch = otcore.sinkhorn(otcore.PointCloud(x, y), a, b, eps=0.05, tol=1e-10, max_iter=20_000)
    iters = set()
    for k in range(B):
        one = otcore.sinkhorn(otcore.PointCloud(x[k], y[k]), a[k], b[k], eps=0.05, tol=1e-10, max_iter=20_000)
        torch.testing.assert_close(batch.plan[k], one.plan, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(batch.value[k], one.value, rtol=1e-12, atol=1e-14)
        assert int(batch.n_iter[k]) == int(one.n_iter)
        iters.add(int(one.n_iter))
    assert len(iters) > 1  # the problems converged at different iterations


def test_point_cloud_equals_cost_matrix_and_uniform_default(gen):
    x, y = clouds(33, 21, 3, gen)
    pc = otcore.sinkhorn(otcore.PointCloud(x, y), eps=0.1, tol=1e-12)
    cm = otcore.sinkhorn(sqdist(x, y), torch.full((33,), 1 / 33, dtype=F64), torch.full((21,), 1 / 21, dtype=F64),
                         eps=0.1, tol=1e-12)
    torch.testing.assert_close(pc.plan, cm.plan, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(pc.transport_cost, cm.transport_cost, rtol=1e-12, atol=0)


def test_apply_equals_plan_products(gen):
    x, y = clouds(19, 23, 2, gen)
    res = otcore.sinkhorn(otcore.PointCloud(x, y), eps=0.2, tol=1e-10)
    v = torch.randn(23, 3, dtype=F64)
    u = torch.randn(19, dtype=F64)
    torch.testing.assert_close(res.apply(v), res.plan @ v, rtol=1e-11, atol=1e-14)
    torch.testing.assert_close(res.apply(u, transpose=True), res.plan.T @ u, rtol=1e-11, atol=1e-14)
    with pytest.raises(ValueError, match="v"):
        res.apply(torch.ones(5))


def test_zero_weights_give_exact_zero_rows(gen):
    C = torch.rand(12, 9, generator=gen, dtype=F64)
    a, b = simplex(12, gen, zeros=3), simplex(9, gen, zeros=2)
    res = otcore.sinkhorn(C, a, b, eps=0.05, tol=1e-12, max_iter=50_000)
    P = res.plan
    assert bool(torch.isfinite(P).all()) and bool(torch.isfinite(res.f).all())
    assert bool((P[:3] == 0).all()) and bool((P[:, :2] == 0).all())
    ref = torch.from_numpy(pot_plan(a[3:], b[2:], C[3:, 2:], 0.05))
    assert (P[3:, 2:] - ref).abs().sum() <= 1e-8


def test_float32_small_eps_is_finite_and_converges_or_warns(gen):
    x, y = clouds(200, 180, 2, gen, dtype=torch.float32)
    C = sqdist(x, y)
    eps = 1e-4 * float(C.max())
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = otcore.sinkhorn(C, eps=eps, max_iter=3000, eps_scaling=0.9)
    assert res.f.dtype == torch.float32
    assert bool(torch.isfinite(res.f).all()) and bool(torch.isfinite(res.g).all())
    assert bool(torch.isfinite(res.plan).all()) and bool(torch.isfinite(res.value))
    n_warn = sum(issubclass(w.category, otcore.ConvergenceWarning) for w in caught)
    assert (bool(res.converged) and n_warn == 0) or (not bool(res.converged) and n_warn == 1)
    # annealed to eps = 1e-4 x max cost, the transport cost is the exact one to 1e-3
    exact = ot.emd2(np.full(200, 1 / 200), np.full(180, 1 / 180), C.double().numpy())
    assert abs(float(res.transport_cost) - exact) <= 1e-3 * exact


def test_bfloat16_inputs_are_computed_in_float32(gen):
    x, y = clouds(30, 30, 2, gen)
    ref = otcore.sinkhorn(otcore.PointCloud(x, y), eps=1.0, tol=1e-10)
    res = otcore.sinkhorn(otcore.PointCloud(x.bfloat16(), y.bfloat16()), eps=1.0)
    assert res.f.dtype == torch.bfloat16
    rel = (res.plan.double() - ref.plan).norm() / ref.plan.norm()
    assert rel < 5e-2


def test_warm_start_and_eps_scaling_reach_the_same_plan(gen):
    x, y = clouds(40, 40, 2, gen)
    C = sqdist(x, y)
    eps = 1e-2 * float(C.max())
    cold = otcore.sinkhorn(C, eps=eps, tol=1e-11, max_iter=50_000)
    annealed = otcore.sinkhorn(C, eps=eps, tol=1e-11, max_iter=50_000, eps_scaling=0.7)
    warm = otcore.sinkhorn(C, eps=eps, tol=1e-11, max_iter=50_000, init=(cold.f, cold.g))
    for other in (annealed, warm):
        assert (other.plan - cold.plan).abs().sum() <= 1e-9
    assert int(warm.n_iter) <= 2 < int(cold.n_iter)


def test_callback_sees_decreasing_error_every_k_iterations(gen):
    C = torch.rand(20, 20, generator=gen, dtype=F64)
    seen = []
    res = otcore.sinkhorn(C, eps=0.02, tol=1e-10, max_iter=5000, check_every=5, callback=seen.append)
    assert [p.iteration for p in seen] == list(range(5, 5 * len(seen) + 1, 5))
    errors = [float(p.error.max()) for p in seen[1:]]
    assert errors[-1] <= 1e-10 < errors[0]
    assert int(res.n_iter) <= seen[-1].iteration


def test_max_iter_warns_once_and_flags(gen):
    C = torch.rand(2, 30, 30, generator=gen, dtype=F64)
    with pytest.warns(otcore.ConvergenceWarning) as record:
        res = otcore.sinkhorn(C, eps=1e-3, max_iter=5, tol=1e-12)
    assert len(record) == 1
    assert not bool(res.converged.any())
    assert res.n_iter.tolist() == [5, 5]
    assert bool((res.marginal_error > 1e-12).all())


def test_warn_false_silences(gen):
    import warnings

    C = torch.rand(10, 10, generator=gen, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = otcore.sinkhorn(C, eps=1e-3, max_iter=3, warn=False)
    assert not bool(res.converged)


def test_verbose_prints_and_callback_is_still_called(gen, capsys):
    C = torch.rand(10, 10, generator=gen, dtype=F64)
    seen = []
    otcore.sinkhorn(C, eps=0.5, tol=1e-10, callback=seen.append, verbose=True)
    assert seen and "max error" in capsys.readouterr().out


def test_result_is_frozen_and_keyword_only(gen):
    import dataclasses

    res = otcore.sinkhorn(torch.rand(4, 3, generator=gen, dtype=F64), eps=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.f = res.g
    with pytest.raises(TypeError):
        otcore.OTResult(res.f, res.g, res.value, res.n_iter, res.converged, res.operator)
    rebuilt = dataclasses.replace(res, info={"note": 1})
    assert rebuilt.value is res.value and rebuilt.info == {"note": 1}


def test_divergence_rejects_unknown_options_by_its_own_name():
    x = torch.randn(5, 2, dtype=F64)
    with pytest.raises(TypeError, match="sinkhorn_divergence"):
        otcore.sinkhorn_divergence(x, x + 1, eps=0.1, tau_a=0.5)


def test_rho_is_pots_reg_m(gen):
    """rho_a, rho_b: POT's reg_m (KL penalty strength), each side its own, inf a hard constraint."""
    C = torch.rand(25, 20, generator=gen, dtype=F64)
    a, b = simplex(25, gen), 2 * simplex(20, gen)
    res = otcore.sinkhorn(C, a, b, eps=0.1, rho_a=0.5, rho_b=2.0, tol=1e-13, max_iter=50_000)
    P = torch.from_numpy(ot.unbalanced.sinkhorn_unbalanced(
        a.numpy(), b.numpy(), C.numpy(), 0.1, (0.5, 2.0), reg_type="kl", stopThr=1e-15, numItermax=200_000))
    assert (res.plan - P).abs().sum() <= 1e-9
    b_equal = b / 2
    hard = otcore.sinkhorn(C, a, b_equal, eps=0.1, rho_a=float("inf"), rho_b=float("inf"), tol=1e-12)
    torch.testing.assert_close(hard.plan, otcore.sinkhorn(C, a, b_equal, eps=0.1, tol=1e-12).plan, rtol=0, atol=0)
    for kwargs, match in (({"rho_a": 0.0}, "rho_a must be > 0"), ({"rho_b": "x"}, "rho_b must be"),
                          ({"rho_a": 1.0, "tau_a": 0.5}, "give tau_a or rho_a, not both")):
        with pytest.raises(ValueError, match=match):
            otcore.sinkhorn(C, a, b, eps=0.1, **kwargs)
