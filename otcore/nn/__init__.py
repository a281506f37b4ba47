"""Neural-network adapters: losses and layers built on the solvers."""

from otcore.nn.clustering import OTKMeans, depict_target, sinkhorn_codes
from otcore.nn.moe import MoE
from otcore.nn.routing import (
    Routing,
    SinkhornRouter,
    SparseOTRouter,
    TopKRouter,
    sinkhorn_route,
    sparse_route,
    topk_route,
)

__all__ = [
    "MoE",
    "OTKMeans",
    "Routing",
    "SinkhornRouter",
    "SparseOTRouter",
    "TopKRouter",
    "depict_target",
    "sinkhorn_codes",
    "sinkhorn_route",
    "sparse_route",
    "topk_route",
]
