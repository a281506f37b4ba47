"""Solvers: each takes a cost (tensor or geometry) and weights and returns an ``OTResult``."""

from otcore.solvers.entropic import sinkhorn, sns
from otcore.solvers.exact import emd

__all__ = ["emd", "sinkhorn", "sns"]
