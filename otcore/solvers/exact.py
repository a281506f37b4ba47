"""Exact (unregularised) OT through POT's network simplex, torch in and out."""

from __future__ import annotations

import numpy as np
import torch
from ot.lp.emd_wrap import emd_c  # POT's compiled network simplex: the solver ot.emd wraps

from otcore._validation import check_max_iter
from otcore.core.plan import DensePlan
from otcore.core.problem import prepare_problem, warn_not_converged
from otcore.core.result import OTResult


def emd(cost, a: torch.Tensor | None = None, b: torch.Tensor | None = None, *, max_iter: int = 1_000_000,
        warn: bool = True, validate: bool = True) -> OTResult:
    """Exact OT: ``min_P <P, C>`` over couplings of a and b (network simplex, the solver of POT's
    ``ot.emd``).

    The solve runs on the CPU in float64; results come back in the input's dtype and device.
    ``value`` (= ``transport_cost``) is differentiable: its gradient is the optimal plan in C (and
    through C in the points of a ``PointCloud``) and the dual potentials f, g in a and b. The
    potentials are those of ``ot.emd`` on points of positive weight (shifted so that <a, f> =
    <b, g>); on a point of zero weight, the largest value that keeps them feasible.

    Args:
        cost: (n, m) / (B, n, m) tensor or a geometry (materialised: exact OT needs all costs).
        a: weights as in ``sinkhorn`` (None: uniform; masses kept, not normalised).
        b: as ``a``; the same total mass.
        max_iter: network-simplex iteration cap.
        warn: one ``ConvergenceWarning`` if the simplex stopped before optimality.
        validate: check input values as in ``sinkhorn`` (the solve itself runs on the host).

    Returns:
        ``OTResult`` with ``eps=None``; ``n_iter`` is 0 (the simplex does not report it).
    """
    max_iter = check_max_iter("max_iter", max_iter)
    problem = prepare_problem(cost, a, b, balanced=True, validate=validate)
    geom, a, b = problem.geom, problem.a, problem.b
    C = geom.materialize()
    host = (t.detach().cpu().double().numpy() for t in (a, b, C))
    solved = [network_simplex(ak, bk, Ck, max_iter) for ak, bk, Ck in zip(*host, strict=True)]
    plan, f, g, costs, optimal = (torch.from_numpy(batched(arrays)) for arrays in zip(*solved))
    plan, f, g, costs = (t.to(device=C.device, dtype=C.dtype) for t in (plan, f, g, costs))
    # <P*, C> with the optimal plan held fixed (the simplex's own sum when C needs no gradient),
    # plus first-order terms in the weights (duals) where they need a gradient
    value = (plan * C).sum((-2, -1)) if C.requires_grad else costs
    for w, dual in ((a, f), (b, g)):
        if w.requires_grad:
            value = value + ((w - w.detach()) * dual).sum(-1)
    converged, overflow = problem.without_overflow(optimal.to(C.device), f, g, value)
    if warn:
        warn_not_converged("emd", converged=converged, max_iter=max_iter, causes={
            f"have outputs beyond the range of {problem.out_dtype} (solve in float32)": overflow,
        })
    n_iter = torch.zeros(C.shape[0], dtype=torch.int64, device=C.device)
    return problem.result(f=f, g=g, value=value, n_iter=n_iter, converged=converged,
                          operator=DensePlan(geom, a, b, plan, C))


def batched(arrays) -> np.ndarray:
    """(B, ...) from B arrays of one shape; one array is not copied (a view)."""
    return np.asarray(arrays[0])[None] if len(arrays) == 1 else np.stack(arrays)


def network_simplex(a: np.ndarray, b: np.ndarray, C: np.ndarray, max_iter: int):
    """One exact OT problem on the host, in float64: a (n,), b (m,) of equal mass, C (n, m).

    b is rescaled to a's mass, which the simplex needs to the last bit. The simplex leaves out the
    points of zero weight, and returns potentials of 0 there: they become the c-transforms of the
    other side's potentials (the largest feasible values; no weighted sum changes). Then both are
    shifted by one constant, f + s and g - s, so that <a, f> = <b, g> (as ``ot.emd`` returns them).

    Returns:
        plan (n, m), f (n,), g (m,), the cost <plan, C> (0-d), and whether the simplex reached
        optimality (0-d bool).
    """
    b = b * (a.sum() / b.sum())
    plan, cost, f, g, code = emd_c(a, b, np.ascontiguousarray(C), max_iter, 1)
    empty_rows, empty_cols = a == 0, b == 0
    if empty_rows.any():
        f[empty_rows] = np.min(C[empty_rows][:, ~empty_cols] - g[~empty_cols], axis=1, initial=np.inf)
    if empty_cols.any():
        g[empty_cols] = np.min(C[:, empty_cols] - f[:, None], axis=0, initial=np.inf)
    shift = (b @ g - a @ f) / (a.sum() + b.sum())
    return plan, f + shift, g - shift, np.float64(cost), np.bool_(code == 1)
