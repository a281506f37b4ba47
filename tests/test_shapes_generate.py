"""Generated shape pairs (topology, correspondences, deformations) and the geodesic metrics."""

import math

import networkx as nx
import numpy as np
import pytest
import torch

from otcore import shapes


def edge_list(faces: torch.Tensor) -> np.ndarray:
    f = faces.numpy()
    return np.unique(np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1), axis=0)


def lengths(v: torch.Tensor, e: np.ndarray) -> np.ndarray:
    return np.linalg.norm(v.numpy()[e[:, 0]] - v.numpy()[e[:, 1]], axis=1)


@pytest.mark.parametrize(("surface", "euler"), [("sphere", 2), ("capsule", 2), ("torus", 0)])
def test_meshes_are_closed_oriented_manifolds(surface, euler):
    vertices, faces, _ = shapes.canonical_mesh(surface, n_vertices=300, seed=7)
    f = faces.numpy()
    directed = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    # every directed edge once, and its reverse too: closed, manifold, consistently oriented
    assert len(np.unique(directed, axis=0)) == len(directed)
    assert set(map(tuple, directed)) == set(map(tuple, directed[:, ::-1]))
    assert vertices.shape[0] - len(edge_list(faces)) + len(f) == euler
    # outward: the enclosed volume (divergence theorem) is positive
    p = vertices.numpy()[f]
    assert np.einsum("ij,ij->i", p[:, 0], np.cross(p[:, 1], p[:, 2])).sum() > 0


def test_shuffled_rigid_pair_is_an_exact_correspondence():
    pair = shapes.make_pair("torus", n_vertices=200, deformation="none", remesh=False, seed=1)
    corr = pair.correspondence
    assert sorted(corr.tolist()) == list(range(pair.vertices_x.shape[0]))
    def distances(v):
        return (v[:, None] - v[None]).norm(dim=-1)

    torch.testing.assert_close(distances(pair.vertices_y), distances(pair.vertices_x[corr]), atol=1e-12, rtol=0)
    assert {tuple(sorted(t)) for t in corr[pair.faces_y].tolist()} == {tuple(sorted(t)) for t in pair.faces_x.tolist()}


def test_remeshed_correspondence_is_the_nearest_rest_vertex():
    pair = shapes.make_pair("capsule", n_vertices=400, deformation="bend", seed=2)
    assert pair.vertices_y.shape[0] != pair.vertices_x.shape[0]
    nearest = torch.cdist(pair.rest_y, pair.rest_x).argmin(1)
    assert torch.equal(pair.correspondence, nearest)
    gap = (pair.rest_y - pair.rest_x[pair.correspondence]).norm(dim=1)
    assert float(gap.max()) <= lengths(pair.rest_x, edge_list(pair.faces_x)).max()


@pytest.mark.parametrize("angle", [0.5, math.pi / 2])
def test_bend_is_near_isometric(angle):
    """Bending z into an arc of radius R scales lengths along z by (R - x) / R at most."""
    pair = shapes.make_pair("capsule", n_vertices=500, deformation="bend", strength=angle, remesh=False,
                            bumps=False, seed=3)
    corr = pair.correspondence
    e = edge_list(pair.faces_y)
    ratio = lengths(pair.vertices_y, e) / lengths(pair.vertices_x[corr], e)
    rest = pair.vertices_x[corr]
    radius = float(rest[:, 2].max() - rest[:, 2].min()) / angle
    bound = float(rest[:, 0].abs().max()) / radius
    assert np.abs(ratio - 1).max() <= bound * 1.05
    # a straight segment on the axis becomes an arc of the same length and radius R
    t = torch.linspace(-1, 1, 201, dtype=torch.float64)
    axis = shapes.bend(torch.stack([0 * t, 0 * t, t], 1), radius=radius)
    assert abs(float((axis[1:] - axis[:-1]).norm(dim=1).sum()) - 2) < 1e-4
    torch.testing.assert_close((axis[:, [0, 2]] - torch.tensor([radius, 0.0], dtype=torch.float64)).norm(dim=1),
                               torch.full((201,), radius, dtype=torch.float64))


def test_stretch_is_not_isometric():
    pair = shapes.make_pair("capsule", n_vertices=300, deformation="stretch", strength=0.4, remesh=False, seed=4)
    e = edge_list(pair.faces_y)
    ratio = lengths(pair.vertices_y, e) / lengths(pair.vertices_x[pair.correspondence], e)
    assert np.abs(ratio - 1).max() > 0.3


