"""Synthetic shape pairs with known dense correspondences, for tests, examples and benchmarks.

Public shape-matching data sets cannot always be downloaded; these pairs stand in for them. A
pair is two triangulations ("remeshings") of one canonical surface, each deformed on its own:

- **Canonical surfaces**: ``"sphere"`` (unit sphere), ``"capsule"`` (a cylinder of radius 0.35
  and length 2 closed by hemispheres, axis z) and ``"torus"`` (radii 1 and 0.4, axis z), each
  with a few smooth bumps pushed along the normal at fixed asymmetric places, so that intrinsic
  descriptors can tell symmetric points apart (``bumps=False`` keeps the bare surface).
- **Remeshing**: the sphere and capsule are triangulated by the convex hull of a jittered
  Fibonacci point set on the sphere (area-uniform for the capsule profile) mapped onto the
  surface; the torus by a periodic Delaunay triangulation of a jittered grid of its (u, v)
  domain. Vertex counts, jitter and phases depend on the seed, so the two shapes of a pair have
  different vertices and connectivity.
- **Deformations** (``bend``, ``stretch``): a bend of the long axis into a circular arc (near
  isometric: lengths across the axis are kept, lengths along it scaled by (R - t) / R at a
  distance t from the axis, R the bend radius) and a smooth non-isometric stretch; then a random
  rigid motion.

The ground-truth map sends each vertex of y to the vertex of x nearest to it on the canonical
surface before bumps and deformations (exact when ``remesh=False``: y is then a vertex
permutation of x's mesh).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.spatial
import torch

from otcore._validation import _real, check_max_iter, check_positive
from otcore.shapes._mesh import check_vertices

SURFACES = ("sphere", "capsule", "torus")
DEFORMATIONS = ("none", "bend", "stretch")
CAPSULE_RADIUS, CAPSULE_HALF_LENGTH = 0.35, 1.0
TORUS_RADII = (1.0, 0.4)
#: (centre on the bare surface, given as the point nearest to it, amplitude, width) of the bumps.
BUMPS = {
    "sphere": [((0.0, 0.0, 1.0), 0.35, 0.3), ((0.8, 0.0, 0.3), 0.2, 0.25), ((-0.3, 0.7, -0.6), 0.15, 0.3)],
    "capsule": [((0.0, 0.0, 1.35), 0.3, 0.3), ((0.35, 0.0, 0.5), 0.35, 0.18), ((-0.3, 0.2, -0.6), 0.25, 0.2),
                ((0.0, -0.35, -0.1), 0.2, 0.15)],
    "torus": [((1.4, 0.0, 0.0), 0.2, 0.25), ((-0.5, 0.9, 0.3), 0.15, 0.2), ((0.0, -1.0, -0.4), 0.1, 0.2)],
}


@dataclass(frozen=True)
class ShapePair:
    """Two meshes of one canonical surface and the true map between their vertices.

    Attributes:
        vertices_x: (n_x, 3) positions of shape x (the canonical surface with bumps,
            undeformed).
        faces_x: (f_x, 3) int64 triangles of shape x.
        vertices_y: (n_y, 3) positions of shape y (deformed, moved rigidly).
        faces_y: (f_y, 3) int64 triangles of shape y.
        correspondence: (n_y,) int64, the vertex of x that each vertex of y corresponds to.
        rest_x: (n_x, 3) positions of x's vertices on the bare canonical surface (no bumps, no
            deformation), where the correspondence was computed.
        rest_y: (n_y, 3) positions of y's vertices on the bare canonical surface, as ``rest_x``.
    """

    vertices_x: torch.Tensor
    faces_x: torch.Tensor
    vertices_y: torch.Tensor
    faces_y: torch.Tensor
    correspondence: torch.Tensor
    rest_x: torch.Tensor
    rest_y: torch.Tensor


# ------------------------------------------------------------------------------- canonical meshes
def _profile(surface: str, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rho, z) of the meridian of a surface of revolution at arc length s in [0, length]."""
    if surface == "sphere":
        return np.sin(s), -np.cos(s)
    r, h = CAPSULE_RADIUS, CAPSULE_HALF_LENGTH
    cap = math.pi * r / 2
    alpha = np.clip(s, 0, cap) / r + np.clip(s - cap - 2 * h, 0, cap) / r   # angle turned on the caps
    z = np.where(s < cap, -h - r * np.cos(alpha), np.where(s <= cap + 2 * h, s - cap - h, h + r * np.sin(alpha - math.pi / 2)))
    return r * np.sin(np.minimum(alpha, math.pi)), z


