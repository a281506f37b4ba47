"""Geometries: how cost matrices are stored and how their softmin is computed."""

from otcore.geometry.base import Geometry
from otcore.geometry.cost_matrix import CostMatrix
from otcore.geometry.point_cloud import PointCloud

__all__ = ["CostMatrix", "Geometry", "PointCloud", "as_geometry"]


def as_geometry(cost, *, validate: bool = True) -> Geometry:
    """A geometry as given, or a tensor read as a ``CostMatrix`` (finite-checked when ``validate``)."""
    if isinstance(cost, Geometry):
        return cost
    return CostMatrix(cost, validate=validate)
