"""Laplace-Beltrami bases against a dense float64 generalised eigensolver and closed forms."""

import numpy as np
import pytest
import scipy.linalg
import torch

from otcore import shapes


def dense_cotangent(v: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense stiffness and lumped mass written from angles (arccos), independently of otcore."""
    n = len(v)
    L, m = np.zeros((n, n)), np.zeros(n)
    for tri in f:
        p = v[tri]
        area = 0.5 * np.linalg.norm(np.cross(p[1] - p[0], p[2] - p[0]))
        m[tri] += area / 3
        for c in range(3):
            i, j, o = tri[(c + 1) % 3], tri[(c + 2) % 3], tri[c]
            u, w = v[i] - v[o], v[j] - v[o]
            angle = np.arccos(np.dot(u, w) / (np.linalg.norm(u) * np.linalg.norm(w)))
            weight = 0.5 / np.tan(angle)
            L[i, j] -= weight
            L[j, i] -= weight
            L[i, i] += weight
            L[j, j] += weight
    return L, m


@pytest.mark.parametrize("surface", ["capsule", "torus"])
def test_eigenpairs_match_dense_solver(surface):
    vertices, faces, _ = shapes.canonical_mesh(surface, n_vertices=160, seed=3)
    k = 12
    evals, evecs, mass = shapes.laplacian_basis(vertices, faces, k)
    L, m = dense_cotangent(vertices.numpy(), faces.numpy())
    ref_vals, ref_vecs = scipy.linalg.eigh(L, np.diag(m))
    np.testing.assert_allclose(mass.numpy(), m, rtol=1e-12)
    np.testing.assert_allclose(evals.numpy(), np.maximum(ref_vals[:k], 0), rtol=1e-8, atol=1e-10)
    # the span of the first k eigenvectors (the reference has a gap after the k-th eigenvalue)
    assert ref_vals[k] - ref_vals[k - 1] > 1e-3 * ref_vals[k]
    P, P_ref = evecs.numpy() @ evecs.numpy().T * m, ref_vecs[:, :k] @ ref_vecs[:, :k].T * m
    np.testing.assert_allclose(P, P_ref, atol=1e-7)
    # isolated eigenvalues: the vectors themselves, up to sign
    gaps = np.minimum(np.diff(ref_vals[:k + 1], prepend=-np.inf)[:k], np.diff(ref_vals[:k + 1]))
    for i in np.flatnonzero(gaps > 1e-4 * ref_vals[k]):
        assert abs(abs(evecs[:, i].numpy() @ (m * ref_vecs[:, i])) - 1) < 1e-8


def test_mass_orthonormal_and_constant_kernel():
    vertices, faces, _ = shapes.canonical_mesh("sphere", n_vertices=400, seed=1)
    evals, evecs, mass = shapes.laplacian_basis(vertices, faces, 20)
    gram = evecs.T @ (mass[:, None] * evecs)
    torch.testing.assert_close(gram, torch.eye(20, dtype=torch.float64), atol=1e-11, rtol=0)
    area = 0.5 * torch.linalg.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]],
                                    vertices[faces[:, 2]] - vertices[faces[:, 0]]).norm(dim=1).sum()
    torch.testing.assert_close(mass.sum(), area, rtol=1e-12, atol=0)
    assert abs(float(evals[0])) < 1e-9
    torch.testing.assert_close(evecs[:, 0], torch.full_like(evecs[:, 0], float(area) ** -0.5), rtol=1e-7, atol=0)
    assert bool((evals.diff() >= 0).all())


def test_unit_sphere_spectrum_closed_form():
    """Eigenvalues of the unit sphere: l (l + 1) with multiplicity 2 l + 1."""
    vertices, faces, _ = shapes.canonical_mesh("sphere", n_vertices=2500, seed=0, bumps=False)
    evals, _, mass = shapes.laplacian_basis(vertices, faces, 9)
    exact = torch.tensor([0, 2, 2, 2, 6, 6, 6, 6, 6], dtype=torch.float64)
    torch.testing.assert_close(evals[1:], exact[1:], rtol=1e-2, atol=0)
    assert abs(float(mass.sum()) - 4 * np.pi) < 1e-2 * 4 * np.pi


def test_dtype_and_stiffness_rows():
    vertices, faces, _ = shapes.canonical_mesh("capsule", n_vertices=100, seed=2)
    evals, evecs, mass = shapes.laplacian_basis(vertices.float(), faces, 5)
    assert evals.dtype == evecs.dtype == mass.dtype == torch.float32 and evecs.shape == (vertices.shape[0], 5)
    W, m = shapes.cotangent_laplacian(vertices, faces)
    L, m_ref = dense_cotangent(vertices.numpy(), faces.numpy())
    np.testing.assert_allclose(W.toarray(), L, atol=1e-10)
    np.testing.assert_allclose(m, m_ref, rtol=1e-12)


def test_bad_inputs_name_the_argument():
    vertices, faces, _ = shapes.canonical_mesh("capsule", n_vertices=60, seed=0)
    with pytest.raises(ValueError, match="^k"):
        shapes.laplacian_basis(vertices, faces, vertices.shape[0])
    with pytest.raises(ValueError, match="^k"):
        shapes.laplacian_basis(vertices, faces, 0)
    with pytest.raises(ValueError, match="^vertices"):
        shapes.laplacian_basis(vertices[:, :2], faces, 4)
    bad = vertices.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="^vertices"):
        shapes.laplacian_basis(bad, faces, 4)
    with pytest.raises(ValueError, match="^faces"):
        shapes.laplacian_basis(vertices, faces + 1, 4)
    with pytest.raises(ValueError, match="^faces"):
        shapes.laplacian_basis(vertices, faces.double(), 4)
    with pytest.raises(ValueError, match="^faces"):  # an unreferenced vertex
        shapes.laplacian_basis(torch.cat([vertices, vertices[:1] + 5]), faces, 4)
