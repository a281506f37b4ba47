"""Functional maps: regularisers, the regularised solver and map conversions against closed forms."""

import numpy as np
import pytest
import torch

from otcore import shapes

F64 = torch.float64


def random_orthogonal(k: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


@pytest.fixture(scope="module")
def permuted_pair():
    """An exactly isometric pair: x's mesh with shuffled vertices, moved rigidly; spectra of both."""
    pair = shapes.make_pair("capsule", n_vertices=300, deformation="none", remesh=False, seed=4)
    k = 10
    spec_x = shapes.laplacian_basis(pair.vertices_x, pair.faces_x, k)
    spec_y = shapes.laplacian_basis(pair.vertices_y, pair.faces_y, k)
    return pair, spec_x, spec_y


def test_regularisers_vanish_for_orthogonal_inverse_maps(gen):
    Q = random_orthogonal(8, gen)
    assert float(shapes.bijectivity_loss(Q, Q.T)) < 1e-24
    assert float(shapes.orthogonality_loss(Q)) < 1e-24
    # commutativity: orthogonal blocks within equal eigenvalues, signs elsewhere
    evals = torch.tensor([0.0, 1.0, 1.0, 1.0, 2.5, 4.0, 4.0, 7.0], dtype=F64)
    C = torch.block_diag(torch.ones(1, dtype=F64), random_orthogonal(3, gen), -torch.ones(1, dtype=F64),
                         random_orthogonal(2, gen), torch.ones(1, dtype=F64))
    assert float(shapes.laplacian_commutativity_loss(C, evals, evals)) < 1e-24
    assert float(shapes.bijectivity_loss(C, C.T)) < 1e-24


def test_regularisers_match_numpy(gen):
    C1 = torch.randn(3, 5, 4, generator=gen, dtype=F64)   # batched (k_y, k_x) = (5, 4)
    C2 = torch.randn(3, 4, 5, generator=gen, dtype=F64)
    ex, ey = torch.rand(4, generator=gen, dtype=F64), torch.rand(5, generator=gen, dtype=F64)
    a, b = C1.numpy(), C2.numpy()
    bij = [np.linalg.norm(a[i] @ b[i] - np.eye(5)) ** 2 + np.linalg.norm(b[i] @ a[i] - np.eye(4)) ** 2 for i in range(3)]
    orth = [np.linalg.norm(a[i].T @ a[i] - np.eye(4)) ** 2 for i in range(3)]
    lap = [np.linalg.norm(a[i] @ np.diag(ex) - np.diag(ey) @ a[i]) ** 2 for i in range(3)]
    np.testing.assert_allclose(shapes.bijectivity_loss(C1, C2).numpy(), bij, rtol=1e-12)
    np.testing.assert_allclose(shapes.orthogonality_loss(C1).numpy(), orth, rtol=1e-12)
    np.testing.assert_allclose(shapes.laplacian_commutativity_loss(C1, ex, ey).numpy(), lap, rtol=1e-12)


def test_ground_truth_fmap_of_isometric_pair(permuted_pair):
    pair, spec_x, spec_y = permuted_pair
    C = shapes.pointmap_to_fmap(pair.correspondence, spec_x, spec_y)
    assert float(shapes.orthogonality_loss(C)) < 1e-16
    C_inv = shapes.pointmap_to_fmap(torch.argsort(pair.correspondence), spec_y, spec_x)
    assert float(shapes.bijectivity_loss(C, C_inv)) < 1e-16
    assert float(shapes.laplacian_commutativity_loss(C, spec_x.evals, spec_y.evals)) < 1e-16
    # the soft map of a permutation is its matrix: coupling vanishes, and it reproduces C
    P = torch.zeros(len(pair.correspondence), len(pair.correspondence), dtype=F64)
    P[torch.arange(len(P)), pair.correspondence] = 1
    assert float(shapes.coupling_loss(C, P, spec_x, spec_y)) < 1e-24
    # back to the point map: exact
    assert torch.equal(shapes.fmap_to_pointmap(C, spec_x.evecs, spec_y.evecs), pair.correspondence)


def _complex_mask(ex: np.ndarray, ey: np.ndarray, gamma: float) -> np.ndarray:
    s = max(ex.max(), ey.max())
    rx, ry = 1 / ((ex / s) ** gamma - 1j), 1 / ((ey / s) ** gamma - 1j)
    return np.abs(ry[:, None] - rx[None]) ** 2


@pytest.mark.parametrize("lam", [0.0, 3.0])
def test_fmap_from_features_solves_the_regularised_least_squares(permuted_pair, gen, lam):
    _, spec_x, spec_y = permuted_pair
    n_x, n_y, k = spec_x.evecs.shape[0], spec_y.evecs.shape[0], spec_x.evecs.shape[1]
    fx = torch.randn(n_x, 16, generator=gen, dtype=F64)
    fy = torch.randn(n_y, 16, generator=gen, dtype=F64)
    C = shapes.fmap_from_features(fx, fy, spec_x, spec_y, lam=lam, gamma=0.5).numpy()
    A = spec_x.evecs.numpy().T @ (spec_x.mass.numpy()[:, None] * fx.numpy())
    B = spec_y.evecs.numpy().T @ (spec_y.mass.numpy()[:, None] * fy.numpy())
    D = _complex_mask(spec_x.evals.numpy(), spec_y.evals.numpy(), 0.5)
    # the whole problem as one least squares in vec(C) (row-major): rows kron(I, A^T), penalty sqrt(lam D)
    design = np.vstack([np.kron(np.eye(k), A.T), np.diag(np.sqrt(lam * D.ravel()))])
    target = np.concatenate([B.ravel(), np.zeros(k * k)])
    ref = np.linalg.lstsq(design, target, rcond=None)[0].reshape(k, k)
    np.testing.assert_allclose(C, ref, atol=1e-9)
    np.testing.assert_allclose(shapes.resolvent_mask(spec_x.evals, spec_y.evals).numpy(), D, atol=1e-14)


def test_fmap_from_features_gradcheck(gen):
    n, k, d = 9, 3, 4
    spec = (torch.tensor([0.0, 0.7, 1.9], dtype=F64), torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=F64))[0],
            torch.ones(n, dtype=F64))
    fx = torch.randn(n, d, generator=gen, dtype=F64, requires_grad=True)
    fy = torch.randn(n, d, generator=gen, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: shapes.fmap_from_features(a, b, spec, spec, lam=2.0), (fx, fy))


