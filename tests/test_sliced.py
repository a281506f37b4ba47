"""Sliced Wasserstein family and 1-D OT against POT, scipy, closed forms and plain-torch references."""

import math

import numpy as np
import ot
import pytest
import torch
from conftest import F64, clouds, simplex, sqdist
from scipy.stats import wasserstein_distance

import otcore


def unit_columns(d: int, L: int, gen: torch.Generator) -> torch.Tensor:
    """(d, L) random unit directions drawn here, independently of otcore."""
    t = torch.randn(d, L, generator=gen, dtype=F64)
    return t / t.norm(dim=0, keepdim=True)


def sorted_w2_along(x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """W_2 along each column of theta (d, L) for uniform clouds of equal size: sorted differences."""
    u, v = (x @ theta).sort(0).values, (y @ theta).sort(0).values
    return ((u - v) ** 2).mean(0).sqrt()


# ------------------------------------------------------------------------------------ references
@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("weights", ["uniform", "weighted", "mixed"])
def test_sliced_matches_pot(gen, p, weights):
    x, y = clouds(40, 25, 4, gen)
    a = simplex(40, gen) if weights != "uniform" else None
    b = simplex(25, gen) if weights == "weighted" else None
    theta = unit_columns(4, 30, gen)
    ours = otcore.sliced_wasserstein(x, y, a, b, p=p, projections=theta)
    ref = ot.sliced_wasserstein_distance(x.numpy(), y.numpy(), None if a is None else a.numpy(),
                                         None if b is None else b.numpy(), p=p, projections=theta.numpy())
    assert ours.dtype == F64 and ours.shape == ()
    assert abs(float(ours) - ref) <= 1e-9


def test_sliced_equal_sizes_matches_pot(gen):
    x, y = clouds(50, 50, 3, gen)
    theta = unit_columns(3, 20, gen)
    ref = ot.sliced_wasserstein_distance(x.numpy(), y.numpy(), p=2, projections=theta.numpy())
    assert abs(float(otcore.sliced_wasserstein(x, y, projections=theta)) - ref) <= 1e-9


def test_wasserstein_1d_matches_pot_batched(gen):
    u = torch.randn(3, 17, generator=gen, dtype=F64)
    v = torch.randn(3, 11, generator=gen, dtype=F64) + 0.5
    a = torch.stack([simplex(17, gen, zeros=2) for _ in range(3)])
    b = torch.stack([simplex(11, gen) for _ in range(3)])
    ours = otcore.wasserstein_1d(u, v, a, b, p=1.5)
    ref = ot.wasserstein_1d(u.T.numpy(), v.T.numpy(), a.T.numpy(), b.T.numpy(), p=1.5)  # POT: (n, batch)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-12)
    # broadcast: one v against every row of u
    torch.testing.assert_close(otcore.wasserstein_1d(u, v[0]), torch.stack([otcore.wasserstein_1d(r, v[0]) for r in u]))


def test_one_dimension_is_scipy_wasserstein(gen):
    u, v = torch.randn(23, 1, generator=gen, dtype=F64), torch.randn(9, 1, generator=gen, dtype=F64) * 2
    a, b = simplex(23, gen), simplex(9, gen)
    ref = wasserstein_distance(u[:, 0].numpy(), v[:, 0].numpy(), a.numpy(), b.numpy())
    one = torch.ones(1, 1, dtype=F64)
    assert abs(float(otcore.sliced_wasserstein(u, v, a, b, p=1, projections=one)) - ref) <= 1e-12
    assert abs(float(otcore.max_sliced_wasserstein(u, v, a, b, p=1, n_steps=0, seed=0)) - ref) <= 1e-12


def test_one_dimension_w2_closed_form(gen):
    """n = 2m uniform: the 1-D W_2 matches each sorted v_j with two consecutive sorted u_i."""
    u, v = torch.randn(20, generator=gen, dtype=F64), torch.randn(10, generator=gen, dtype=F64) + 1
    expected = ((u.sort().values - v.sort().values.repeat_interleave(2)) ** 2).mean().sqrt()
    ours = otcore.sliced_wasserstein(u[:, None], v[:, None], projections=torch.ones(1, 1, dtype=F64))
    assert abs(float(ours) - float(expected)) <= 1e-12
    assert abs(float(otcore.wasserstein_1d(u, v, p=2)) - float(expected) ** 2) <= 1e-12


def test_translation_closed_form_orthogonal(gen):
    """y = x + v: W_p along theta is |<theta, v>|; a full orthonormal basis averages it to |v|^2 / d."""
    x = torch.randn(30, 5, generator=gen, dtype=F64)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=F64)
    sw = otcore.sliced_wasserstein(x, x + shift, projections="orthogonal", n_projections=15, seed=3)
    assert abs(float(sw) ** 2 - float(shift.square().sum()) / 5) <= 1e-10


