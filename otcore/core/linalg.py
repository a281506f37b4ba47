"""Conjugate gradient for batches of symmetric positive semi-definite operators."""

from __future__ import annotations

from collections.abc import Callable

import torch

Vector = Callable[[torch.Tensor], torch.Tensor]


def conjugate_gradient(
    matvec: Vector,
    rhs: torch.Tensor,
    *,
    rtol: float,
    max_iter: int,
    project: Vector | None = None,
    diagonal: torch.Tensor | None = None,
    inner: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``A x = rhs`` for a batch of symmetric PSD operators by (preconditioned) CG.

    Args:
        matvec: ``x -> A x`` on (B, N).
        rhs: (B, N).
        rtol: each problem stops (is frozen) once its residual is below ``rtol * |rhs|``.
        max_iter: iteration cap.
        project: maps vectors onto the range of A, for consistent singular systems.
        diagonal: (B, N) Jacobi preconditioner (entries <= 0 are treated as 1).
        inner: the inner product, (B, N) x (B, N) -> (B,) (``Geometry.pair_dot`` for dual
            vectors, so that a sharded geometry can all-reduce it).

    Returns:
        x (B, N), and (B,) whether each problem reached ``rtol`` within ``max_iter``.

    Reference: Nocedal & Wright, "Numerical Optimization", Algorithm 5.3.
    """
    if project is not None:
        rhs = project(rhs)
    inv_diag = None if diagonal is None else torch.where(diagonal > 0, 1 / diagonal, 1.0)

    def precondition(v):
        v = v if inv_diag is None else v * inv_diag
        return v if project is None else project(v)

    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = precondition(r)
    p = z
    rz = inner(r, z)
    stop = rtol**2 * inner(r, r)
    active = inner(r, r) > stop
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        Ap = matvec(p)
        pAp = inner(p, Ap)
        alpha = torch.where(active & (pAp > 0), rz / torch.where(pAp > 0, pAp, 1), 0).unsqueeze(-1)
        x = x + alpha * p
        r = r - alpha * Ap
        if project is not None:
            r = project(r)
        z = precondition(r)
        rz_new = inner(r, z)
        beta = torch.where(active, rz_new / torch.where(rz != 0, rz, 1), 0).unsqueeze(-1)
        p = torch.where(active.unsqueeze(-1), z + beta * p, p)
        rz = torch.where(active, rz_new, rz)
        active = active & (inner(r, r) > stop)
    return (project(x) if project is not None else x), ~active
