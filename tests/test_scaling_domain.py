"""Scaling-domain Sinkhorn (stabilised kernel with absorption): the same fixed point as the log
domain and as POT, at eps where an unstabilised kernel over- or underflows, and chosen only
where it is safe."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch
from conftest import F64, clouds, simplex, sqdist

import otcore
from otcore._precision import exp_above_tiny_
from otcore.solvers.entropic import scaling
from otcore.solvers.entropic.scaling_loop import MAX_INTERVAL, _Schedule, least_interval


@pytest.fixture
def count_scaling_half_steps(monkeypatch):
    """A function giving the number of scaling-domain half-steps run since the last call."""
    kernels = []
    original = scaling.StabilisedKernel.__init__

    def recorded(self, *args, **kwargs):
        original(self, *args, **kwargs)
        kernels.append(self)

    monkeypatch.setattr(scaling.StabilisedKernel, "__init__", recorded)

    def count():
        total = sum(k.half_steps for k in kernels)
        kernels.clear()
        return total

    return count


def _pot_log_plan(C, a, b, eps):
    """POT's log-domain Sinkhorn plan in float64, to 1e-13."""
    return torch.from_numpy(ot.sinkhorn(a.double().numpy(), b.double().numpy(), C.double().numpy(), eps,
                                        method="sinkhorn_log", stopThr=1e-13, numItermax=200_000))


@pytest.mark.parametrize("tau", [1.0, 0.8])
@pytest.mark.parametrize("batch", [1, 3])
def test_scaling_and_log_domains_reach_the_same_potentials(gen, tau, batch, count_scaling_half_steps):
    x, y = clouds(40, 30, 2, gen)
    C = sqdist(x, y).expand(batch, 40, 30)
    a = torch.stack([simplex(40, gen) for _ in range(batch)])
    b = torch.stack([simplex(30, gen) for _ in range(batch)])
    a[:, 3] = 0.0  # a zero weight: its potential is still the softmin of g
    b = b * (a.sum(-1, keepdim=True) / b.sum(-1, keepdim=True))
    kwargs = {"eps": 0.02, "tau_a": tau, "tau_b": tau, "tol": 1e-11, "max_iter": 20_000}
    log = otcore.sinkhorn(C, a, b, domain="log", **kwargs)
    assert count_scaling_half_steps() == 0
    for domain in ("scaling", "auto"):
        res = otcore.sinkhorn(C, a, b, domain=domain, **kwargs)
        assert bool(res.converged.all()) and count_scaling_half_steps() >= 2 * int(res.n_iter.min())
        # the same potentials up to the gauge (f + c, g - c): over-relaxed paths may end at different c
        shift = (res.f - log.f).mean(-1, keepdim=True)
        torch.testing.assert_close(res.f - shift, log.f, rtol=0, atol=1e-9)
        torch.testing.assert_close(res.g + shift, log.g, rtol=0, atol=1e-9)
        torch.testing.assert_close(res.value, log.value, rtol=1e-12, atol=1e-12)
        # the scaling loop measures the error every k <= MAX_INTERVAL iterations: it stops at the first check
        # at or after the iteration the log domain stopped at
        assert bool((res.n_iter >= log.n_iter - 1).all() and (res.n_iter <= log.n_iter + MAX_INTERVAL).all())


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_small_eps_and_offset_costs_match_pots_log_domain(gen, dtype, count_scaling_half_steps):
    """exp(-C/eps) underflows everywhere at eps = 1e-3 (and overflows with 50 added to C): the
    absorbed kernel does not, and the plan is POT's log-domain one."""
    x, y = clouds(30, 25, 2, gen)
    x, y = 0.2 * x, 0.2 * y  # costs in [0, 1.3]
    a, b = simplex(30, gen), simplex(25, gen)
    for offset, eps in ((0.0, 1e-3), (50.0, 0.05)):
        C = sqdist(x, y) + offset
        res = otcore.sinkhorn(C.to(dtype), a.to(dtype), b.to(dtype), eps=eps, domain="scaling", max_iter=50_000,
                              tol=1e-12 if dtype == F64 else 1e-4)
        assert bool(res.converged) and count_scaling_half_steps() > 0
        reference = _pot_log_plan(C, a, b, eps)
        atol = 1e-9 if dtype == F64 else 2e-4
        assert float((res.plan.double() - reference).abs().sum()) <= atol


