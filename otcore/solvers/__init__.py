"""Solvers: each takes a cost (tensor or geometry) and weights and returns an ``OTResult``."""

from otcore.solvers.divergence import sinkhorn_divergence
from otcore.solvers.exact import emd
from otcore.solvers.result import OTResult
from otcore.solvers.sinkhorn import SinkhornProgress, sinkhorn
from otcore.solvers.sns import sns

__all__ = ["OTResult", "SinkhornProgress", "emd", "sinkhorn", "sinkhorn_divergence", "sns"]
