"""Neural-network adapters: losses and layers built on the solvers."""

from otcore.nn.clustering import OTKMeans, depict_target, sinkhorn_codes
from otcore.nn.moe import MoE
from otcore.nn.pooling import GSPPooling, GSPResult, gsp_pool, k_center, zsr_loss
from otcore.nn.routing import (
    Routing,
    SinkhornRouter,
    SparseOTRouter,
    TopKRouter,
    sinkhorn_route,
    sparse_route,
    topk_route,
)
from otcore.nn.shape_matching import ShapeMatchingLoss, shape_matching_pointmap, shape_matching_terms
from otcore.nn.sinkhorn_loss import SinkhornLoss

__all__ = [
    "GSPPooling",
    "GSPResult",
    "MoE",
    "OTKMeans",
    "Routing",
    "ShapeMatchingLoss",
    "SinkhornLoss",
    "SinkhornRouter",
    "SparseOTRouter",
    "TopKRouter",
    "depict_target",
    "gsp_pool",
    "k_center",
    "shape_matching_pointmap",
    "shape_matching_terms",
    "sinkhorn_codes",
    "sinkhorn_route",
    "sparse_route",
    "topk_route",
    "zsr_loss",
]
