"""Geometries: how cost matrices are stored and how their softmin is computed."""

from otcore.geometry.base import Geometry
from otcore.geometry.cost_matrix import CostMatrix
from otcore.geometry.point_cloud import PointCloud

__all__ = ["CostMatrix", "Geometry", "PointCloud", "as_geometry"]


def as_geometry(cost) -> Geometry:
    """A geometry as given, or a tensor read as a ``CostMatrix``."""
    if isinstance(cost, Geometry):
        return cost
    return CostMatrix(cost)
