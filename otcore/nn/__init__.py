"""Neural-network adapters: losses and layers built on the solvers."""

from otcore.nn.clustering import OTKMeans, depict_target, sinkhorn_codes

__all__ = [
    "OTKMeans",
    "depict_target",
    "sinkhorn_codes",
]
