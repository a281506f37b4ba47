"""ShapeMatchingLoss: gradients, the entropic refinement against POT, exact recoveries, bad inputs."""

import numpy as np
import ot
import pytest
import torch

import otcore
from otcore import shapes
from otcore.nn.shape_matching import TERMS, entropic_plan, shape_matching_terms

F64 = torch.float64


def tiny_spectrum(n: int, k: int, gen: torch.Generator):
    mass = torch.rand(n, generator=gen, dtype=F64) + 0.5
    q = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=F64))[0]
    return torch.linspace(0, 2, k, dtype=F64), q / mass.sqrt()[:, None], mass   # M-orthonormal


def test_loss_gradcheck(gen):
    spec_x, spec_y = tiny_spectrum(8, 3, gen), tiny_spectrum(7, 3, gen)
    fx = torch.randn(8, 4, generator=gen, dtype=F64, requires_grad=True)
    fy = torch.randn(7, 4, generator=gen, dtype=F64, requires_grad=True)
    criterion = otcore.nn.ShapeMatchingLoss(laplacian=0.5, lam=2.0, tau=0.5, n_projections=6, seed=0)
    assert torch.autograd.gradcheck(lambda a, b: criterion(a, b, spec_x, spec_y), (fx, fy))
    # soft_map="sinkhorn" holds its plan constant (as the paper): no gradcheck of the whole; its
    # gradient is finite and its terms are checked against POT below
    refine = otcore.nn.ShapeMatchingLoss(soft_map="sinkhorn", lam=2.0, sigma=0.5, n_iter=20, n_projections=6, seed=0)
    refine(fx, fy, spec_x, spec_y).backward()
    assert bool(torch.isfinite(fx.grad).all()) and float(fx.grad.abs().sum()) > 0


def test_loss_is_the_weighted_sum_of_terms(gen):
    spec_x, spec_y = tiny_spectrum(20, 5, gen), tiny_spectrum(18, 5, gen)
    fx, fy = torch.randn(20, 6, generator=gen, dtype=F64), torch.randn(18, 6, generator=gen, dtype=F64)
    weights = dict(zip(TERMS, [0.5, 2.0, 0.3, 1.5, 4.0]))
    criterion = otcore.nn.ShapeMatchingLoss(**weights, seed=3)
    terms = criterion.terms(fx, fy, spec_x, spec_y)
    total = sum(w * getattr(terms, name) for name, w in weights.items())
    torch.testing.assert_close(criterion(fx, fy, spec_x, spec_y), total, rtol=1e-14, atol=0)
    # the terms, written out: bijectivity from the maps, alignment from POT with the same directions
    C1, C2 = terms.fmap_xy.numpy(), terms.fmap_yx.numpy()
    bij = np.linalg.norm(C1 @ C2 - np.eye(5)) ** 2 + np.linalg.norm(C2 @ C1 - np.eye(5)) ** 2
    assert abs(float(terms.bijectivity) - bij) < 1e-10 * bij
    theta = torch.randn(6, 50, generator=gen, dtype=F64)
    theta = theta / theta.norm(dim=0)
    ux, uy = (torch.nn.functional.normalize(f, dim=1) for f in (fx, fy))
    ref = ot.sliced_wasserstein_distance(ux.numpy(), (terms.soft_map_xy @ uy).numpy(), projections=theta.numpy()) + \
        ot.sliced_wasserstein_distance((terms.soft_map_yx @ ux).numpy(), uy.numpy(), projections=theta.numpy())
    ours = otcore.sliced_wasserstein(ux, terms.soft_map_xy @ uy, projections=theta) + \
        otcore.sliced_wasserstein(terms.soft_map_yx @ ux, uy, projections=theta)
    assert abs(float(ours) - ref) < 1e-12


def test_entropic_plan_matches_pot(gen):
    fx, fy = torch.randn(30, 3, generator=gen, dtype=F64), torch.randn(25, 3, generator=gen, dtype=F64)
    ux, uy = (torch.nn.functional.normalize(f, dim=1).numpy() for f in (fx, fy))
    M = ((uy[:, None] - ux[None]) ** 2).sum(-1)
    sigma = 0.3
    ref = ot.sinkhorn(np.full(25, 1 / 25), np.full(30, 1 / 30), M, 2 * sigma**2 * M.mean(), method="sinkhorn_log",
                      numItermax=100_000, stopThr=1e-14)
    plan = entropic_plan(fx, fy, sigma=sigma, n_iter=3000).plan
    np.testing.assert_allclose(plan.numpy(), ref, atol=1e-12)
    terms = shape_matching_terms(fx, fy, tiny_spectrum(30, 4, gen), tiny_spectrum(25, 4, gen),
                                 soft_map="sinkhorn", sigma=sigma, n_iter=3000)
    np.testing.assert_allclose(terms.soft_map_yx.numpy(), 25 * ref, atol=1e-10)
    np.testing.assert_allclose(terms.soft_map_xy.sum(1).numpy(), np.ones(30), atol=1e-10)


def test_refined_pointmap_recovers_a_permutation(gen):
    """Features of y = features of x shuffled: the entropic plan's argmax is the permutation."""
    fx = torch.randn(200, 8, generator=gen, dtype=F64)
    perm = torch.randperm(200, generator=gen)
    p2p = otcore.nn.shape_matching_pointmap(fx, fx[perm] + 0.01 * torch.randn(200, 8, generator=gen, dtype=F64))
    assert torch.equal(p2p, perm)
    assert torch.equal(otcore.nn.ShapeMatchingLoss().pointmap(fx, fx[perm]), perm)


