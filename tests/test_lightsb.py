"""otcore.neural.LightSB and the Gaussian-mixture bridge benchmark (MixtureBridge).

References: the closed-form Gaussian EOT plan (otcore.neural.gaussian, itself tested against
otcore.sinkhorn on samples in test_neural.py), torch.distributions densities, quadrature on a
grid, a discrete otcore.sinkhorn between samples, and the Brownian bridge's known covariance.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import draw, gaussian_problem, sqdist

import otcore
from otcore.neural import LightSB, MixtureBridge, gaussian
from otcore.neural.lightsb import brownian_bridge

F64 = torch.float64
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def random_model(d: int, covariance: str, gen: torch.Generator, eps: float = 0.7, K: int = 3) -> LightSB:
    """A LightSB with random (untrained) float64 parameters."""
    model = LightSB(d, eps=eps, n_components=K, covariance=covariance).double()
    with torch.no_grad():
        model.log_alpha.copy_(torch.randn(K, generator=gen, dtype=F64))
        model.r.copy_(torch.randn(K, d, generator=gen, dtype=F64))
        model.log_diag.copy_(0.5 * torch.randn(K, d, generator=gen, dtype=F64))
        if covariance == "full":
            model.lower.copy_(0.4 * torch.randn(K, d, d, generator=gen, dtype=F64))
    return model


def explicit_S(model: LightSB) -> torch.Tensor:
    """S_k as dense (K, d, d) matrices, built directly from the parameters."""
    if model.covariance == "diagonal":
        return torch.diag_embed(model.log_diag.exp())
    L = torch.tril(model.lower, -1) + torch.diag_embed((0.5 * model.log_diag).exp())
    return L @ L.mT


# ---------------------------------------------------------------- accuracy on Gaussians


@pytest.mark.parametrize("eps", [1.0, 0.1])
def test_lightsb_defaults_solve_gaussian_eot(one_thread, eps):
    """Defaults, d = 2: BW2-UVP of the joint plan and cBW2-UVP of the conditionals <= 2 %
    against the closed form (the paper's level is <= 1-2 %)."""
    gen = torch.Generator().manual_seed(0)
    d = 2
    m0, S0, m1, S1 = gaussian_problem(d, gen)
    x, y = draw(m0, S0, 20000, gen).float(), draw(m1, S1, 20000, gen).float()
    model = LightSB(d, eps=eps).fit(x, y, seed=0, progress=False)
    test_x = draw(m0, S0, 20000, gen)
    ys = model.sample(test_x.float(), seed=1).double()
    joint_mean, joint_cov = gaussian.eot_plan(m0, S0, m1, S1, eps=eps)
    assert float(gaussian.bw2_uvp(torch.cat([test_x, ys], 1), joint_mean, joint_cov)) <= 2
    inputs = test_x[:50]
    cond = model.sample(inputs.float().repeat_interleave(1000, 0), seed=2).double().reshape(50, 1000, d)
    assert float(gaussian.cbw2_uvp(inputs, cond, m0, S0, m1, S1, eps=eps)) <= 2
    # and the untrained independent plan is far from it (the metric has teeth)
    independent = draw(m1, S1, 20000, gen)
    assert float(gaussian.bw2_uvp(torch.cat([test_x, independent], 1), joint_mean, joint_cov)) > 10


# ---------------------------------------------------------------- closed forms


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_log_potential_is_the_gaussian_mixture(gen, covariance):
    """log v(y) = log sum_k alpha_k N(y | r_k, eps S_k), against torch.distributions."""
    model = random_model(3, covariance, gen)
    y = torch.randn(20, 3, generator=gen, dtype=F64)
    comps = torch.distributions.MultivariateNormal(model.r, covariance_matrix=model.eps * explicit_S(model))
    expected = torch.logsumexp(model.log_alpha + comps.log_prob(y[:, None]), dim=-1)
    torch.testing.assert_close(model.log_potential(y), expected.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_conditional_closed_forms_against_quadrature_and_sampling(gen, covariance):
    """On a 2-D grid, pi(y | x) ∝ exp(<x, y>/eps) v(y) (v from log_potential): its total mass is
    c(x) = exp(log_normaliser(x)), and its mean and covariance are those of model.sample."""
    model = random_model(2, covariance, gen)
    x = torch.tensor([[0.3, -0.5], [-0.8, 0.4]], dtype=F64)
    h = 0.02
    axis = torch.arange(-9, 9, h, dtype=F64)
    grid = torch.cartesian_prod(axis, axis)
    log_v = model.log_potential(grid).detach()
    samples = model.sample(x.repeat_interleave(100_000, 0), seed=0).reshape(2, 100_000, 2)
    for i in range(2):
        log_density = log_v + grid @ x[i] / model.eps
        mass = torch.logsumexp(log_density, 0) + 2 * math.log(h)
        assert abs(float(mass - model.log_normaliser(x[i : i + 1]).detach()[0])) < 1e-6
        p = torch.softmax(log_density, 0)
        mean = p @ grid
        cov = (grid - mean).T @ ((grid - mean) * p[:, None])
        scale = float(cov.diagonal().max())
        torch.testing.assert_close(samples[i].mean(0), mean, atol=0.02 * math.sqrt(scale), rtol=0)
        torch.testing.assert_close(samples[i].T.cov(), cov, atol=0.03 * scale, rtol=0)


def test_loss_is_kl_up_to_a_constant(gen):
    """For data drawn from a model's own plan, that model's loss is lower than a perturbed
    model's, by E_x KL(pi(.|x) || pi'(.|x)) (estimated by Monte Carlo from log-densities)."""
    model = random_model(2, "full", gen, K=2)
    other = random_model(2, "full", gen, K=2)
    x = torch.randn(200_000, 2, generator=gen, dtype=F64)
    y = model.sample(x, seed=1)

    def log_conditional(m: LightSB) -> torch.Tensor:
        return m.log_potential(y) + (x * y).sum(-1) / m.eps - m.log_normaliser(x)

    with torch.no_grad():
        kl = (log_conditional(model) - log_conditional(other)).mean()
        gap = other.loss(x, y) - model.loss(x, y)
    assert float(kl) > 0.05
    assert abs(float(gap - kl)) < 1e-9 * max(1.0, float(kl))


def test_brownian_bridge_covariance(gen):
    """X pinned at x (t = 0) and y (t = 1): mean (1-t) x + t y, Cov(X_s, X_t) = eps s (1 - t) I for s <= t."""
    n, eps, steps = 200_000, 0.5, 4
    x = torch.tensor([[1.0, -2.0]], dtype=F64).expand(n, -1)
    y = torch.tensor([[3.0, 0.5]], dtype=F64).expand(n, -1)
    paths = brownian_bridge(x, y, eps, steps, gen)
    assert paths.shape == (n, steps + 1, 2)
    assert torch.equal(paths[:, 0], x) and torch.allclose(paths[:, -1], y, atol=1e-12)
    t = torch.linspace(0, 1, steps + 1, dtype=F64)
    torch.testing.assert_close(paths.mean(0), (1 - t)[:, None] * x[0] + t[:, None] * y[0], atol=0.01, rtol=0)
    centred = paths[:, :, 0] - paths[:, :, 0].mean(0)
    cov = centred.T @ centred / n
    expected = eps * torch.minimum(t[:, None], t[None]) * (1 - torch.maximum(t[:, None], t[None]))
    torch.testing.assert_close(cov, expected, atol=0.005, rtol=0)


def test_trajectory_ends_at_the_sample(gen):
    model = random_model(2, "full", gen)
    x = torch.randn(5, 2, generator=gen, dtype=F64)
    paths = model.trajectory(x, 7, seed=4)
    assert paths.shape == (5, 8, 2) and paths.dtype == F64
    assert torch.equal(paths[:, 0], x)
    torch.testing.assert_close(paths[:, -1], model.sample(x, seed=4))


# ---------------------------------------------------------------- checkpoints, dtype, device


def test_state_dict_round_trip_and_resume(tmp_path, one_thread):
    """A loaded state_dict gives identical samples for the same seed; a run interrupted after its
    checkpoint and resumed ends with the parameters of the uninterrupted run."""
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(500, 2, generator=gen), torch.randn(500, 2, generator=gen) * 0.5 + 1
    full = LightSB(2, eps=0.5, n_components=4).fit(x, y, n_steps=30, batch_size=32, seed=0, progress=False)
    copy = LightSB(2, eps=0.5, n_components=4)
    copy.load_state_dict(full.state_dict())
    test = torch.randn(50, 2, generator=gen)
    assert torch.equal(copy.sample(test, seed=9), full.sample(test, seed=9))
    assert not torch.equal(full.sample(test, seed=9), full.sample(test, seed=10))

    path = tmp_path / "lightsb.pt"

    def stop_at(step, loss):
        if step == 22:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        LightSB(2, eps=0.5, n_components=4).fit(x, y, n_steps=30, batch_size=32, seed=0, progress=False,
                                                callback=stop_at, checkpoint=path, checkpoint_every=10)
    resumed = LightSB(2, eps=0.5, n_components=4).fit(x, y, n_steps=30, batch_size=32, seed=0, progress=False,
                                                      checkpoint=path, checkpoint_every=10, resume=True)
    for (name, p), q in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_fit_follows_data_dtype_and_device(one_thread):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(300, 3, generator=gen, dtype=F64).to(DEVICE)
    model = LightSB(3, eps=1.0, n_components=2, covariance="diagonal").fit(
        x, lambda k: torch.randn(k, 3, dtype=F64, device=DEVICE) + 2, n_steps=5, seed=0, progress=False)
    assert model.r.dtype == F64 and model.r.device.type == DEVICE.type
    out = model.sample(x[:4].float())
    assert out.dtype == torch.float32 and out.shape == (4, 3)


# ---------------------------------------------------------------- the Gaussian-mixture benchmark


def test_mixture_bridge_conditional_is_the_defined_plan(gen):
    """The closed-form mixture pi(y | x) equals N(y | x, eps I) psi(y) / Z(x) (the definition):
    log pi(y | x) - log N(y | x, eps I) - log psi(y) is the same at every y."""
    bench = MixtureBridge.random(2, eps=0.6, seed=1)
    psi = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(bench.weights),
                                                torch.distributions.MultivariateNormal(bench.means, bench.covs))
    x = torch.randn(3, 2, generator=gen, dtype=F64) * 2
    y = torch.randn(50, 2, generator=gen, dtype=F64) * 3
    log_w, means, covs = bench.conditional(x)
    for i in range(3):
        plan = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(logits=log_w[i]),
                                                     torch.distributions.MultivariateNormal(means[i], covs))
        prior = torch.distributions.MultivariateNormal(x[i], bench.eps * torch.eye(2, dtype=F64))
        residual = plan.log_prob(y) - prior.log_prob(y) - psi.log_prob(y)
        assert float(residual.max() - residual.min()) < 1e-9