def test_a_far_warm_start_is_absorbed_and_converges(gen, count_scaling_half_steps):
    x, y = clouds(25, 20, 3, gen)
    C, a, b = sqdist(x, y), simplex(25, gen), simplex(20, gen)
    cold = otcore.sinkhorn(C, a, b, eps=0.05, tol=1e-10, domain="log")
    far = (cold.f + 40.0, cold.g - 25.0 + torch.linspace(-30, 30, 20, dtype=F64))  # exp(+-800) in the kernel
    warm = otcore.sinkhorn(C, a, b, eps=0.05, tol=1e-10, init=far, domain="scaling")
    assert bool(warm.converged) and count_scaling_half_steps() > 0
    torch.testing.assert_close(warm.plan, cold.plan, rtol=0, atol=1e-11)
    torch.testing.assert_close(warm.value, cold.value, rtol=1e-12, atol=0)


def test_auto_uses_the_log_domain_where_the_scaling_domain_is_not_safe(gen, monkeypatch, count_scaling_half_steps):
    x, y = clouds(20, 15, 2, gen)
    C, a, b = sqdist(x, y), simplex(20, gen), simplex(15, gen)
    otcore.sinkhorn(C, a, b, eps=100.0)  # eps above the costs' range: the centred log domain
    otcore.sinkhorn(otcore.PointCloud(x, y, validate=False), a, b, eps=0.1, validate=False)
    otcore.sinkhorn(C.requires_grad_(), a, b, eps=0.1, grad="unroll")
    monkeypatch.setattr(scaling, "DENSE_BUDGET_BYTES", 20 * 15 * 8 - 1)
    otcore.sinkhorn(C.detach(), a, b, eps=0.1)
    assert count_scaling_half_steps() == 0
    monkeypatch.setattr(scaling, "DENSE_BUDGET_BYTES", 20 * 15 * 8)
    otcore.sinkhorn(C.detach(), a, b, eps=0.1)
    assert count_scaling_half_steps() > 0


def test_a_solve_that_keeps_absorbing_returns_to_the_log_domain(gen, monkeypatch, count_scaling_half_steps):
    """With a range of scalings so narrow that every half-step rebuilds the kernel, the solve
    returns to the log domain after a few iterations, and finds the same fixed point."""
    x, y = clouds(30, 30, 2, gen)
    C, a, b = sqdist(x, y), simplex(30, gen), simplex(30, gen)
    log = otcore.sinkhorn(C, a, b, eps=0.05, tol=1e-10, domain="log")
    monkeypatch.setitem(scaling.THRESHOLDS, F64, 1e-6)
    res = otcore.sinkhorn(C, a, b, eps=0.05, tol=1e-10, domain="scaling")
    assert 0 < count_scaling_half_steps() <= 2 * 10 < int(res.n_iter)
    torch.testing.assert_close(res.f, log.f, rtol=0, atol=1e-10)
    assert bool(res.converged) and int(res.n_iter) == int(log.n_iter)


def test_domain_errors_name_the_argument(gen):
    C = torch.rand(5, 4, generator=gen, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="domain must be one of"):
        otcore.sinkhorn(C, eps=0.1, domain="kernel")
    with pytest.raises(ValueError, match="domain='scaling' cannot run: gradients"):
        otcore.sinkhorn(C, eps=0.1, domain="scaling", grad="unroll")
    with pytest.raises(ValueError, match="domain='scaling' cannot run: the geometry was built with validate=False"):
        otcore.sinkhorn(C.detach(), eps=0.1, domain="scaling", validate=False)