def test_ground_truth_features_give_small_loss_and_exact_map():
    """On an isometric shuffled pair, spectral features pulled back by the truth score near 0."""
    pair = shapes.make_pair("capsule", n_vertices=250, deformation="none", remesh=False, seed=9)
    spec_x = shapes.laplacian_basis(pair.vertices_x, pair.faces_x, 8)
    spec_y = shapes.laplacian_basis(pair.vertices_y, pair.faces_y, 8)
    fx = spec_x.evecs * 10
    fy = fx[pair.correspondence]
    terms = otcore.nn.ShapeMatchingLoss(lam=0.0).terms(fx, fy, spec_x, spec_y)
    assert float(terms.bijectivity) < 1e-18 and float(terms.orthogonality) < 1e-18
    C = shapes.pointmap_to_fmap(pair.correspondence, spec_x, spec_y)
    torch.testing.assert_close(terms.fmap_xy, C, atol=1e-10, rtol=0)
    assert torch.equal(otcore.nn.shape_matching_pointmap(fx, fy), pair.correspondence)
    err = shapes.geodesic_error(pair.vertices_x, pair.faces_x, otcore.nn.shape_matching_pointmap(fx, fy),
                                pair.correspondence)
    assert float(err.max()) == 0.0


def test_float32_features_keep_dtype(gen):
    spec_x, spec_y = tiny_spectrum(20, 5, gen), tiny_spectrum(18, 5, gen)   # float64 spectra
    fx = torch.randn(20, 6, generator=gen).requires_grad_()
    fy = torch.randn(18, 6, generator=gen)
    loss = otcore.nn.ShapeMatchingLoss(seed=0)(fx, fy, spec_x, spec_y)
    loss.backward()
    assert loss.dtype == torch.float32 and fx.grad.dtype == torch.float32 and bool(torch.isfinite(fx.grad).all())


def test_bad_inputs_name_the_argument(gen):
    spec_x, spec_y = tiny_spectrum(20, 5, gen), tiny_spectrum(18, 5, gen)
    fx, fy = torch.randn(20, 6, generator=gen, dtype=F64), torch.randn(18, 6, generator=gen, dtype=F64)
    criterion = otcore.nn.ShapeMatchingLoss()
    bad = fx.clone()
    bad[3, 1] = float("inf")
    with pytest.raises(ValueError, match="^feat_x"):
        criterion(bad, fy, spec_x, spec_y)
    with pytest.raises(ValueError, match="^feat_y"):
        criterion(fx, fy[:, 0], spec_x, spec_y)
    with pytest.raises(ValueError, match="^spectrum_y"):
        criterion(fx, fy, spec_x, spec_x)
    with pytest.raises(ValueError, match="^spectrum_x.mass"):
        criterion(fx, fy, (spec_x[0], spec_x[1], -spec_x[2]), spec_y)
    with pytest.raises(ValueError, match="^bijectivity"):
        otcore.nn.ShapeMatchingLoss(bijectivity=-1.0)
    with pytest.raises(ValueError, match="^soft_map"):
        otcore.nn.ShapeMatchingLoss(soft_map="hungarian")
    with pytest.raises(ValueError, match="^n_projections"):
        otcore.nn.ShapeMatchingLoss(n_projections=0)
    with pytest.raises(ValueError, match="^sigma"):
        otcore.nn.shape_matching_pointmap(fx, fy, sigma=0)
    with pytest.raises(ValueError, match="^p"):
        otcore.nn.ShapeMatchingLoss(p=0.5, seed=0)(fx, fy, spec_x, spec_y)


def test_sinkhorn_soft_maps_are_stochastic_before_convergence(gen):
    """A few Sinkhorn iterations leave one marginal of the plan off: each soft map is the plan
    normalised along its own rows (P by rows for y -> x, P^T by rows for x -> y)."""
    fx, fy = torch.randn(40, 5, generator=gen, dtype=F64), torch.randn(33, 5, generator=gen, dtype=F64)
    terms = shape_matching_terms(fx, fy, tiny_spectrum(40, 4, gen), tiny_spectrum(33, 4, gen), soft_map="sinkhorn",
                                 sigma=0.1, n_iter=3, n_projections=4, seed=0)
    plan = entropic_plan(fx, fy, sigma=0.1, n_iter=3).plan.numpy()
    assert np.abs(plan.sum(1) * 33 - 1).max() > 1e-2 or np.abs(plan.sum(0) * 40 - 1).max() > 1e-2  # not converged
    np.testing.assert_allclose(terms.soft_map_yx.numpy(), plan / plan.sum(1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(terms.soft_map_xy.numpy(), (plan / plan.sum(0, keepdims=True)).T, rtol=1e-12)


@pytest.mark.parametrize(("option", "value"), [("lam", -1.0), ("lam", float("inf")), ("gamma", 0.0), ("p", 0.5),
                                               ("seed", "x"), ("seed", -3), ("tau", 0.0)])
def test_bad_options_raise_at_construction(option, value):
    with pytest.raises(ValueError, match=f"^{option}"):
        otcore.nn.ShapeMatchingLoss(**{option: value})