def _revolution_mesh(surface: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A genus-0 surface of revolution: Fibonacci points spread uniformly in its area, the convex
    hull of their images on the unit sphere as connectivity."""
    length = math.pi if surface == "sphere" else math.pi * CAPSULE_RADIUS + 2 * CAPSULE_HALF_LENGTH
    grid = np.linspace(0, length, 4097)
    rho, _ = _profile(surface, grid)
    area = np.concatenate([[0], np.cumsum((rho[1:] + rho[:-1]) / 2 * np.diff(grid))])
    levels = (np.arange(n) + 0.5 + rng.uniform(-0.3, 0.3, n)) / n
    s = np.interp(np.clip(levels, 0.1 / n, 1 - 0.1 / n) * area[-1], area, grid)
    theta = math.pi * (3 - math.sqrt(5)) * np.arange(n) + rng.uniform(0, 2 * math.pi)
    phi = math.pi * s / length
    sphere = np.stack([np.sin(phi) * np.cos(theta), np.sin(phi) * np.sin(theta), -np.cos(phi)], 1)
    faces = scipy.spatial.ConvexHull(sphere).simplices.astype(np.int64)
    rho, z = _profile(surface, s)
    points = np.stack([rho * np.cos(theta), rho * np.sin(theta), z], 1)
    return points, _orient_outward(sphere, faces)


def _orient_outward(sphere: np.ndarray, faces: np.ndarray) -> np.ndarray:
    normal = np.cross(sphere[faces[:, 1]] - sphere[faces[:, 0]], sphere[faces[:, 2]] - sphere[faces[:, 0]])
    flip = (normal * sphere[faces].mean(1)).sum(1) < 0
    faces[flip] = faces[flip][:, ::-1]
    return faces


def _torus_mesh(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A jittered grid of the torus' (u, v) domain, triangulated by a periodic Delaunay
    triangulation of the flat rectangle 2 pi R x 2 pi r (3 x 3 tiling, triangles kept by centroid)."""
    big, small = TORUS_RADII
    nv = max(3, round(math.sqrt(n * small / big)))
    nu = max(3, round(n / nv))
    u0, v0 = np.meshgrid((np.arange(nu) + 0.5) / nu, (np.arange(nv) + 0.5) / nv, indexing="ij")
    uv = np.stack([u0.ravel() + rng.uniform(-0.25, 0.25, nu * nv) / nu,
                   v0.ravel() + rng.uniform(-0.25, 0.25, nu * nv) / nv], 1) % 1.0
    scale = np.array([2 * math.pi * big, 2 * math.pi * small])
    count = len(uv)
    tiles = np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)], dtype=np.float64)
    tiled = ((uv[None] + tiles[:, None]) * scale).reshape(-1, 2)
    tri = scipy.spatial.Delaunay(tiled).simplices
    centroid = tiled[tri].mean(1) / scale
    keep = ((centroid >= 0) & (centroid < 1)).all(1)
    faces = (tri[keep] % count).astype(np.int64)
    u, v = 2 * math.pi * uv[:, 0], 2 * math.pi * uv[:, 1]
    points = np.stack([(big + small * np.cos(v)) * np.cos(u), (big + small * np.cos(v)) * np.sin(u),
                       small * np.sin(v)], 1)
    ab, ac = points[faces[:, 1]] - points[faces[:, 0]], points[faces[:, 2]] - points[faces[:, 0]]
    centre = points[faces].mean(1)
    axis_point = np.stack([centre[:, 0], centre[:, 1], 0 * centre[:, 2]], 1)
    axis_point = big * axis_point / np.linalg.norm(axis_point, axis=1, keepdims=True)
    flip = (np.cross(ab, ac) * (centre - axis_point)).sum(1) < 0
    faces[flip] = faces[flip][:, ::-1]
    return points, faces


def vertex_normals(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    """(n, 3) unit vertex normals, the area-weighted means of the (oriented) face normals."""
    face_normal = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])  # length 2 x area
    normal = np.zeros_like(v)
    for corner in range(3):
        np.add.at(normal, f[:, corner], face_normal)
    return normal / np.linalg.norm(normal, axis=1, keepdims=True)