@pytest.mark.parametrize("kind", ["random", "qmc"])
def test_translation_estimate_converges(gen, kind):
    """SW_2^2 of a translation is |v|^2 / d; 4096 directions estimate it within a few percent."""
    x = torch.randn(20, 3, generator=gen, dtype=F64)
    shift = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    sw2 = float(otcore.sliced_wasserstein(x, x + shift, projections=kind, n_projections=4096, seed=1)) ** 2
    assert abs(sw2 - float(shift.square().sum()) / 3) <= 0.03 * float(shift.square().sum()) / 3


def test_qmc_beats_random_on_average():
    """Over 20 seeds, the mean squared error of the translation estimate (L = 256, d = 3) is smaller
    with scrambled-Sobol directions than with i.i.d. ones."""
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    shift = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    truth = float(shift.square().sum()) / 3
    err = {kind: np.mean([(float(otcore.sliced_wasserstein(x, x + shift, projections=kind, n_projections=256,
                                                           seed=s)) ** 2 - truth) ** 2 for s in range(20)])
           for kind in ("random", "qmc")}
    assert err["qmc"] < 0.1 * err["random"]


# ------------------------------------------------------------------------------------ orderings
def test_sw_ebsw_maxsw_w2_ordering(gen):
    x, y = clouds(25, 20, 3, gen)
    a, b = simplex(25, gen), simplex(20, gen)
    sw = otcore.sliced_wasserstein(x, y, a, b, seed=5)
    ebsw = otcore.energy_sliced_wasserstein(x, y, a, b, seed=5)
    drawn = otcore.max_sliced_wasserstein(x, y, a, b, n_steps=0, seed=5)
    msw = otcore.max_sliced_wasserstein(x, y, a, b, seed=5)
    w2 = otcore.emd(sqdist(x, y), a, b).value.sqrt()
    assert float(sw) < float(ebsw) < float(drawn) <= float(msw) < float(w2)


def test_max_sliced_reaches_the_grid_maximum(gen):
    """In 2-D, the ascent finds the max of W_2 over 4000 angles (plain-torch sorted reference)."""
    x, y = clouds(40, 40, 2, gen)
    angles = torch.linspace(0, math.pi, 4000, dtype=F64)
    grid_max = float(sorted_w2_along(x, y, torch.stack([angles.cos(), angles.sin()])).max())
    drawn = float(otcore.max_sliced_wasserstein(x, y, n_projections=3, n_steps=0, seed=2))
    msw = float(otcore.max_sliced_wasserstein(x, y, n_projections=3, n_steps=100, seed=2))
    assert drawn < grid_max - 1e-3  # the ascent has work to do
    assert abs(msw - grid_max) <= 1e-5 * grid_max


def test_ebsw_weights_are_softmax_of_slice_costs(gen):
    x, y = clouds(30, 30, 3, gen)
    theta = unit_columns(3, 12, gen)
    w2 = sorted_w2_along(x, y, theta) ** 2
    expected = (torch.softmax(w2, 0) * w2).sum().sqrt()
    assert abs(float(otcore.energy_sliced_wasserstein(x, y, projections=theta)) - float(expected)) <= 1e-12


