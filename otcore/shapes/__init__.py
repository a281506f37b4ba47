"""Shapes: triangle meshes, their Laplace-Beltrami bases, functional maps and correspondence metrics.

The geometry side of unsupervised shape matching (``otcore.nn.ShapeMatchingLoss``): read or
generate meshes, compute spectra (``laplacian_basis``), estimate and regularise functional maps,
convert between functional and point maps, and score maps by geodesic error.
"""

from otcore.shapes.functional_maps import (
    bijectivity_loss,
    coupling_loss,
    fmap_from_features,
    fmap_to_pointmap,
    laplacian_commutativity_loss,
    nearest,
    orthogonality_loss,
    pointmap_to_fmap,
    resolvent_mask,
    soft_pointmap,
    spectral_coefficients,
)
from otcore.shapes.generate import ShapePair, bend, canonical_mesh, make_pair, stretch
from otcore.shapes.laplacian import Spectrum, cotangent_laplacian, laplacian_basis
from otcore.shapes.mesh_io import read_mesh, write_mesh
from otcore.shapes.metrics import geodesic_distances, geodesic_error, pck_curve

__all__ = [
    "ShapePair",
    "Spectrum",
    "bend",
    "bijectivity_loss",
    "canonical_mesh",
    "cotangent_laplacian",
    "coupling_loss",
    "fmap_from_features",
    "fmap_to_pointmap",
    "geodesic_distances",
    "geodesic_error",
    "laplacian_basis",
    "laplacian_commutativity_loss",
    "make_pair",
    "nearest",
    "orthogonality_loss",
    "pck_curve",
    "pointmap_to_fmap",
    "read_mesh",
    "resolvent_mask",
    "soft_pointmap",
    "spectral_coefficients",
    "stretch",
    "write_mesh",
]
