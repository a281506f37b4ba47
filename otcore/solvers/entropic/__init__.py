"""Entropic OT: log-domain Sinkhorn, Sinkhorn-Newton-Sparse, and the dual helpers they share."""

from otcore.solvers.entropic.sinkhorn import sinkhorn
from otcore.solvers.entropic.sns import sns

__all__ = ["sinkhorn", "sns"]