# ------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("p", [1.5, 2, 3])
def test_sliced_gradcheck(gen, p):
    x, y = clouds(6, 5, 3, gen)
    a, b = simplex(6, gen), simplex(5, gen)
    theta = unit_columns(3, 4, gen)
    inputs = [t.clone().requires_grad_() for t in (x, y, a, b)]

    def fn(x, y, a, b):  # normalised weights: finite differences stay on equal masses
        return otcore.sliced_wasserstein(x, y, a / a.sum(), b / b.sum(), p=p, projections=theta)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradcheck(lambda t: otcore.sliced_wasserstein(x, y, a, b, p=p, projections=t, validate=False),
                                    [theta.clone().requires_grad_()])


@pytest.mark.parametrize("detach", [False, True])
def test_ebsw_gradients(gen, detach):
    x, y = clouds(6, 5, 2, gen)
    theta = unit_columns(2, 5, gen)
    xr = x.clone().requires_grad_()
    if not detach:
        assert torch.autograd.gradcheck(lambda t: otcore.energy_sliced_wasserstein(t, y, projections=theta), [xr])
        return
    # detached weights: the gradient is that of sum_l w_l W_l with w held at its value
    costs = otcore.wasserstein_1d((x @ theta).T, (y @ theta).T, p=2)
    w = torch.softmax(costs, 0)
    xs = x.clone().requires_grad_()
    ref = (w * otcore.wasserstein_1d((xs @ theta).T, (y @ theta).T, p=2)).sum().sqrt()
    (g_ref,) = torch.autograd.grad(ref, xs)
    (g,) = torch.autograd.grad(otcore.energy_sliced_wasserstein(xr, y, projections=theta, detach_weights=True), xr)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_max_sliced_gradient_is_the_gradient_at_the_best_direction(gen):
    x, y = clouds(6, 5, 3, gen)
    a = simplex(6, gen)
    theta = unit_columns(3, 6, gen)
    assert torch.autograd.gradcheck(
        lambda x, a: otcore.max_sliced_wasserstein(x, y, a / a.sum(), p=2, n_steps=0, projections=theta),
        [x.clone().requires_grad_(), a.clone().requires_grad_()])


def test_identical_clouds_give_zero_and_finite_gradients(gen):
    x = torch.randn(12, 3, generator=gen, dtype=F64, requires_grad=True)
    for fn in (otcore.sliced_wasserstein, otcore.energy_sliced_wasserstein, otcore.max_sliced_wasserstein):
        value = fn(x, x.detach(), seed=0)
        (g,) = torch.autograd.grad(value, x)
        assert float(value.detach()) == 0.0 and bool(torch.isfinite(g).all())


def test_zero_weights_drop_points(gen):
    x, y = clouds(10, 8, 3, gen)
    a = simplex(10, gen, zeros=3)
    full = otcore.sliced_wasserstein(x, y, a, seed=4)
    assert abs(float(full) - float(otcore.sliced_wasserstein(x[3:], y, a[3:], seed=4))) <= 1e-12


# ------------------------------------------------------------------------------------ batching, seeds, dtypes
@pytest.mark.parametrize("fn", [otcore.sliced_wasserstein, otcore.energy_sliced_wasserstein,
                                otcore.max_sliced_wasserstein])
def test_batched_equals_one_by_one(gen, fn):
    x = torch.randn(3, 15, 4, generator=gen, dtype=F64)
    y = torch.randn(3, 11, 4, generator=gen, dtype=F64) + 0.5
    a = torch.stack([simplex(15, gen) for _ in range(3)])
    batched = fn(x, y, a, None, seed=7)
    assert batched.shape == (3,)
    singles = torch.stack([fn(x[k], y[k], a[k], None, seed=7) for k in range(3)])
    torch.testing.assert_close(batched, singles, rtol=1e-12, atol=1e-14)