def test_scaling_domain_gradients_are_the_log_domains(gen):
    """The gradients go through the geometry at the fixed point, whichever domain found it."""
    x, y = clouds(15, 12, 2, gen)
    x.requires_grad_()
    a, b = simplex(15, gen), simplex(12, gen)
    grads = []
    for domain in ("scaling", "log"):
        res = otcore.sinkhorn(otcore.PointCloud(x, y), a, b, eps=0.05, tol=1e-12, domain=domain)
        # a loss of f + g (the potentials' gauge f + c, g - c depends on the path taken)
        grads.append(torch.autograd.grad(res.value + (res.f[:, None] + res.g[None]).square().sum(), x)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-8, atol=1e-10)
    assert np.isfinite(grads[0].numpy()).all()


def test_subnormal_kernel_sums_fall_back_to_the_log_domain():
    """Costs about 100 eps in float32 (one point against two): the first kernel exp(-C/eps) is
    subnormal (a few significant bits). Its half-steps are recomputed in the log domain, so the
    returned potentials meet tol when re-evaluated in float64 (they missed it by 1.6x before)."""
    C = torch.tensor([[26.5869, 27.0]])
    a, b = torch.tensor([1.0]), torch.tensor([0.69921875, 0.0])
    eps, tau = 0.266750934832316, 0.07450228910088416
    res = otcore.sinkhorn(C, a, b, eps=eps, tau_a=tau, tau_b=tau, domain="scaling")
    assert bool(res.converged)
    f, g, C64, a64, b64 = (t.double() for t in (res.f, res.g, C, a, b))
    rows = -eps * torch.logsumexp(b64.log() + (g - C64) / eps, dim=-1)
    cols = -eps * torch.logsumexp(a64.log()[:, None] + (f[:, None] - C64) / eps, dim=0)
    residual = (a64 * torch.expm1((f - tau * rows) / eps)).abs().sum() + \
        torch.where(b64 > 0, b64 * torch.expm1((g - tau * cols) / eps), 0).abs().sum()
    assert float(residual) <= 1e-4


def test_a_warm_start_whose_kernel_underflows_restarts_from_the_hard_c_transforms(gen, monkeypatch):
    """init = (-50, -50) at eps = 0.01: every entry of exp((f0 + g0 - C)/eps) underflows, so the
    first iteration fails even one at a time; the solve restarts once from min_j C_ij (and the
    column minima after it) and still reaches POT's plan."""
    x, y = clouds(30, 25, 2, gen)
    C, a, b = sqdist(x, y), simplex(30, gen), simplex(25, gen)
    starts = []
    original = scaling.StabilisedKernel.rebuild

    def recorded(self, f, g):
        starts.append(f is None)
        return original(self, f, g)

    monkeypatch.setattr(scaling.StabilisedKernel, "rebuild", recorded)
    init = (torch.full((30,), -50.0, dtype=F64), torch.full((25,), -50.0, dtype=F64))
    res = otcore.sinkhorn(C, a, b, eps=0.01, tol=1e-11, max_iter=50_000, init=init, domain="scaling")
    assert bool(res.converged) and starts[:2] == [False, True]
    assert float((res.plan - _pot_log_plan(C, a, b, 0.01)).abs().sum()) <= 1e-9


