"""Mesh readers and writers on files the tests write: round trips and hand-written quirks."""

import pytest
import torch

from otcore import shapes


@pytest.fixture(scope="module")
def mesh():
    vertices, faces, _ = shapes.canonical_mesh("torus", n_vertices=120, seed=5)
    return vertices, faces


@pytest.mark.parametrize("suffix", [".off", ".ply", ".obj", ".OFF"])
def test_round_trip_is_exact(tmp_path, mesh, suffix):
    vertices, faces = mesh
    path = tmp_path / f"mesh{suffix}"
    shapes.write_mesh(path, vertices, faces)
    v, f = shapes.read_mesh(str(path))
    assert v.dtype == torch.float64 and f.dtype == torch.int64
    assert torch.equal(v, vertices) and torch.equal(f, faces)
    v32, _ = shapes.read_mesh(path, dtype=torch.float32)
    assert torch.equal(v32, vertices.float())


# a unit square split in two by a quad, plus a triangle: 5 vertices, faces (0 1 2) (0 2 3) (1 4 2)
SQUARE = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [2, 0.5, 0]], dtype=torch.float64)
TRIANGLES = torch.tensor([[0, 1, 2], [0, 2, 3], [1, 4, 2]])

OFF_TEXT = """OFF 5 2 0
# comment line
0 0 0  255 0 0
1 0 0
1 1 0 # trailing comment
0 1 0
2 0.5 0

4 0 1 2 3
3 1 4 2
"""

PLY_TEXT = """ply
format ascii 1.0
comment written by hand
element vertex 5
property float nx
property float x
property float y
property float z
property uchar red
element face 2
property list uchar int vertex_indices
property int flags
element edge 1
property int vertex1
property int vertex2
end_header
9 0 0 0 1
9 1 0 0 1
9 1 1 0 1
9 0 1 0 1
9 2 0.5 0 1
4 0 1 2 3 7
3 1 4 2 7
0 1
"""

OBJ_TEXT = """# obj by hand
v 0 0 0
v 1 0 0
vt 0.5 0.5
v 1 1 0
v 0 1 0
vn 0 0 1
v 2 0.5 0
f 1/1/1 2/1/1 3/1/1 4/1/1
f -4//1 -1//1 -3//1
"""


@pytest.mark.parametrize(("name", "text"), [("a.off", OFF_TEXT), ("a.ply", PLY_TEXT), ("a.obj", OBJ_TEXT)])
def test_reads_hand_written_files(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    v, f = shapes.read_mesh(path)
    assert torch.equal(v, SQUARE)
    assert torch.equal(f, TRIANGLES)


def test_bad_inputs_name_the_argument(tmp_path, mesh):
    vertices, faces = mesh
    with pytest.raises(ValueError, match="^path"):
        shapes.write_mesh(tmp_path / "mesh.stl", vertices, faces)
    with pytest.raises(ValueError, match="^path"):
        shapes.read_mesh(42)
    binary = tmp_path / "b.ply"
    binary.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 0\nend_header\n")
    with pytest.raises(ValueError, match="^path.*ascii"):
        shapes.read_mesh(binary)
    truncated = tmp_path / "t.off"
    truncated.write_text("OFF\n5 2 0\n0 0 0\n1 0 0\n")
    with pytest.raises(ValueError, match="^path"):
        shapes.read_mesh(truncated)
    garbled = tmp_path / "g.obj"
    garbled.write_text("v 0 0 zero\n")
    with pytest.raises(ValueError, match="^path"):
        shapes.read_mesh(garbled)
    out_of_range = tmp_path / "o.obj"
    out_of_range.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 4\n")
    with pytest.raises(ValueError, match="^faces"):
        shapes.read_mesh(out_of_range)
    with pytest.raises(ValueError, match="^faces"):
        shapes.write_mesh(tmp_path / "m.off", vertices, faces[:, :2])
