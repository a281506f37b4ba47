"""Differentiable scalars built on the solvers."""

from otcore.losses.divergence import sinkhorn_divergence

__all__ = ["sinkhorn_divergence"]
