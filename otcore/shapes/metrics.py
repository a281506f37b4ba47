"""Evaluating correspondences: geodesic errors normalised by sqrt(area), and PCK curves.

The protocol of the shape-matching benchmarks (FAUST, SCAPE, SHREC'19; the ULRSSM / Le et al.
evaluation code): for a predicted map from the vertices of y to those of x and the ground truth,
the error at a vertex of y is the geodesic distance on x between the predicted and the true
image, divided by sqrt(area of x); papers report the mean x 100. Geodesics are shortest paths in
the edge graph of x weighted by edge lengths (Dijkstra, scipy.sparse.csgraph): an upper bound of
the surface geodesic that converges to it under refinement, and exactly 0 between equal points.

References:
    [1] V. G. Kim, Y. Lipman, T. Funkhouser. Blended intrinsic maps. SIGGRAPH 2011 (geodesic
        errors normalised by sqrt(area), the cumulative curves of correct correspondences).
    [2] D. Cao, P. Roetzer, F. Bernard. Unsupervised learning of robust spectral shape matching.
        SIGGRAPH 2023 (the evaluation code: mean error x 100, PCK on [0, 0.1]).
    [3] E. W. Dijkstra. A note on two problems in connexion with graphs. Numerische Mathematik
        1, 1959.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import torch
from scipy.sparse.csgraph import dijkstra

from otcore.shapes._mesh import check_mesh, edges, face_areas

#: Sources per Dijkstra call of ``geodesic_error`` (bounds memory at CHUNK x n distances).
CHUNK = 512


def _edge_graph(v: np.ndarray, f: np.ndarray) -> scipy.sparse.csr_matrix:
    e = edges(f)
    length = np.linalg.norm(v[e[:, 0]] - v[e[:, 1]], axis=1)
    n = v.shape[0]
    return scipy.sparse.coo_matrix((length, (e[:, 0], e[:, 1])), shape=(n, n)).tocsr()


def geodesic_distances(vertices: torch.Tensor, faces: torch.Tensor, sources: torch.Tensor | None = None) -> torch.Tensor:
    """Shortest-path distances along the edges of a mesh.

    Args:
        vertices: (n, 3) positions.
        faces: (f, 3) integer triangles.
        sources: (s,) integer vertex indices to measure from; None: every vertex (s = n).

    Returns:
        (s, n) distances (inf between disconnected components), in the dtype and on the device
        of ``vertices``. Not differentiable.

    Raises:
        ValueError: a malformed mesh, or ``sources`` not integer indices in [0, n).
    """
    v, f = check_mesh(vertices, faces)
    idx = None if sources is None else _indices("sources", sources, v.shape[0])
    dist = dijkstra(_edge_graph(v, f), directed=False, indices=idx)
    return torch.from_numpy(np.atleast_2d(dist)).to(dtype=vertices.dtype, device=vertices.device)


def _indices(name: str, t, n: int, length: int | None = None) -> np.ndarray:
    if not torch.is_tensor(t) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D integer torch.Tensor of vertex indices, "
                         f"got {getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name} has length {t.shape[0]}, expected {length}")
    idx = t.detach().cpu().long().numpy()
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"{name} holds indices outside [0, {n}): min {idx.min()}, max {idx.max()}")
    return idx


def geodesic_error(vertices: torch.Tensor, faces: torch.Tensor, pointmap: torch.Tensor, truth: torch.Tensor,
                   *, normalise: bool = True) -> torch.Tensor:
    """Per-point geodesic error of a map into the mesh (vertices, faces) of shape x.

    ``error_i = d_x(pointmap_i, truth_i) / sqrt(area_x)``, with d_x the edge-graph geodesic of x
    (see the module docstring). Typically i runs over the vertices of the other shape y, and
    ``pointmap`` / ``truth`` are the predicted and true images in x. The mean of the result
    (x 100) is the number papers report.

    Args:
        vertices: (n, 3) positions of x.
        faces: (f, 3) triangles of x.
        pointmap: (s,) integer vertex indices of x, the predicted images.
        truth: (s,) integer vertex indices of x, the true images.
        normalise: divide by sqrt(area of x) (the benchmarks' convention); False: raw lengths.

    Returns:
        (s,) errors >= 0 in the dtype and on the device of ``vertices`` (0 where the two agree).

    Raises:
        ValueError: a malformed mesh; ``pointmap`` or ``truth`` not 1-D integer tensors of
            indices in [0, n), or of different lengths.
    """
    v, f = check_mesh(vertices, faces)
    n = v.shape[0]
    pred = _indices("pointmap", pointmap, n)
    true = _indices("truth", truth, n, length=pred.shape[0])
    graph = _edge_graph(v, f)
    sources, inverse = np.unique(true, return_inverse=True)
    err = np.empty(pred.shape[0])
    for start in range(0, len(sources), CHUNK):
        dist = dijkstra(graph, directed=False, indices=sources[start:start + CHUNK])
        rows = (inverse >= start) & (inverse < start + CHUNK)
        err[rows] = dist[inverse[rows] - start, pred[rows]]
    if normalise:
        err = err / np.sqrt(face_areas(v, f).sum())
    return torch.from_numpy(err).to(dtype=vertices.dtype, device=vertices.device)


def pck_curve(errors: torch.Tensor, thresholds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentage of correct keypoints: the fraction of errors <= each threshold.

    Args:
        errors: (s,) non-negative errors (e.g. ``geodesic_error``).
        thresholds: (t,) increasing thresholds; None: 40 values evenly spaced in [0, 0.1] (the
            benchmarks' range for errors normalised by sqrt(area)).

    Returns:
        ``(thresholds, pck)``, both (t,) in the dtype of ``errors``; pck in [0, 1], non-decreasing.
        ``torch.trapezoid(pck, thresholds) / (thresholds[-1] - thresholds[0])`` is the usual AUC.

    Raises:
        ValueError: ``errors`` not a non-empty 1-D floating tensor of finite values >= 0, or
            ``thresholds`` not a 1-D non-decreasing floating tensor.
    """
    if not torch.is_tensor(errors) or not errors.is_floating_point() or errors.dim() != 1 or errors.numel() == 0:
        raise ValueError(f"errors must be a non-empty 1-D floating torch.Tensor, got "
                         f"{getattr(errors, 'dtype', type(errors).__name__)} {tuple(getattr(errors, 'shape', ()))}")
    if not bool(torch.isfinite(errors).all()) or bool((errors < 0).any()):
        raise ValueError("errors must be finite and >= 0")
    if thresholds is None:
        thresholds = torch.linspace(0, 0.1, 40, dtype=errors.dtype, device=errors.device)
    elif (not torch.is_tensor(thresholds) or not thresholds.is_floating_point() or thresholds.dim() != 1
          or thresholds.numel() == 0 or bool((thresholds.diff() < 0).any())):
        raise ValueError("thresholds must be a non-empty 1-D floating torch.Tensor in non-decreasing order")
    pck = (errors.unsqueeze(0) <= thresholds.to(errors).unsqueeze(1)).to(errors.dtype).mean(1)
    return thresholds.to(errors), pck