def test_mixture_bridge_moments_and_sampling(gen):
    bench = MixtureBridge.random(3, eps=1.0, seed=2)
    x = bench.sample_x(4, generator=gen)
    mean, cov = bench.conditional_moments(x)
    ys = bench.sample_y_given_x(x.repeat_interleave(50_000, 0), generator=gen).reshape(4, 50_000, 3)
    scale = float(cov.diagonal(dim1=1, dim2=2).max())
    torch.testing.assert_close(ys.mean(1), mean, atol=0.02 * math.sqrt(scale) + 0.01, rtol=0)
    torch.testing.assert_close(torch.stack([s.T.cov() for s in ys]), cov, atol=0.03 * scale, rtol=0)
    target = bench.sample_y(100_000, generator=gen)
    t_mean, t_cov = bench.target_moments()
    t_scale = float(t_cov.diagonal().max())
    torch.testing.assert_close(target.mean(0), t_mean, atol=0.02 * math.sqrt(t_scale), rtol=0)
    torch.testing.assert_close(target.T.cov(), t_cov, atol=0.03 * t_scale, rtol=0)
    # the conditional metric: small for exact samples, large for samples of the marginal
    assert float(bench.cbw2_uvp(x, ys)) < 0.5
    assert float(bench.cbw2_uvp(x, target[:80_000].reshape(4, 20_000, 3))) > 10


