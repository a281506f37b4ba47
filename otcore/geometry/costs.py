"""Ground costs between point clouds, computed one block of rows at a time.

``"sqeuclidean"`` is |x - y|^2 (no 1/2), ``"euclidean"`` is |x - y|_2, a number ``p >= 1`` is
the p-norm |x - y|_p (``"l1"`` = 1), all translation invariant, which ``PointCloud`` uses to
centre the clouds before the |x|^2 + |y|^2 - 2 x.y expansion (less cancellation); ``"cosine"`` is
1 - cos(x, y) in [0, 2] (scipy's and POT's ``metric="cosine"``; a zero vector is at cosine 0 from
everything), which is not, and neither need be a user's callable ``c(x, y)``: (B, r, d), (B, L, d)
-> (B, r, L), differentiable by autograd.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CostFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def parse_cost(cost) -> str | float | CostFn:
    """Normalise a cost: returns "sqeuclidean", "euclidean", "cosine", a float p >= 1, or a
    callable as given."""
    if callable(cost):
        return cost
    if isinstance(cost, str):
        name = cost.lower()
        if name in ("sqeuclidean", "euclidean", "cosine"):
            return name
        if name == "l1":
            return 1.0
        raise ValueError(f"cost must be 'sqeuclidean', 'euclidean', 'cosine', 'l1', a number p >= 1 or a callable "
                         f"c(x, y), got {cost!r}")
    try:
        p = float(cost)
    except (TypeError, ValueError) as err:
        raise ValueError(f"cost must be a name or a number p >= 1, got {cost!r}") from err
    if not p >= 1.0 or p == float("inf"):
        raise ValueError(f"cost p-norm must satisfy 1 <= p < inf, got {cost!r}")
    return "euclidean" if p == 2.0 else p


def squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|x_i - y_j|^2 for x (B, r, d), y (B, L, d) -> (B, r, L), clamped at 0.

    One (B, r, L) allocation, then updated in place: a fresh n x m temporary costs a page fault
    per 4 KiB on first touch (three of them made this 8 times slower at 500 x 500).
    """
    out = torch.baddbmm(x.pow(2).sum(-1).unsqueeze(-1), x, y.mT, alpha=-2.0)
    return out.add_(y.pow(2).sum(-1).unsqueeze(-2)).clamp_min_(0.0)


def unit_vectors(t: torch.Tensor) -> torch.Tensor:
    """t / |t| along the last axis (..., d); zero vectors stay 0."""
    return t / torch.linalg.vector_norm(t, dim=-1, keepdim=True).clamp_min(torch.finfo(t.dtype).tiny)


def pairwise_cost(x: torch.Tensor, y: torch.Tensor, cost: str | float | CostFn) -> torch.Tensor:
    """Cost block C_ij = c(x_i, y_j): (B, r, d), (B, L, d) -> (B, r, L)."""
    if callable(cost):
        out = cost(x, y)
        shape = (x.shape[0], x.shape[1], y.shape[1])
        if not torch.is_tensor(out) or tuple(out.shape) != shape or not out.is_floating_point():
            raise ValueError(f"cost: a callable c(x, y) must return a floating tensor of shape {shape} for x "
                             f"{tuple(x.shape)} and y {tuple(y.shape)}, got {getattr(out, 'shape', type(out).__name__)}")
        return out.to(x.dtype)
    if cost == "sqeuclidean":
        return squared_distances(x, y)
    if cost == "euclidean":
        if x.shape[-1] <= DIRECT_DISTANCE_MAX_DIM:
            return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")
        return _safe_sqrt(squared_distances(x, y))
    if cost == "cosine":
        return torch.bmm(unit_vectors(x), unit_vectors(y).mT).neg_().add_(1.0)
    return torch.cdist(x, y, p=float(cost))


#: Up to this dimension |x - y| is computed from the differences (exact 0 for equal points, and
#: faster there); above it from the expansion |x|^2 + |y|^2 - 2<x, y> (a matrix product), whose
#: square root carries an absolute error of about sqrt(u) |x| near x = y.
DIRECT_DISTANCE_MAX_DIM = 16


def _safe_sqrt(t: torch.Tensor) -> torch.Tensor:
    """sqrt with gradient 0 (not inf) at 0: the subgradient of |x - y| at x = y."""
    positive = t > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, t, torch.ones_like(t))), torch.zeros_like(t))