def _bumped(surface: str, v: np.ndarray, f: np.ndarray) -> np.ndarray:
    height = np.zeros(len(v))
    for centre, amplitude, width in BUMPS[surface]:
        height += amplitude * np.exp(-((v - np.asarray(centre)) ** 2).sum(1) / (2 * width**2))
    return v + height[:, None] * vertex_normals(v, f)


def canonical_mesh(surface: str = "capsule", *, n_vertices: int = 1000, seed: int = 0,
                   bumps: bool = True, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One triangulation of a canonical surface (module docstring).

    Args:
        surface: ``"sphere"``, ``"capsule"`` or ``"torus"``.
        n_vertices: approximate number of vertices (>= 20; the torus rounds to a grid).
        seed: chooses the jitter and phase of the vertices (the remeshing).
        bumps: add the surface's bumps.
        dtype: floating dtype of the positions.

    Returns:
        ``(vertices (n, 3), faces (f, 3) int64, rest (n, 3))``, rest the positions on the bare
        surface; faces oriented with outward normals.

    Raises:
        ValueError: an unknown ``surface``, ``n_vertices`` < 20, a bad ``seed`` or ``dtype``.
    """
    if surface not in SURFACES:
        raise ValueError(f"surface must be one of {SURFACES}, got {surface!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    n = check_max_iter("n_vertices", n_vertices, minimum=20)
    rng = np.random.default_rng(check_max_iter("seed", seed, minimum=0))
    rest, faces = _torus_mesh(n, rng) if surface == "torus" else _revolution_mesh(surface, n, rng)
    vertices = _bumped(surface, rest, faces) if bumps else rest
    return (torch.from_numpy(vertices).to(dtype), torch.from_numpy(faces),
            torch.from_numpy(rest).to(dtype))


# ------------------------------------------------------------------------------- deformations
def _check_axis(name: str, value) -> int:
    if isinstance(value, bool) or value not in (0, 1, 2):
        raise ValueError(f"{name} must be a coordinate index 0, 1 or 2, got {value!r}")
    return int(value)


def bend(vertices: torch.Tensor, *, radius: float, axis: int = 2, toward: int = 0) -> torch.Tensor:
    """Bend the line ``axis`` into a circle of radius ``radius`` curving towards ``toward``.

    With t the coordinate along ``axis`` and x along ``toward``, the point goes to
    ``x' = R - (R - x) cos(t / R)``, ``t' = (R - x) sin(t / R)`` (other coordinate kept): the axis
    keeps its length, segments across it keep theirs, and lengths along it are scaled by
    (R - x) / R, so the map is near isometric for bodies thin against R.

    Args:
        vertices: (n, 3) positions.
        radius: R (> 0).
        axis: the coordinate t along the line that is bent (0..2, different from ``toward``).
        toward: the coordinate x the line curves towards (0..2, different from ``axis``).

    Returns:
        (n, 3) bent positions, in the dtype and on the device of ``vertices``.

    Raises:
        ValueError: ``vertices`` not a finite floating (n, 3) tensor, ``radius`` not finite and
            > 0, ``axis`` / ``toward`` not two different coordinates in 0..2.
    """
    check_vertices(vertices)
    radius = check_positive("radius", radius)
    _check_axis("axis", axis)
    if _check_axis("toward", toward) == axis:
        raise ValueError(f"toward must differ from axis, got axis={axis!r}, toward={toward!r}")
    out = vertices.clone()
    t, x = vertices[:, axis], vertices[:, toward]
    out[:, toward] = radius - (radius - x) * torch.cos(t / radius)
    out[:, axis] = (radius - x) * torch.sin(t / radius)
    return out


def stretch(vertices: torch.Tensor, *, strength: float, axis: int = 2) -> torch.Tensor:
    """A smooth non-isometric stretch: the coordinates across ``axis`` scaled by
    ``1 + strength * t / max|t|`` (one end thickened, the other thinned) and ``axis`` by
    ``1 + strength / 2``; |strength| < 1.

    Args:
        vertices: (n, 3) positions, not all on the plane ``t = 0``.
        strength: in (-1, 1).
        axis: the coordinate t (0..2).

    Returns:
        (n, 3) stretched positions, in the dtype and on the device of ``vertices``.

    Raises:
        ValueError: ``vertices`` not a finite floating (n, 3) tensor with some t != 0,
            ``strength`` outside (-1, 1), ``axis`` not in 0..2.
    """
    check_vertices(vertices)
    strength = _real("strength", strength, "a number in (-1, 1)")
    if not abs(strength) < 1:
        raise ValueError(f"strength must lie in (-1, 1), got {strength!r}")
    t = vertices[:, _check_axis("axis", axis)]
    extent = t.abs().max()
    if not bool(extent > 0):
        raise ValueError(f"vertices all have coordinate {axis} (the axis) equal to 0: nothing to stretch along")
    factor = 1 + strength * t / extent
    out = vertices * factor.unsqueeze(1)
    out[:, axis] = t * (1 + strength / 2)
    return out


def _rigid(v: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    q = q if np.linalg.det(q) > 0 else -q
    return v @ torch.from_numpy(q.T).to(v) + torch.from_numpy(rng.normal(0, 0.5, 3)).to(v)


def make_pair(surface: str = "capsule", *, n_vertices: int = 1000, deformation: str = "bend",
              strength: float | None = None, remesh: bool = True, bumps: bool = True, seed: int = 0,
              dtype: torch.dtype = torch.float64) -> ShapePair:
    """A pair of meshes of one canonical surface with a known dense correspondence.

    Shape x is the canonical mesh (seed ``2 seed``). Shape y is another remeshing (seed
    ``2 seed + 1``, about 10 % more or fewer vertices) or, with ``remesh=False``, x's own mesh
    with its vertices shuffled; then deformed and moved by a random rigid motion.

    Args:
        surface: ``"sphere"``, ``"capsule"`` or ``"torus"``.
        n_vertices: approximate number of vertices of x.
        deformation: ``"none"`` (rigid motion only), ``"bend"`` (near-isometric: the long axis,
            z for sphere and capsule, x for the torus, bent by |``strength``| radians over the
            shape's extent; default pi / 2) or ``"stretch"`` (non-isometric, ``strength`` in
            (-1, 1); default 0.4).
        strength: the deformation's size (see above); None with ``deformation="none"``.
        remesh: triangulate y anew (True) or shuffle the vertices of x's mesh (False).
        bumps: add the canonical surface's bumps (they break its symmetries).
        seed: the pair's seed (remeshing, the vertex shuffle, rigid motion).
        dtype: floating dtype of the positions.

    Returns:
        ``ShapePair``.

    Raises:
        ValueError: unknown surface or deformation, bad sizes, strengths or seeds.
    """
    if deformation not in DEFORMATIONS:
        raise ValueError(f"deformation must be one of {DEFORMATIONS}, got {deformation!r}")
    if deformation == "none" and strength is not None:
        raise ValueError(f"strength is the size of a bend or stretch; deformation='none' takes none, got {strength!r}")
    seed = check_max_iter("seed", seed, minimum=0)
    vx, fx, rx = canonical_mesh(surface, n_vertices=n_vertices, seed=2 * seed, bumps=bumps, dtype=dtype)
    rng = np.random.default_rng(2 * seed + 1)
    if remesh:
        n_y = round(n_vertices * rng.uniform(0.9, 1.1))
        vy, fy, ry = canonical_mesh(surface, n_vertices=n_y, seed=2 * seed + 1, bumps=bumps, dtype=dtype)
        tree = scipy.spatial.cKDTree(rx.numpy().astype(np.float64))
        corr = torch.from_numpy(tree.query(ry.numpy().astype(np.float64))[1].astype(np.int64))
    else:
        corr = torch.from_numpy(rng.permutation(vx.shape[0]).astype(np.int64))
        inverse = torch.empty_like(corr)
        inverse[corr] = torch.arange(len(corr))
        vy, fy, ry = vx[corr], inverse[fx], rx[corr]
    axis, toward = (0, 2) if surface == "torus" else (2, 0)
    if deformation == "bend":
        angle = _real("strength", math.pi / 2 if strength is None else strength, "an angle in radians")
        if not 0 < abs(angle) <= 2 * math.pi:
            raise ValueError(f"strength (the bend angle) must lie in (0, 2 pi] in absolute value, got {strength!r}")
        extent = float(vy[:, axis].max() - vy[:, axis].min())
        vy = bend(vy, radius=extent / abs(angle), axis=axis, toward=toward)
    elif deformation == "stretch":
        vy = stretch(vy, strength=0.4 if strength is None else strength, axis=axis)
    vy = _rigid(vy, rng)
    return ShapePair(vertices_x=vx, faces_x=fx, vertices_y=vy, faces_y=fy, correspondence=corr, rest_x=rx, rest_y=ry)
