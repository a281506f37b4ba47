"""Triangle meshes as (vertices, faces) pairs: the checks and the few quantities every module needs."""

from __future__ import annotations

import numpy as np
import torch

from otcore._validation import check_finite


def check_vertices(vertices, minimum: int = 1) -> None:
    """Raise ``ValueError`` naming ``vertices`` unless it is a finite floating (n, 3) tensor, n >= minimum."""
    if not torch.is_tensor(vertices) or not vertices.is_floating_point():
        raise ValueError(f"vertices must be a floating torch.Tensor, got {getattr(vertices, 'dtype', type(vertices))}")
    if vertices.dim() != 2 or vertices.shape[1] != 3 or vertices.shape[0] < minimum:
        raise ValueError(f"vertices must have shape (n, 3) with n >= {minimum}, got {tuple(vertices.shape)}")
    check_finite("vertices", vertices)


def check_mesh(vertices: torch.Tensor, faces: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Validate a triangle mesh; return float64 (n, 3) vertices and int64 (f, 3) faces as NumPy.

    Raises ``ValueError`` naming ``vertices`` (not a finite floating (n, 3) tensor, n >= 3) or
    ``faces`` (not an integer (f, 3) tensor, f >= 1, with indices in [0, n), no repeated index
    within a face, no zero-area face, every vertex in some face).
    """
    check_vertices(vertices, minimum=3)
    if not torch.is_tensor(faces) or faces.is_floating_point() or faces.is_complex() or faces.dtype == torch.bool:
        raise ValueError(f"faces must be an integer torch.Tensor, got {getattr(faces, 'dtype', type(faces))}")
    if faces.dim() != 2 or faces.shape[1] != 3 or faces.shape[0] == 0:
        raise ValueError(f"faces must have shape (f, 3) with f >= 1 (triangles), got {tuple(faces.shape)}")
    n = vertices.shape[0]
    v = vertices.detach().cpu().double().numpy()
    f = faces.detach().cpu().long().numpy()
    if f.min() < 0 or f.max() >= n:
        raise ValueError(f"faces holds vertex indices outside [0, {n}): min {f.min()}, max {f.max()}")
    if ((f[:, 0] == f[:, 1]) | (f[:, 1] == f[:, 2]) | (f[:, 0] == f[:, 2])).any():
        raise ValueError("faces holds triangles that repeat a vertex (degenerate faces)")
    if (face_areas(v, f) <= 0).any():
        raise ValueError(f"faces holds {(face_areas(v, f) <= 0).sum()} triangle(s) of zero area")
    used = np.zeros(n, dtype=bool)
    used[f.ravel()] = True
    if not used.all():
        raise ValueError(f"faces leaves {(~used).sum()} vertex/vertices in no triangle (e.g. vertex "
                         f"{np.flatnonzero(~used)[0]}); remove unreferenced vertices first")
    return v, f


def face_areas(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    """(f,) triangle areas of the float64 mesh (v, f)."""
    return 0.5 * np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1)


def edges(f: np.ndarray) -> np.ndarray:
    """(e, 2) unique undirected edges (i < j) of the faces (f, 3)."""
    pairs = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    return np.unique(np.sort(pairs, axis=1), axis=0)