def test_soft_pointmap_rows_and_limit(gen):
    f = torch.randn(12, 5, generator=gen, dtype=F64)
    perm = torch.randperm(12, generator=gen)
    P = shapes.soft_pointmap(f[perm], f, tau=1e-3)
    torch.testing.assert_close(P.sum(1), torch.ones(12, dtype=F64))
    assert torch.equal(P.argmax(1), perm)


def test_bad_inputs_name_the_argument(permuted_pair, gen):
    pair, spec_x, spec_y = permuted_pair
    fx = torch.randn(spec_x.evecs.shape[0], 4, dtype=F64)
    with pytest.raises(ValueError, match="^spectrum_y"):
        shapes.fmap_from_features(fx, fx, spec_x, spec_y[:2])
    with pytest.raises(ValueError, match="^spectrum_x"):
        shapes.fmap_from_features(fx[:-1], fx, spec_x, spec_y)
    with pytest.raises(ValueError, match="^feat_x and feat_y"):
        shapes.fmap_from_features(fx, fx[:, :3], spec_x, spec_y)
    with pytest.raises(ValueError, match="^lam"):
        shapes.fmap_from_features(fx, fx, spec_x, spec_y, lam=-1.0)
    with pytest.raises(ValueError, match="^fmap_yx"):
        shapes.bijectivity_loss(torch.eye(3, 4, dtype=F64), torch.eye(3, 4, dtype=F64))
    with pytest.raises(ValueError, match="^pointmap"):
        shapes.pointmap_to_fmap(pair.correspondence + 1000, spec_x, spec_y)
    with pytest.raises(ValueError, match="^tau"):
        shapes.soft_pointmap(fx, fx, tau=0)
    with pytest.raises(ValueError, match="^fmap_xy"):
        shapes.fmap_to_pointmap(torch.eye(3, dtype=F64), spec_x.evecs, spec_y.evecs)


def test_coupling_loss_matches_numpy_for_a_soft_map(permuted_pair, gen):
    _, spec_x, spec_y = permuted_pair
    n_x, n_y, k = spec_x.evecs.shape[0], spec_y.evecs.shape[0], spec_x.evecs.shape[1]
    soft = torch.softmax(torch.randn(n_y, n_x, generator=gen, dtype=F64), dim=1)
    C = torch.randn(k, k, generator=gen, dtype=F64)
    Px, Py, my = spec_x.evecs.numpy(), spec_y.evecs.numpy(), spec_y.mass.numpy()
    implied = Py.T @ np.diag(my) @ soft.numpy() @ Px
    np.testing.assert_allclose(shapes.pointmap_to_fmap(soft, spec_x, spec_y).numpy(), implied, atol=1e-13)
    ref = np.linalg.norm(C.numpy() - implied) ** 2
    assert abs(float(shapes.coupling_loss(C, soft, spec_x, spec_y)) - ref) < 1e-12 * ref


def test_nearest_matches_brute_force(gen):
    q, p = torch.randn(3000, 4, generator=gen, dtype=F64), torch.randn(500, 4, generator=gen, dtype=F64)  # > CHUNK rows
    shift = torch.rand(500, generator=gen, dtype=F64)
    cost = ((q.numpy()[:, None] - p.numpy()[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(shapes.nearest(q, p).numpy(), cost.argmin(1))
    np.testing.assert_array_equal(shapes.nearest(q, p, shift).numpy(), (cost - shift.numpy()).argmin(1))


def test_more_bad_inputs_name_the_argument(permuted_pair):
    _, spec_x, _ = permuted_pair
    fx = torch.randn(spec_x.evecs.shape[0], 4, dtype=F64)
    with pytest.raises(ValueError, match="^lam"):
        shapes.fmap_from_features(fx, fx, spec_x, spec_x, lam=float("inf"))
    with pytest.raises(ValueError, match="^queries"):
        shapes.nearest([1.0, 2.0], fx)
    with pytest.raises(ValueError, match="^queries and points"):
        shapes.nearest(fx, fx[:, :2])
    with pytest.raises(ValueError, match="^shift"):
        shapes.nearest(fx, fx, torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="^f "):
        shapes.spectral_coefficients(fx, spec_x.evecs[:5], spec_x.mass)
    with pytest.raises(ValueError, match="^evals_x"):
        shapes.resolvent_mask([1.0], spec_x.evals)
    with pytest.raises(ValueError, match="^evals_y"):
        shapes.laplacian_commutativity_loss(torch.eye(10, dtype=F64), spec_x.evals, [0.0] * 10)
