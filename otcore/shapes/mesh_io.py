"""Reading and writing triangle meshes: OFF, ASCII PLY and Wavefront OBJ.

Enough of each format for the shape-matching data sets (FAUST, SCAPE, SHREC'19, SMAL, DT4D are
distributed as .off / .ply / .obj): vertex positions and polygonal faces, polygons with more than
three corners split into triangle fans; colours, normals, texture coordinates and other
properties are read past and dropped. Writers use 17 significant digits, so float64 vertices
survive a round trip exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from otcore.shapes._mesh import check_mesh

FORMATS = (".off", ".ply", ".obj")


def _format(path) -> tuple[Path, str]:
    if not isinstance(path, (str, Path)):
        raise ValueError(f"path must be a str or pathlib.Path, got {type(path).__name__}")  # noqa: TRY004 (the API contract: ValueError)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"path must end in one of {FORMATS}, got {str(path)!r}")
    return path, suffix


def _fan(polygons: list[list[int]]) -> np.ndarray:
    """(f, 3) triangles of polygons given as vertex lists (fans around the first corner)."""
    tris = [(p[0], p[i], p[i + 1]) for p in polygons for i in range(1, len(p) - 1)]
    return np.asarray(tris, dtype=np.int64).reshape(-1, 3)


def _lines(path: Path) -> list[str]:
    """Non-empty lines of a text file, comments (from '#') removed."""
    out = []
    for line in path.read_text(encoding="latin-1").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def _read_off(path: Path) -> tuple[np.ndarray, list[list[int]]]:
    lines = _lines(path)
    header = lines[0].split() if lines else []
    if not header or not header[0].endswith("OFF"):
        raise ValueError(f"path {str(path)!r}: not an OFF file (the first line must read OFF)")
    counts, body = (header[1:], lines[1:]) if len(header) > 1 else (lines[1].split(), lines[2:])
    nv, nf = int(counts[0]), int(counts[1])
    if len(body) < nv + nf:
        raise ValueError(f"path {str(path)!r}: the header announces {nv} vertices and {nf} faces, "
                         f"the file has {len(body)} lines of data")
    vertices = np.array([[float(t) for t in line.split()[:3]] for line in body[:nv]], dtype=np.float64)
    polygons = []
    for line in body[nv:nv + nf]:
        tokens = line.split()
        polygons.append([int(t) for t in tokens[1:1 + int(tokens[0])]])
    return vertices.reshape(-1, 3), polygons


def _read_ply(path: Path) -> tuple[np.ndarray, list[list[int]]]:
    raw = path.read_bytes()
    end = raw.find(b"end_header")
    if not raw.startswith(b"ply") or end < 0:
        raise ValueError(f"path {str(path)!r}: not a PLY file (no 'ply' magic or no end_header)")
    elements: list[tuple[str, int, list[tuple[str, bool]]]] = []  # (name, count, [(property, is_list)])
    for line in raw[:end].decode("latin-1").splitlines()[1:]:
        tokens = line.split()
        if not tokens:
            continue
        if tokens[0] == "format" and tokens[1] != "ascii":
            raise ValueError(f"path {str(path)!r}: PLY format {tokens[1]!r} is not supported (only ascii); "
                             "convert it, e.g. with meshio or trimesh")
        if tokens[0] == "element":
            elements.append((tokens[1], int(tokens[2]), []))
        elif tokens[0] == "property":
            elements[-1][2].append((tokens[-1], tokens[1] == "list"))
    body = raw[end:].decode("latin-1").splitlines()[1:]
    body = [line for line in body if line.strip()]
    vertices, polygons, row = None, [], 0
    for name, count, props in elements:
        chunk = body[row:row + count]
        if len(chunk) < count:
            raise ValueError(f"path {str(path)!r}: element {name!r} announces {count} rows, the file ends first")
        row += count
        if name == "vertex":
            names = [p for p, _ in props]
            if any(axis not in names for axis in "xyz"):
                raise ValueError(f"path {str(path)!r}: the vertex element has no x, y and z properties")
            cols = [names.index(axis) for axis in "xyz"]
            vertices = np.array([[float(line.split()[c]) for c in cols] for line in chunk], dtype=np.float64)
        elif name == "face":
            for line in chunk:
                tokens, at = line.split(), 0
                for prop, is_list in props:
                    size = int(tokens[at]) if is_list else 0
                    if is_list and prop in ("vertex_indices", "vertex_index"):
                        polygons.append([int(t) for t in tokens[at + 1:at + 1 + size]])
                    at += 1 + size
    if vertices is None:
        raise ValueError(f"path {str(path)!r}: the PLY file has no vertex element")
    return vertices.reshape(-1, 3), polygons


def _read_obj(path: Path) -> tuple[np.ndarray, list[list[int]]]:
    vertices, polygons = [], []
    for line in _lines(path):
        tokens = line.split()
        if tokens[0] == "v":
            vertices.append([float(t) for t in tokens[1:4]])
        elif tokens[0] == "f":
            # "i", "i/t", "i//n" or "i/t/n"; 1-based, negative = relative to the vertices read so far
            idx = [int(t.split("/")[0]) for t in tokens[1:]]
            polygons.append([i - 1 if i > 0 else len(vertices) + i for i in idx])
    return np.asarray(vertices, dtype=np.float64).reshape(-1, 3), polygons


def read_mesh(path, *, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a triangle mesh from an .off, ASCII .ply or .obj file (chosen by the suffix).

    Polygons are split into triangle fans; other data (colours, normals, texture coordinates)
    is skipped.

    Args:
        path: the file (str or ``pathlib.Path``).
        dtype: floating dtype of the vertices.

    Returns:
        ``(vertices, faces)``: (n, 3) positions in ``dtype``, (f, 3) int64 vertex indices (0-based).

    Raises:
        ValueError: an unknown suffix, a malformed or binary file (message names ``path``), or a
            mesh that fails the checks of ``laplacian_basis`` (naming ``vertices`` or ``faces``).
    """
    path, suffix = _format(path)
    reader = {".off": _read_off, ".ply": _read_ply, ".obj": _read_obj}[suffix]
    try:
        v, polygons = reader(path)
    except (IndexError, ValueError) as err:
        if str(err).startswith("path"):
            raise
        raise ValueError(f"path {str(path)!r}: malformed {suffix[1:].upper()} file ({err})") from err
    vertices, faces = torch.from_numpy(v).to(dtype), torch.from_numpy(_fan(polygons))
    check_mesh(vertices, faces)
    return vertices, faces


