"""otcore.neural.ENOT: its Euler-Maruyama simulation against closed forms (the untrained model is
Brownian motion; a constant drift's energy), training on a Gaussian problem against the closed-form
EOT plan (otcore.neural.gaussian), checkpoints and bad inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import gaussian_problem

from otcore.neural import ENOT, gaussian

F64 = torch.float64


def draw(mean, cov, n, gen):
    return torch.randn(n, mean.shape[-1], generator=gen, dtype=F64) @ torch.linalg.cholesky(cov).T + mean


def small(eps: float = 1.0) -> ENOT:
    return ENOT(2, eps=eps, hidden=(64, 64, 64), n_sde_steps=10)


def test_untrained_model_is_brownian_motion_without_the_last_noise(gen):
    """Zero drift: X_1 - x ~ N(0, eps (N - 1)/N I) (N steps, the last without noise)."""
    model = ENOT(2, eps=0.8, hidden=(8,), n_sde_steps=5).double()
    x = torch.randn(100_000, 2, generator=gen, dtype=F64)
    paths = model.trajectory(x, seed=0)
    assert paths.shape == (100_000, 6, 2)
    assert torch.equal(paths[:, -1], paths[:, -2])  # no noise on the last step
    torch.testing.assert_close(paths[:, -1], model.sample(x, seed=0))
    moved = paths[:, -1] - x
    torch.testing.assert_close(moved.mean(0), torch.zeros(2, dtype=F64), atol=0.01, rtol=0)
    torch.testing.assert_close(moved.T.cov(), 0.8 * 4 / 5 * torch.eye(2, dtype=F64), atol=0.01, rtol=0)


def test_constant_drift_energy_and_endpoint(gen):
    """A drift module returning c: X_1 = x + c + noise, energy = 1/2 |c|^2 / d."""

    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Parameter(torch.tensor([[1.5, -0.5, 2.0]], dtype=F64))

        def forward(self, xt):
            assert xt.shape[-1] == 4  # (x, t)
            return self.c.expand(xt.shape[0], -1)

    model = ENOT(3, eps=1e-12, n_sde_steps=8, drift=Constant()).double()
    x = torch.randn(10, 3, generator=gen, dtype=F64)
    end, energy = model.simulate(x, 8, None)
    torch.testing.assert_close(end, x + model.drift.c, atol=1e-5, rtol=0)
    torch.testing.assert_close(energy, torch.full((10,), 0.5 * 6.5 / 3, dtype=F64))


@pytest.mark.parametrize("eps", [1.0, 0.1])
def test_training_lowers_bw2_uvp_clearly(one_thread, eps):
    """d = 2, LightSB's accuracy problem: the BW2-UVP of the joint plan against the closed form
    falls well below its starting value (the Brownian prior's plan) within a few dozen outer steps."""
    gen = torch.Generator().manual_seed(0)
    m0, S0, m1, S1 = gaussian_problem(2, gen)
    x, y = draw(m0, S0, 10000, gen).float(), draw(m1, S1, 10000, gen).float()
    joint_mean, joint_cov = gaussian.eot_plan(m0, S0, m1, S1, eps=eps)
    test_x = draw(m0, S0, 10000, gen)

    def score(model):
        ys = model.sample(test_x.float(), seed=1).double()
        return float(gaussian.bw2_uvp(torch.cat([test_x, ys], 1), joint_mean, joint_cov))

    model = small(eps)
    start = score(model)
    model.fit(x, y, n_steps=30, lr=1e-3, seed=0, progress=False)
    end = score(model)
    assert start > 5
    assert end < 0.25 * start, (start, end)


def test_state_dict_round_trip_and_resume(tmp_path, one_thread):
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(300, 2, generator=gen), torch.randn(300, 2, generator=gen) + 1
    options = {"n_steps": 6, "batch_size": 32, "inner_steps": 2, "seed": 0, "progress": False}
    full = small().fit(x, y, **options)
    copy = small()
    copy.load_state_dict(full.state_dict())
    test = torch.randn(20, 2, generator=gen)
    assert torch.equal(copy.sample(test, seed=3), full.sample(test, seed=3))
    assert not torch.equal(full.sample(test, seed=3), small().sample(test, seed=3))  # it learned

    path = tmp_path / "enot.pt"

    def stop_at(step, loss):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        small().fit(x, y, **options, callback=stop_at, checkpoint=path, checkpoint_every=3)
    resumed = small().fit(x, y, **options, checkpoint=path, checkpoint_every=3, resume=True)
    for (name, p), q in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_bad_inputs_name_the_argument():
    x = torch.randn(8, 2)
    model = small()
    cases = [
        (lambda: ENOT(0, eps=1.0), "dim"),
        (lambda: ENOT(2, eps=-1.0), "eps"),
        (lambda: ENOT(2, eps=1.0, n_sde_steps=0), "n_sde_steps"),
        (lambda: ENOT(2, eps=1.0, hidden=(0,)), "hidden"),
        (lambda: ENOT(2, eps=1.0, drift="mlp"), "drift"),
        (lambda: model.fit(x, x, n_steps=0), "n_steps"),
        (lambda: model.fit(x, x, inner_steps=0), "inner_steps"),
        (lambda: model.fit(x, x, lr=0.0), "lr"),
        (lambda: model.fit(x, torch.randn(8, 3)), "y"),
        (lambda: model.fit(x[0], x), "x"),
        (lambda: model.sample(torch.randn(8, 3)), "x"),
        (lambda: model.trajectory(x, 0), "n_steps"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()