@pytest.mark.parametrize("module", ["torch", "numpy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_entries_below_the_normal_range_are_exact_zeros(dtype, module):
    """``exp_above_tiny_(zero=True)`` of a tensor or a NumPy array against torch.exp in float64:
    equal (to rounding) where exp(t) >= e tiny, exactly 0 below, never subnormal (whose
    arithmetic is ~30x slower)."""
    tiny = torch.finfo(dtype).tiny
    floor = float(np.log(tiny))
    t = torch.linspace(floor - 30, 5, 20_001, dtype=dtype)
    if module == "torch":
        out = exp_above_tiny_(t.clone(), zero=True)
    else:
        out = torch.from_numpy(exp_above_tiny_(t.numpy().copy(), zero=True))
    assert out.dtype == dtype
    ref = t.double().exp()
    kept = ref >= np.e * tiny * (1 + 1e-6)
    torch.testing.assert_close(out[kept].double(), ref[kept], rtol=4 * torch.finfo(dtype).eps, atol=0)
    assert bool((out[ref < tiny] == 0).all())
    assert not bool(((out > 0) & (out < tiny)).any())


def test_checks_of_a_small_problem_are_least_apart_unless_convergence_is_predicted_sooner():
    both = torch.ones(2, dtype=torch.bool)
    nexts = {}
    for least in (8, 1):
        schedule = _Schedule(2, 2, marks=(), least=least)
        schedule.measured(2, both, torch.tensor([0.5, 0.5], dtype=F64), tol=1e-9)
        assert schedule.next.tolist() == [3, 3]  # after a first error, the next iteration gives its contraction
        # problem 0 contracts by 1/2 an iteration (tol in ~28 more); problem 1 by 1/100 (tol in 3.4)
        schedule.measured(3, both, torch.tensor([0.5 * 0.5, 0.5 * 0.01], dtype=F64), tol=1e-9)
        nexts[least] = schedule.next.tolist()
    assert nexts == {8: [3 + 8, 3 + 4], 1: [3 + 2, 3 + 2]}  # least, else the doubled interval; or the prediction
    # what a check costs in iterations of each size
    assert [least_interval(k, k) for k in (8, 64, 128, 129, 500)] == [8, 8, 2, 1, 1]


@pytest.mark.parametrize("module", [torch, np])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_kernel_is_the_same_built_on_either_module(gen, monkeypatch, dtype, module):
    """A rebuild on NumPy or on torch gives exp((f0 + g0 - C) / eps) of a float64 reference, to
    rounding, where it is at least e tiny, and 0 below tiny; for a batch whose cost is an
    expanded view, and without writing the caller's tensors."""
    C = sqdist(*clouds(60, 50, 2, gen)).to(dtype).expand(2, 60, 50)
    f = torch.rand(2, 60, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.rand(2, 50, generator=gen, dtype=torch.float64).to(dtype)
    given = [t.clone() for t in (C, f, g)]
    monkeypatch.setattr(scaling, "build_module", lambda geom, xp: module)
    eps = 0.05 if dtype == torch.float32 else 0.005  # some entries underflow, most do not
    kernel = scaling.StabilisedKernel(otcore.CostMatrix(C), eps=eps)
    K, f0, g0 = kernel.rebuild(f, g)
    assert K.dtype == dtype and K.shape == (2, 60, 50)
    assert all(torch.equal(t, before) for t, before in zip((C, f, g), given, strict=True))
    ref = torch.exp((f0.double()[..., :, None] + g0.double()[..., None, :] - C.double()) / eps)
    tiny = torch.finfo(dtype).tiny
    kept = ref >= np.e * tiny * (1 + 1e-3)
    assert 0.2 < float(kept.double().mean()) < 0.9
    # rounding: of the exponent's terms, u (|f0| + |g0| + C) / eps in exp's argument, and of exp
    scale = (f0.double()[..., :, None].abs() + g0.double()[..., None, :].abs() + C.double()) / eps
    bound = 4 * torch.finfo(dtype).eps * (1 + scale[kept]) * ref[kept]
    assert bool(((K[kept].double() - ref[kept]).abs() <= bound).all())
    assert bool((K[ref < tiny] == 0).all())


def test_the_kernel_is_built_and_iterated_where_it_is_fastest():
    """Iterated on NumPy, except float32 problems whose products would run on several OpenBLAS
    threads (from 679 x 679) while torch runs several; built on NumPy where torch's operations
    would run on one thread (small kernels) or wait for OpenBLAS's spinning threads, on torch in
    between, and where it iterates."""
    def iterated(n, dtype=torch.float32):
        return scaling.iteration_module(otcore.CostMatrix(torch.zeros(n, n, dtype=dtype)))

    def built(n, xp=np):
        return scaling.build_module(otcore.CostMatrix(torch.zeros(n, n)), xp)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert iterated(678) is np and iterated(679) is torch and iterated(679, torch.float64) is np
        assert built(100) is np and built(300) is torch and built(679) is np and built(300, xp=torch) is torch
        torch.set_num_threads(1)
        assert iterated(679) is np and built(300) is np
    finally:
        torch.set_num_threads(threads)