def write_mesh(path, vertices: torch.Tensor, faces: torch.Tensor) -> None:
    """Write a triangle mesh as .off, ASCII .ply or .obj (chosen by the suffix of ``path``).

    Vertices are written with 17 significant digits (float64 reads back exactly).

    Args:
        path: the file to create or overwrite.
        vertices: (n, 3) positions.
        faces: (f, 3) integer vertex indices (0-based).

    Raises:
        ValueError: an unknown suffix, or a malformed mesh (naming ``vertices`` or ``faces``).
    """
    path, suffix = _format(path)
    v, f = check_mesh(vertices, faces)
    vlines = "\n".join(" ".join(f"{c:.17g}" for c in row) for row in v)
    if suffix == ".off":
        text = f"OFF\n{len(v)} {len(f)} 0\n{vlines}\n" + "\n".join(f"3 {i} {j} {k}" for i, j, k in f)
    elif suffix == ".ply":
        header = ["ply", "format ascii 1.0", f"element vertex {len(v)}", "property double x", "property double y",
                  "property double z", f"element face {len(f)}", "property list uchar int vertex_indices",
                  "end_header"]
        text = "\n".join(header) + f"\n{vlines}\n" + "\n".join(f"3 {i} {j} {k}" for i, j, k in f)
    else:
        text = "\n".join(f"v {line}" for line in vlines.split("\n")) + "\n" + \
            "\n".join(f"f {i + 1} {j + 1} {k + 1}" for i, j, k in f)
    path.write_text(text + "\n")