def test_geodesic_distances_match_networkx():
    vertices, faces, _ = shapes.canonical_mesh("torus", n_vertices=150, seed=6)
    graph = nx.Graph()
    for i, j in edge_list(faces):
        graph.add_edge(int(i), int(j), weight=float((vertices[i] - vertices[j]).norm()))
    sources = torch.tensor([0, 17, 99])
    ours = shapes.geodesic_distances(vertices, faces, sources)
    for row, s in zip(ours, sources.tolist()):
        ref = nx.single_source_dijkstra_path_length(graph, s)
        np.testing.assert_allclose(row.numpy(), [ref[i] for i in range(len(vertices))], rtol=1e-12)


def test_geodesic_error_zero_for_truth_and_normalised():
    pair = shapes.make_pair("capsule", n_vertices=300, seed=8)
    vx, fx, corr = pair.vertices_x, pair.faces_x, pair.correspondence
    assert float(shapes.geodesic_error(vx, fx, corr, corr).abs().max()) == 0.0
    wrong = torch.roll(corr, 5)
    full = shapes.geodesic_distances(vx, fx)
    area = 0.5 * torch.linalg.cross(vx[fx[:, 1]] - vx[fx[:, 0]], vx[fx[:, 2]] - vx[fx[:, 0]]).norm(dim=1).sum()
    torch.testing.assert_close(shapes.geodesic_error(vx, fx, wrong, corr), full[corr, wrong] / area.sqrt())
    torch.testing.assert_close(shapes.geodesic_error(vx, fx, wrong, corr, normalise=False), full[corr, wrong])


def test_pck_curve():
    errors = torch.tensor([0.0, 0.01, 0.02, 0.05, 0.2], dtype=torch.float64)
    t, pck = shapes.pck_curve(errors)
    assert t.shape == pck.shape == (40,) and float(t[0]) == 0 and abs(float(t[-1]) - 0.1) < 1e-15
    np.testing.assert_allclose(pck.numpy(), [(errors.numpy() <= x).mean() for x in t.numpy()])
    _, custom = shapes.pck_curve(errors, torch.tensor([0.015, 0.5], dtype=torch.float64))
    np.testing.assert_allclose(custom.numpy(), [0.4, 1.0])


def test_bad_inputs_name_the_argument():
    vertices, faces, _ = shapes.canonical_mesh("sphere", n_vertices=50, seed=0)
    with pytest.raises(ValueError, match="^surface"):
        shapes.make_pair("cube")
    with pytest.raises(ValueError, match="^deformation"):
        shapes.make_pair("sphere", deformation="twist")
    with pytest.raises(ValueError, match="^n_vertices"):
        shapes.canonical_mesh("sphere", n_vertices=5)
    with pytest.raises(ValueError, match="^strength"):
        shapes.make_pair("sphere", n_vertices=50, deformation="stretch", strength=1.5)
    with pytest.raises(ValueError, match="^radius"):
        shapes.bend(vertices, radius=0.0)
    idx = torch.arange(10)
    with pytest.raises(ValueError, match="^truth"):
        shapes.geodesic_error(vertices, faces, idx, idx[:5])
    with pytest.raises(ValueError, match="^pointmap"):
        shapes.geodesic_error(vertices, faces, idx + 1000, idx)
    with pytest.raises(ValueError, match="^sources"):
        shapes.geodesic_distances(vertices, faces, idx.double())
    with pytest.raises(ValueError, match="^errors"):
        shapes.pck_curve(torch.tensor([-1.0]))


def test_deformations_validate_their_inputs():
    vertices, _, _ = shapes.canonical_mesh("capsule", n_vertices=50, seed=0)
    with pytest.raises(ValueError, match="^axis"):
        shapes.stretch(vertices, strength=0.3, axis=5)
    with pytest.raises(ValueError, match="^vertices"):
        shapes.stretch(torch.zeros(5, 3, dtype=torch.float64), strength=0.3)
    with pytest.raises(ValueError, match="^vertices"):
        shapes.bend(vertices[:, :2], radius=1.0)
    with pytest.raises(ValueError, match="^vertices"):
        shapes.bend(vertices.tolist(), radius=1.0)
    with pytest.raises(ValueError, match="^radius"):
        shapes.bend(vertices, radius=float("inf"))
    with pytest.raises(ValueError, match="^toward"):
        shapes.bend(vertices, radius=1.0, axis=1, toward=1)
    with pytest.raises(ValueError, match="^dtype"):
        shapes.canonical_mesh("sphere", n_vertices=30, dtype=torch.int64)
    with pytest.raises(ValueError, match="^strength"):
        shapes.make_pair("sphere", n_vertices=30, deformation="none", strength=0.5)
    # dtype kept
    assert shapes.bend(vertices.float(), radius=2.0).dtype == torch.float32
    assert shapes.stretch(vertices.float(), strength=0.2).dtype == torch.float32