def test_mixture_bridge_is_entropic_ot_between_its_marginals():
    """A discrete otcore.sinkhorn between independent samples of P0 and P1 (cost 1/2 |x - y|^2,
    the same eps) has the benchmark plan's cross-covariance within sampling error, and not the
    independent coupling's (0)."""
    gen = torch.Generator().manual_seed(3)
    eps = 1.0
    bench = MixtureBridge.random(2, eps=eps, seed=4)
    x, y = bench.sample_x(1000, generator=gen), bench.sample_y(1000, generator=gen)
    P = otcore.sinkhorn(0.5 * sqdist(x, y), eps=eps, tol=1e-6).plan
    cross = (x - x.mean(0)).T @ P @ (y - y.mean(0))
    xs, ys = bench.sample_plan(200_000, generator=gen)
    truth = (xs - xs.mean(0)).T @ (ys - ys.mean(0)) / xs.shape[0]
    error = float((cross - truth).norm() / truth.norm())
    assert error < 0.1, error


def test_lightsb_on_mixture_benchmark(one_thread):
    """LightSB's defaults on the mixture benchmark, d = 2, eps = 1: cBW2-UVP <= 2 %."""
    bench = MixtureBridge.random(2, eps=1.0, seed=0)
    gen = torch.Generator().manual_seed(1)
    x, y = bench.sample_x(20000, generator=gen).float(), bench.sample_y(20000, generator=gen).float()
    model = LightSB(2, eps=1.0).fit(x, y, n_steps=1500, seed=0, progress=False)
    inputs = bench.sample_x(50, generator=gen)
    cond = model.sample(inputs.float().repeat_interleave(1000, 0), seed=2).double().reshape(50, 1000, 2)
    assert float(bench.cbw2_uvp(inputs, cond)) <= 2


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_name_the_argument():
    x = torch.randn(8, 2)
    model = LightSB(2, eps=1.0, n_components=2)
    bench = MixtureBridge.random(2, eps=1.0)
    cases = [
        (lambda: LightSB(0, eps=1.0), "dim"),
        (lambda: LightSB(2, eps=0.0), "eps"),
        (lambda: LightSB(2, eps=float("nan")), "eps"),
        (lambda: LightSB(2, eps=1.0, n_components=0), "n_components"),
        (lambda: LightSB(2, eps=1.0, covariance="spherical"), "covariance"),
        (lambda: model.fit(x, x, n_steps=0), "n_steps"),
        (lambda: model.fit(x, x, batch_size=1), "batch_size"),
        (lambda: model.fit(x, x, lr=-1.0), "lr"),
        (lambda: model.fit(torch.randn(8, 3), x), "x"),
        (lambda: model.fit(x, torch.randn(8, 3)), "y"),
        (lambda: model.fit(x, "y"), "y"),
        (lambda: model.fit(x, x, checkpoint=3), "checkpoint"),
        (lambda: model.sample(torch.randn(8, 3)), "x"),
        (lambda: model.sample(x.clone().fill_(float("inf"))), "x"),
        (lambda: model.trajectory(x, 0), "n_steps"),
        (lambda: MixtureBridge.random(2, eps=-1.0), "eps"),
        (lambda: MixtureBridge(-bench.input_weights, bench.input_means, bench.input_covs, bench.weights,
                               bench.means, bench.covs, eps=1.0), "input_weights"),
        (lambda: MixtureBridge(bench.input_weights, bench.input_means, bench.input_covs, bench.weights,
                               bench.means, -bench.covs, eps=1.0), "covs"),
        (lambda: bench.conditional(torch.randn(4, 3, dtype=F64)), "x"),
        (lambda: bench.cbw2_uvp(torch.randn(4, 2, dtype=F64), torch.randn(3, 5, 2, dtype=F64)), "samples"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()