def test_seed_reproducible_and_global_rng_untouched(gen):
    x, y = clouds(20, 20, 3, gen)
    state = torch.get_rng_state()
    for kind in ("random", "orthogonal", "qmc"):
        first = otcore.sliced_wasserstein(x, y, projections=kind, seed=11)
        assert float(first) == float(otcore.sliced_wasserstein(x, y, projections=kind, seed=11))
        assert float(first) != float(otcore.sliced_wasserstein(x, y, projections=kind, seed=12))
        g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
        assert float(otcore.sliced_wasserstein(x, y, projections=kind, seed=g1)) == \
            float(otcore.sliced_wasserstein(x, y, projections=kind, seed=g2))
    otcore.sliced_wasserstein(x, y)
    assert torch.equal(state, torch.get_rng_state())


def test_float32_in_float32_out(gen):
    x, y = clouds(30, 20, 3, gen)
    ref = otcore.sliced_wasserstein(x, y, seed=0)
    out = otcore.sliced_wasserstein(x.float(), y.float(), seed=0)
    assert out.dtype == torch.float32
    assert abs(float(out) - float(ref)) <= 1e-5 * float(ref)
    half = otcore.sliced_wasserstein(x.half(), y.half(), seed=0)  # computed in float32
    assert half.dtype == torch.float16
    assert abs(float(half) - float(ref)) <= 2e-3 * float(ref)


# ------------------------------------------------------------------------------------ bad inputs
def _bad_cases():
    x = torch.randn(5, 3, dtype=F64)
    y = torch.randn(4, 3, dtype=F64)
    a = torch.full((5,), 0.2, dtype=F64)
    unit = torch.eye(3, dtype=F64)
    return [
        ("x and y", {"x": x, "y": torch.randn(4, 2, dtype=F64)}),
        ("p", {"x": x, "y": y, "p": 0.5}),
        ("p", {"x": x, "y": y, "p": float("nan")}),
        ("n_projections", {"x": x, "y": y, "n_projections": 0}),
        ("projections", {"x": x, "y": y, "projections": torch.eye(2, dtype=F64)}),
        ("projections", {"x": x, "y": y, "projections": 2 * unit}),
        ("projections", {"x": x, "y": y, "projections": "sobol"}),
        ("projections", {"x": x, "y": y, "projections": [[1.0, 0.0, 0.0]]}),
        ("a", {"x": x, "y": y, "a": torch.tensor([0.5, -0.1, 0.2, 0.2, 0.2], dtype=F64)}),
        ("a", {"x": x, "y": y, "a": torch.full((4,), 0.25, dtype=F64)}),
        ("equal total mass", {"x": x, "y": y, "a": 2 * a}),
        ("x", {"x": torch.full((5, 3), float("nan"), dtype=F64), "y": y}),
        ("seed", {"x": x, "y": y, "seed": -1}),
        ("seed", {"x": x, "y": y, "seed": 1.5}),
    ]


@pytest.mark.parametrize(("name", "kwargs"), _bad_cases())
@pytest.mark.parametrize("fn", [otcore.sliced_wasserstein, otcore.energy_sliced_wasserstein,
                                otcore.max_sliced_wasserstein])
def test_bad_inputs_raise(fn, name, kwargs):
    with pytest.raises(ValueError, match=name):
        fn(**kwargs)


@pytest.mark.parametrize(("name", "kwargs"), [("n_steps", {"n_steps": -1}), ("lr", {"lr": 0.0})])
def test_max_sliced_bad_options(name, kwargs):
    with pytest.raises(ValueError, match=name):
        otcore.max_sliced_wasserstein(torch.randn(4, 2), torch.randn(4, 2), **kwargs)


@pytest.mark.parametrize(("name", "args", "kwargs"), [
    ("p", (torch.zeros(3), torch.ones(3)), {"p": 0}),
    ("b", (torch.zeros(3), torch.ones(2)), {"b": torch.tensor([0.5, 0.6])}),
    ("u and v", (torch.zeros(2, 3), torch.ones(3, 2)), {}),
    ("a", (torch.zeros(3), torch.ones(3)), {"a": torch.ones(2)}),
])
def test_wasserstein_1d_bad_inputs(name, args, kwargs):
    with pytest.raises(ValueError, match=name):
        otcore.wasserstein_1d(*args, **kwargs)
