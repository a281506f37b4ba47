"""The empirical entropic Monge gap of a map on a batch of points (Uscidda & Cuturi, ICML 2023).

    M_eps(T) = 1/n sum_i c(x_i, T(x_i)) - OT_eps(1/n sum_i delta_{x_i}, 1/n sum_i delta_{T(x_i)})

with ``OT_eps = sinkhorn(...).value = <P, C> + eps KL(P || a x b)`` (otcore's convention). The
paired coupling diag(1/n) costs the first term plus eps KL = eps log n, so M_eps >= -eps log n:
that is the gap's eps floor. Since OT_eps >= OT_0, M_eps is also at most the unregularised gap
M_0, which is 0 for an optimal map (for the squared-Euclidean cost, T = grad phi with phi convex,
e.g. x -> A x with A symmetric positive definite). So for an optimal map M_eps lies in
[-eps log n, 0], and it tends to the floor as eps shrinks against the distances between points.
(OTT-JAX subtracts the entropy instead of the KL: its gap is this one plus 2 eps log n, with
floor +eps log n.)

Reference: Uscidda, Cuturi, "The Monge gap: a regularizer to learn all transport maps", ICML
2023 (Eq. 8); OTT-JAX ``ott.neural.methods.monge_gap.monge_gap_from_samples``.
"""

from __future__ import annotations

import math

import torch

from otcore._validation import check_finite, check_positive
from otcore.geometry import PointCloud
from otcore.geometry.costs import CostFn, parse_cost, squared_distances, unit_vectors
from otcore.solvers import sinkhorn

#: Default eps relative to the mean cost between the two clouds. OTT's Monge gap tutorial uses
#: 0.01 for its regulariser; Sinkhorn then needs thousands of iterations to converge on a
#: near-optimal map of a hundred points (its plan is nearly a permutation), and sometimes does at
#: 0.05 too, against under 200 at 0.1.
RELATIVE_EPS = 0.1


def monge_gap(
    x: torch.Tensor,
    Tx: torch.Tensor,
    *,
    cost="sqeuclidean",
    eps: float | None = None,
    relative_eps: float = RELATIVE_EPS,
    subtract_floor: bool = False,
    max_iter: int = 2000,
    tol: float | None = None,
    eps_scaling: float | None = None,
    warn: bool = True,
    validate: bool = True,
) -> torch.Tensor:
    """Empirical entropic Monge gap of the pairs (x_i, Tx_i), uniform weights.

    ``mean_i c(x_i, Tx_i) - sinkhorn(PointCloud(x, Tx, cost), eps=eps).value``, >= its floor
    ``-eps log n`` (see the module docstring: in [-eps log n, 0] for an optimal map, larger the
    further T is from one). Differentiable in x and Tx; the OT term by the envelope theorem
    (the plan is held fixed: no backward through the iterations).

    Args:
        x: (n, d) / (B, n, d) points.
        Tx: their images, the same shape (row i is T(x_i)).
        cost: as in ``PointCloud``: ``"sqeuclidean"`` (|x - y|^2, no 1/2), ``"euclidean"``,
            ``"l1"`` or a p-norm p >= 1.
        eps: regularisation in the units of the cost. None: ``relative_eps`` times the mean cost
            over all pairs (x_i, Tx_j) (of the whole batch, detached; a constant for gradients).
        relative_eps: see ``eps`` (> 0).
        subtract_floor: return ``M_eps + eps log n`` (>= 0) instead.
        max_iter: passed to ``otcore.sinkhorn``.
        tol: passed to ``otcore.sinkhorn``.
        eps_scaling: passed to ``otcore.sinkhorn``.
        warn: passed to ``otcore.sinkhorn``.
        validate: passed to ``otcore.sinkhorn``.

    Returns:
        () / (B,), in the dtype of the inputs.
    """
    if not torch.is_tensor(Tx) or not torch.is_tensor(x) or x.shape != Tx.shape:
        raise ValueError(f"Tx must be a tensor of the shape of x, got x: {tuple(getattr(x, 'shape', ()))}, "
                         f"Tx: {tuple(getattr(Tx, 'shape', ()))}")
    relative_eps = check_positive("relative_eps", relative_eps)
    if validate:
        check_finite("x", x)
        check_finite("Tx", Tx)
    # checks shapes and cost; a validated geometry (its range read on the host) lets the solve
    # take the scaling domain's matrix-vector products. It checks finiteness again, under the
    # names x and y, after the checks above that name Tx: two more host reads.
    geom = PointCloud(x, Tx, cost=cost, validate=validate)
    kind = parse_cost(cost)
    if eps is None:
        eps = relative_eps * mean_cost(x.detach(), Tx.detach(), kind)
    eps = check_positive("eps", eps)
    result = sinkhorn(geom, eps=eps, grad="envelope", max_iter=max_iter, tol=tol, eps_scaling=eps_scaling,
                      warn=warn, validate=validate)
    gap = paired_cost(x, Tx, kind).mean(-1) - result.value
    if subtract_floor:
        gap = gap + eps * math.log(x.shape[-2])
    return gap


def paired_cost(x: torch.Tensor, y: torch.Tensor, cost: str | float | CostFn) -> torch.Tensor:
    """c(x_i, y_i) from explicit differences: (..., n, d) twice -> (..., n). ``cost`` as parsed by
    ``parse_cost``; the Euclidean norm has gradient 0 at x = y."""
    if callable(cost):  # each pair as a 1 x 1 problem of a batch
        d = x.shape[-1]
        return cost(x.reshape(-1, 1, d), y.reshape(-1, 1, d)).reshape(x.shape[:-1])
    diff = x - y
    if cost == "sqeuclidean":
        return diff.pow(2).sum(-1)
    if cost == "cosine":
        return 1 - (unit_vectors(x) * unit_vectors(y)).sum(-1)
    if cost == "euclidean":
        sq = diff.pow(2).sum(-1)
        positive = sq > 0
        return torch.where(positive, torch.where(positive, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))
    p = float(cost)
    return diff.abs().pow(p).sum(-1).pow(1 / p)


def mean_cost(x: torch.Tensor, y: torch.Tensor, cost: str | float | CostFn) -> float:
    """Mean of c(x_i, y_j) over all pairs (and the batch), read on the host."""
    if cost == "sqeuclidean":  # mean |x|^2 + mean |y|^2 - 2 <mean x, mean y>, per problem of the batch
        cx, cy = x - x.mean(-2, keepdim=True), y - y.mean(-2, keepdim=True)
        value = cx.pow(2).sum(-1).mean(-1) + cy.pow(2).sum(-1).mean(-1) + (x.mean(-2) - y.mean(-2)).pow(2).sum(-1)
        return float(value.mean())
    if callable(cost):
        return float(PointCloud(x, y, cost=cost, validate=False).mean_cost().mean())
    if cost == "cosine":  # 1 - <mean of the unit x, mean of the unit y>
        return float((1 - (unit_vectors(x).mean(-2) * unit_vectors(y).mean(-2)).sum(-1)).mean())
    xb, yb = (x if x.dim() == 3 else x.unsqueeze(0)), (y if y.dim() == 3 else y.unsqueeze(0))
    if cost == "euclidean":
        return float(squared_distances(xb, yb).sqrt().mean())
    return float(torch.cdist(xb, yb, p=float(cost)).mean())
