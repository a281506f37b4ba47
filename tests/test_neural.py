"""otcore.neural: Gaussian ground truths (against their defining identities, scipy, otcore.emd and
otcore.sinkhorn on samples), the Monge gap (against a float64 plain-torch Sinkhorn, its floor and
finite differences) and fit_monge_map (against the closed-form W2 map)."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import draw, random_cov, sqdist

import otcore
from otcore.neural import fit_map, fit_monge_map, gaussian, monge_gap

F64 = torch.float64


def gaussian_pair(d: int, gen: torch.Generator):
    m0, m1 = torch.randn(d, generator=gen, dtype=F64), torch.randn(d, generator=gen, dtype=F64)
    return m0, random_cov(d, gen), m1, random_cov(d, gen)


def moments(s: torch.Tensor):
    return s.mean(0), torch.from_numpy(np.cov(s.numpy(), rowvar=False))


def log_sinkhorn_value(C: torch.Tensor, eps: float, n_iter: int = 5000) -> torch.Tensor:
    """Float64 reference: min <P, C> + eps KL(P || a x b), uniform weights, by log-domain Sinkhorn
    (until the potentials stop moving at float64 precision, at most ``n_iter`` sweeps)."""
    n, m = C.shape
    la, lb = torch.full((n,), -math.log(n), dtype=F64), torch.full((m,), -math.log(m), dtype=F64)
    f, g = torch.zeros(n, dtype=F64), torch.zeros(m, dtype=F64)
    for _ in range(n_iter):
        f_old = f
        f = -eps * torch.logsumexp(lb[None] + (g[None] - C) / eps, dim=1)
        g = -eps * torch.logsumexp(la[:, None] + (f[:, None] - C) / eps, dim=0)
        if float((f - f_old).abs().max()) < 1e-14 * max(1.0, float(C.abs().max())):
            break
    logP = la[:, None] + lb[None] + (f[:, None] + g[None] - C) / eps
    P = logP.exp()
    return (P * C).sum() + eps * (P * (logP - la[:, None] - lb[None])).sum()


# ---------------------------------------------------------------- Gaussian closed forms


@pytest.mark.parametrize("eps", [0.1, 1.0, 10.0])
def test_eot_plan_has_cross_term_x_y_over_eps(gen, eps):
    """pi(y | x) ∝ exp(<x, y>/eps) v(y): the joint precision's x-y block is -I/eps, equivalently
    eps C^T S0^-1 = S1 - C^T S0^-1 C."""
    m0, S0, m1, S1 = gaussian_pair(3, gen)
    mean, cov = gaussian.eot_plan(m0, S0, m1, S1, eps=eps)
    assert torch.equal(mean, torch.cat([m0, m1]))
    torch.testing.assert_close(cov[:3, :3], S0)
    torch.testing.assert_close(cov[3:, 3:], S1)
    precision = torch.linalg.inv(cov)
    torch.testing.assert_close(precision[:3, 3:], -torch.eye(3, dtype=F64) / eps, atol=1e-9, rtol=1e-9)
    C = cov[:3, 3:]
    gain = C.T @ torch.linalg.inv(S0)
    torch.testing.assert_close(eps * gain, S1 - gain @ C, atol=1e-10, rtol=1e-10)
    assert bool((torch.linalg.eigvalsh(cov) > 0).all())


def test_eot_plan_tends_to_w2_map_and_independence(gen):
    m0, S0, m1, S1 = gaussian_pair(3, gen)
    A, _ = gaussian.w2_map(m0, S0, m1, S1)
    small = gaussian.eot_cross_covariance(m0, S0, m1, S1, eps=1e-7)
    torch.testing.assert_close(small, S0 @ A, atol=1e-6, rtol=1e-6)
    large = gaussian.eot_cross_covariance(m0, S0, m1, S1, eps=1e7)
    assert float(large.abs().max()) < 1e-6


def test_eot_plan_matches_sinkhorn_on_samples():
    """A discrete otcore.sinkhorn between samples (cost 1/2 |x - y|^2, same eps) has the
    closed-form cross-covariance within sampling error."""
    gen = torch.Generator().manual_seed(7)
    eps, n = 1.0, 1000
    m0, S0, m1, S1 = gaussian_pair(2, gen)
    x, y = draw(m0, S0, n, gen), draw(m1, S1, n, gen)
    result = otcore.sinkhorn(0.5 * sqdist(x, y), eps=eps, tol=1e-9)
    P = result.plan
    cross = (x - x.mean(0)).T @ P @ (y - y.mean(0))
    truth = gaussian.eot_cross_covariance(m0, S0, m1, S1, eps=eps)
    error = float((cross - truth).norm() / truth.norm())
    assert error < 0.05, error
    # and it is not the unregularised (eps -> 0) plan's, which is far at this eps
    A, _ = gaussian.w2_map(m0, S0, m1, S1)
    assert float((cross - S0 @ A).norm() / truth.norm()) > 3 * error


@pytest.mark.parametrize("eps", [0.1, 2.0])
def test_closed_forms_agree_with_sampling(eps):
    """x ~ P0, then X_t | x from eot_conditional: the joint matches eot_plan and X_t matches
    bridge_marginal, in moments and by BW2-UVP."""
    gen = torch.Generator().manual_seed(3)
    n, d = 40000, 2
    m0, S0, m1, S1 = gaussian_pair(d, gen)
    x = draw(m0, S0, n, gen)
    noise = torch.randn(n, d, generator=gen, dtype=F64)
    mean_y, cov_y = gaussian.eot_conditional(x, m0, S0, m1, S1, eps=eps)
    y = mean_y + noise @ torch.linalg.cholesky(cov_y).T
    joint_mean, joint_cov = gaussian.eot_plan(m0, S0, m1, S1, eps=eps)
    em, ec = moments(torch.cat([x, y], 1))
    scale = float(joint_cov.diagonal().max())
    torch.testing.assert_close(em, joint_mean, atol=0.05 * math.sqrt(scale), rtol=0)
    torch.testing.assert_close(ec, joint_cov, atol=0.05 * scale, rtol=0)
    assert float(gaussian.bw2_uvp(torch.cat([x, y], 1), joint_mean, joint_cov)) < 0.2
    for t in (0.3, 0.7):
        mean_t, cov_t = gaussian.eot_conditional(x, m0, S0, m1, S1, eps=eps, t=t)
        xt = mean_t + noise @ torch.linalg.cholesky(cov_t).T
        bm, bc = gaussian.bridge_marginal(m0, S0, m1, S1, eps=eps, t=t)
        em, ec = moments(xt)
        torch.testing.assert_close(em, bm, atol=0.05 * math.sqrt(scale), rtol=0)
        torch.testing.assert_close(ec, bc, atol=0.05 * scale, rtol=0)
    # endpoints of the bridge are the marginals
    for t, (m, S) in ((0.0, (m0, S0)), (1.0, (m1, S1))):
        bm, bc = gaussian.bridge_marginal(m0, S0, m1, S1, eps=eps, t=t)
        torch.testing.assert_close(bm, m)
        torch.testing.assert_close(bc, S)


def test_w2_map_pushes_forward_and_is_optimal_on_samples(gen):
    """A S0 A = S1 with A SPD (the known formula), and otcore.emd between x and shuffled T(x)
    recovers the pairing x_i -> T(x_i) (T is optimal)."""
    m0, S0, m1, S1 = gaussian_pair(3, gen)
    A, b = gaussian.w2_map(m0, S0, m1, S1)
    torch.testing.assert_close(A @ S0 @ A, S1)
    torch.testing.assert_close(A, A.T)
    assert bool((torch.linalg.eigvalsh(A) > 0).all())
    r0 = torch.from_numpy(scipy.linalg.sqrtm(S0.numpy()).real)
    ir0 = torch.linalg.inv(r0)
    reference = ir0 @ torch.from_numpy(scipy.linalg.sqrtm((r0 @ S1 @ r0).numpy()).real) @ ir0
    torch.testing.assert_close(A, reference)
    torch.testing.assert_close(b, m1 - A @ m0)
    x = draw(m0, S0, 60, gen)
    perm = torch.randperm(60, generator=gen)
    Tx = (x @ A.T + b)[perm]
    P = otcore.emd(sqdist(x, Tx)).plan
    assert torch.equal(P.argmax(1), torch.argsort(perm))


def test_bures_wasserstein_matches_scipy_and_batches(gen):
    m0, S0, m1, S1 = gaussian_pair(4, gen)
    r0 = scipy.linalg.sqrtm(S0.numpy()).real
    cross = np.trace(scipy.linalg.sqrtm(r0 @ S1.numpy() @ r0).real)
    expected = float((m0 - m1).pow(2).sum()) + float(S0.trace() + S1.trace()) - 2 * cross
    value = gaussian.bures_wasserstein(m0, S0, m1, S1)
    assert value.dtype == F64
    assert abs(float(value) - expected) < 1e-10 * max(1.0, expected)
    batched = gaussian.bures_wasserstein(torch.stack([m0, m1]), torch.stack([S0, S1]), torch.stack([m1, m1]),
                                         torch.stack([S1, S1]))
    torch.testing.assert_close(batched, torch.stack([value, torch.zeros((), dtype=F64)]), atol=1e-9, rtol=1e-9)


def test_uvp_metrics_against_direct_formulas(gen):
    m0, S0, m1, S1 = gaussian_pair(2, gen)
    y = draw(m1, S1, 500, gen)
    m_hat, c_hat = moments(y)
    half_bw2 = 0.5 * gaussian.bures_wasserstein(m_hat, c_hat, m1, S1)
    torch.testing.assert_close(gaussian.bw2_uvp(y, m1, S1), 100 * half_bw2 / (0.5 * S1.trace()))
    x = draw(m0, S0, 5, gen)
    A, b = gaussian.w2_map(m0, S0, m1, S1)
    shifted = x @ A.T + b + 0.1
    torch.testing.assert_close(gaussian.l2_uvp(shifted, x @ A.T + b, S1), 100 * 0.02 / S1.trace())
    # cBW2-UVP of exact conditional samples is small; of samples from the marginal it is not
    eps = 0.5
    mean, cov = gaussian.eot_conditional(x, m0, S0, m1, S1, eps=eps)
    exact = mean[:, None] + torch.randn(5, 4000, 2, generator=gen, dtype=F64) @ torch.linalg.cholesky(cov).T
    marginal = draw(m1, S1, 5 * 4000, gen).reshape(5, 4000, 2)
    assert float(gaussian.cbw2_uvp(x, exact, m0, S0, m1, S1, eps=eps)) < 0.5
    assert float(gaussian.cbw2_uvp(x, marginal, m0, S0, m1, S1, eps=eps)) > 10


# ---------------------------------------------------------------- Monge gap


def spd_and_rotation(gen):
    Q, _ = torch.linalg.qr(torch.randn(2, 2, generator=gen, dtype=F64))
    A = Q @ torch.diag(torch.tensor([0.7, 1.5], dtype=F64)) @ Q.T
    R = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=F64)
    return A, R


def test_monge_gap_matches_reference_and_floor(gen):
    x = torch.randn(64, 2, generator=gen, dtype=F64)
    A, R = spd_and_rotation(gen)
    eps = 1.0
    floor = -eps * math.log(64)
    for Tx in (x @ A, x @ R.T):
        gap = monge_gap(x, Tx, eps=eps, tol=1e-10)
        expected = sqdist(x[:, None], Tx[:, None]).mean() - log_sinkhorn_value(sqdist(x, Tx), eps)
        assert abs(float(gap) - float(expected)) < 1e-7
        assert float(gap) >= floor - 1e-9
        torch.testing.assert_close(monge_gap(x, Tx, eps=eps, tol=1e-10, subtract_floor=True), gap - floor)


def test_monge_gap_near_floor_for_optimal_map_and_large_for_rotation(gen):
    """Default eps (0.1 x the mean cost): an SPD linear map (optimal for |x - y|^2) has a gap in
    [floor, 0] = [-eps log n, 0]; a 90 degree rotation's is clearly positive (its unregularised
    gap is large)."""
    x = torch.randn(128, 2, generator=gen, dtype=F64)
    A, R = spd_and_rotation(gen)
    floor = -0.1 * float(sqdist(x, x @ A).mean()) * math.log(128)
    optimal = float(monge_gap(x, x @ A))
    assert floor - 1e-9 <= optimal <= 0
    assert float(monge_gap(x, x @ A, subtract_floor=True)) == pytest.approx(optimal - floor, abs=1e-9)
    rotated = float(monge_gap(x, x @ R.T))
    displacement = float((x - x @ R.T).pow(2).sum(-1).mean())
    assert rotated > 0.5 * displacement


def test_monge_gap_float32_batched_and_costs(gen):
    x = torch.randn(3, 32, 2, generator=gen)
    Tx = x.flip(-1)
    gaps = monge_gap(x, Tx, eps=0.5)
    assert gaps.shape == (3,) and gaps.dtype == torch.float32
    for k in range(3):
        torch.testing.assert_close(gaps[k], monge_gap(x[k], Tx[k], eps=0.5), rtol=1e-4, atol=1e-5)
    for cost in ("euclidean", "l1", 3):
        gap = monge_gap(x[0].double(), Tx[0].double(), cost=cost, eps=0.5, tol=1e-9)
        C = torch.cdist(x[0].double(), Tx[0].double(), p={"euclidean": 2, "l1": 1}.get(cost, cost))
        expected = C.diagonal().mean() - log_sinkhorn_value(C, 0.5)
        assert abs(float(gap) - float(expected)) < 1e-6


def test_monge_gap_solves_in_the_scaling_domain_unless_told_not_to_validate(gen, monkeypatch):
    """The gap's solve takes the scaling domain's matrix-vector products (a validated geometry);
    ``validate=False`` reads nothing on the host, so it stays in the log domain. Both give the
    gap of a float64 plain-torch Sinkhorn."""
    solver = importlib.import_module("otcore.solvers.entropic.sinkhorn")
    solver_kernel, built = solver.stabilised_kernel, []

    def recording(*args, **kwargs):
        built.append(solver_kernel(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(solver, "stabilised_kernel", recording)
    x = torch.randn(40, 2, generator=gen, dtype=F64)
    Tx = x @ torch.tensor([[0.5, 1.0], [-1.0, 0.3]], dtype=F64)
    expected = (x - Tx).pow(2).sum(-1).mean() - log_sinkhorn_value(sqdist(x, Tx), 0.5)
    for validate in (True, False):
        built.clear()
        gap = monge_gap(x, Tx, eps=0.5, tol=1e-10, validate=validate)
        assert abs(float(gap) - float(expected)) < 1e-8
        assert len(built) == 1 and (built[0] is not None) == validate


def test_monge_gap_gradcheck(gen):
    x = torch.randn(6, 2, generator=gen, dtype=F64)
    Tx = (x @ torch.tensor([[0.5, 1.0], [-1.0, 0.3]], dtype=F64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: monge_gap(x, t, eps=0.5, tol=1e-13, max_iter=20000), (Tx,))
    xs = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda s, t: monge_gap(s, t, cost="euclidean", eps=0.5, tol=1e-13,
                                                           max_iter=20000), (xs, Tx))


# ---------------------------------------------------------------- fit_monge_map


def test_fit_monge_map_recovers_gaussian_w2_map(one_thread):
    """Defaults, d = 2: L2-UVP < 5 % against the closed-form map (fixed seeds)."""
    gen = torch.Generator().manual_seed(0)
    m0, S0 = torch.zeros(2, dtype=F64), random_cov(2, gen)
    m1, S1 = torch.tensor([1.0, -0.5], dtype=F64), random_cov(2, gen)
    x, y = draw(m0, S0, 4096, gen).float(), draw(m1, S1, 4096, gen).float()
    before = torch.get_rng_state()
    model = fit_monge_map(x, y, seed=0)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is untouched
    test_x = draw(m0, S0, 2000, gen)
    A, b = gaussian.w2_map(m0, S0, m1, S1)
    with torch.no_grad():
        mapped = model(test_x.float()).double()
    assert float(gaussian.l2_uvp(mapped, test_x @ A.T + b, S1)) < 5


def test_fit_monge_map_samplers_seed_and_callback():
    gen = torch.Generator().manual_seed(1)
    losses = []

    def sample_x(k):
        return torch.randn(k, 2, generator=gen)

    def run():
        gen.manual_seed(1)
        return fit_monge_map(sample_x, lambda k: 2 * sample_x(k) + 1, n_steps=5, batch_size=16, seed=3,
                             callback=lambda step, loss: losses.append((step, loss)))

    first, second = run(), run()
    for p, q in zip(first.parameters(), second.parameters()):
        assert torch.equal(p, q)
    assert [s for s, _ in losses] == list(range(5)) * 2 and all(math.isfinite(v) for _, v in losses)


def small_problem(seed: int = 4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(400, 2, generator=gen)
    return x, x @ torch.tensor([[1.2, 0.3], [0.0, 0.6]]) + 1.0


def test_fit_monge_map_validation_restores_the_best_parameters(one_thread):
    """valid_callback runs every valid_every steps and after the last; with restore_best the
    returned parameters are those held at the evaluation with the lowest validation loss."""
    x, y = small_problem()
    model = fit_map.ResidualMLP(2, hidden=(16,))
    snapshots, reports = {}, []

    def keep(step, loss):
        snapshots[step] = [p.detach().clone() for p in model.parameters()]

    fit_monge_map(x, y, model=model, n_steps=12, batch_size=32, lr=0.3, seed=0, validation=(x[:100], y[:100]),
                  valid_every=5, valid_callback=lambda step, value: reports.append((step, value)), callback=keep)
    assert [s for s, _ in reports] == [4, 9, 11]
    best_step = min(reports, key=lambda r: r[1])[0]
    for p, q in zip(model.parameters(), snapshots[best_step], strict=True):
        assert torch.equal(p, q)


def test_fit_monge_map_schedules(one_thread):
    """lr_schedule factor 0: the parameters never move; a lam schedule returning 0 is lam = 0."""
    x, y = small_problem()
    frozen = fit_monge_map(x, y, n_steps=3, batch_size=32, seed=0, lr_schedule=lambda step: 0.0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        untouched = fit_map.ResidualMLP(2)
    for p, q in zip(frozen.parameters(), untouched.parameters(), strict=True):
        assert torch.equal(p, q)
    zero = fit_monge_map(x, y, n_steps=3, batch_size=32, seed=0, lam=0.0, lr_schedule="constant")
    scheduled = fit_monge_map(x, y, n_steps=3, batch_size=32, seed=0, lam=lambda step: 0.0, lr_schedule="constant")
    for p, q in zip(zero.parameters(), scheduled.parameters(), strict=True):
        assert torch.equal(p, q)


def test_fit_monge_map_checkpoint_resume(tmp_path, one_thread):
    """Interrupted after its checkpoint at step 5 and resumed, a run ends with the parameters of
    the uninterrupted one; the file loads as a state_dict checkpoint."""
    x, y = small_problem()
    options = {"n_steps": 8, "batch_size": 32, "seed": 1, "validation": (x[:64], y[:64]), "valid_every": 3}
    full = fit_monge_map(x, y, **options)
    path = tmp_path / "ckpt" / "map.pt"

    def stop_at(step, loss):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_monge_map(x, y, **options, callback=stop_at, checkpoint=path, checkpoint_every=5)
    assert torch.load(path, weights_only=True)["step"] == 5
    resumed = fit_monge_map(x, y, **options, checkpoint=path, checkpoint_every=5, resume=True)
    for p, q in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_name_the_argument(gen):
    m0, S0, m1, S1 = gaussian_pair(2, gen)
    x = torch.randn(8, 2, generator=gen)
    cases = [
        (lambda: monge_gap(x, x[:4]), "Tx"),
        (lambda: monge_gap(x, x, eps=0.0), "eps"),
        (lambda: monge_gap(x, x, relative_eps=-1.0), "relative_eps"),
        (lambda: monge_gap(x, x.clone().fill_(float("nan"))), "Tx"),
        (lambda: monge_gap(x, x, cost="hamming"), "cost"),
        (lambda: gaussian.eot_plan(m0, S0, m1, S1, eps=-1.0), "eps"),
        (lambda: gaussian.eot_plan(m0, S0, m1, -S1, eps=1.0), "cov1"),
        (lambda: gaussian.w2_map(m0, S0 + torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=F64), m1, S1), "cov0"),
        (lambda: gaussian.w2_map(m0, S0, m1[:1], S1), "cov1"),
        (lambda: gaussian.bridge_marginal(m0, S0, m1, S1, eps=1.0, t=1.5), "t"),
        (lambda: gaussian.eot_conditional(x[:, :1].double(), m0, S0, m1, S1, eps=1.0), "x"),
        (lambda: gaussian.bw2_uvp(x[:1].double(), m1, S1), "samples"),
        (lambda: gaussian.l2_uvp(x, x[:3], S1), "mapped"),
        (lambda: fit_monge_map(x, x, lam=-1.0), "lam"),
        (lambda: fit_monge_map(x, x, n_steps=0), "n_steps"),
        (lambda: fit_monge_map(x, x, batch_size=1), "batch_size"),
        (lambda: fit_monge_map(x[0], x), "x"),
        (lambda: fit_monge_map(x, torch.randn(8, 3)), "dimension"),
        (lambda: fit_monge_map(x, lambda k: torch.randn(k + 1, 2), n_steps=1), "sampler"),
        (lambda: fit_monge_map(x, x, model="mlp"), "model"),
        (lambda: fit_monge_map(x, x, lam=lambda step: -1.0, n_steps=1), "lam"),
        (lambda: fit_monge_map(x, x, lr_schedule="linear"), "lr_schedule"),
        (lambda: fit_monge_map(x, x, validation=x), "validation"),
        (lambda: fit_monge_map(x, x, validation=(x, x[:, :1])), "validation"),
        (lambda: fit_monge_map(x, x, valid_every=0), "valid_every"),
        (lambda: fit_monge_map(x, x, checkpoint=1.5), "checkpoint"),
        (lambda: fit_monge_map(x, x, checkpoint_every=0), "checkpoint_every"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()
