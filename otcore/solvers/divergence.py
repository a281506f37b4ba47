"""Debiased Sinkhorn divergence."""

from __future__ import annotations

import torch

from otcore.geometry import PointCloud
from otcore.solvers.sinkhorn import sinkhorn


def sinkhorn_divergence(
    x: torch.Tensor, y: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None, *,
    eps: float, cost="sqeuclidean", backend: str = "auto", **solver_options,
) -> torch.Tensor:
    """``S_eps(a, b) = OT_eps(a, b) - OT_eps(a, a)/2 - OT_eps(b, b)/2`` between point clouds.

    ``OT_eps`` is ``sinkhorn(...).value`` (<P, C> + eps KL(P || a x b)); S is >= 0 for the
    squared-Euclidean cost, 0 iff the measures coincide, symmetric, and smooth in x, y, a, b.

    Args:
        x: (n, d) / (B, n, d) source points; y: (m, d) / (B, m, d) target points.
        a, b: weights (None: uniform).
        eps: regularisation (> 0), in the units of the cost.
        cost: as in ``PointCloud``.
        **solver_options: forwarded to ``sinkhorn`` (``tol``, ``max_iter``, ``grad``, ...).

    Returns:
        () or (B,) tensor.

    Reference: Feydy, Sejourne, Vialard, Amari, Trouve, Peyre, "Interpolating between optimal
    transport and MMD using Sinkhorn divergences", AISTATS 2019.
    """
    def ot_value(p, q, wp, wq):
        return sinkhorn(PointCloud(p, q, cost=cost, backend=backend), wp, wq, eps=eps, **solver_options).value

    return ot_value(x, y, a, b) - 0.5 * ot_value(x, x, a, a) - 0.5 * ot_value(y, y, b, b)
