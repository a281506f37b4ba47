"""Exact (unregularised) OT through POT's network simplex, torch in and out."""

from __future__ import annotations

import numpy as np
import ot
import torch

from otcore._validation import check_max_iter
from otcore.core.plan import DensePlan
from otcore.core.problem import prepare_problem, warn_not_converged
from otcore.core.result import OTResult


def emd(cost, a: torch.Tensor | None = None, b: torch.Tensor | None = None, *, max_iter: int = 1_000_000,
        warn: bool = True, validate: bool = True) -> OTResult:
    """Exact OT: ``min_P <P, C>`` over couplings of a and b (network simplex, POT's ``ot.emd``).

    The solve runs on the CPU in float64; results come back in the input's dtype and device.
    ``value`` (= ``transport_cost``) is differentiable: its gradient is the optimal plan in C (and
    through C in the points of a ``PointCloud``) and the dual potentials f, g in a and b.

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
    B = C.shape[0]
    plans, fs, gs, costs, ok = [], [], [], [], []
    for k in range(B):
        # float64 on the host; ot.emd rescales b to a's mass to the last bit (prepare_problem
        # checked that they agree), and POT's own check costs an assert_almost_equal
        ak, bk, Ck = (t[k].detach().cpu().double().numpy() for t in (a, b, C))
        G, log = ot.emd(ak, bk, np.ascontiguousarray(Ck), numItermax=max_iter, log=True, check_marginals=False)
        plans.append(G)
        fs.append(log["u"])
        gs.append(log["v"])
        costs.append(log["cost"])
        ok.append(log["result_code"] == 1)

    def like(array) -> torch.Tensor:
        return torch.as_tensor(array, dtype=C.dtype, device=C.device)

    def stacked(arrays) -> torch.Tensor:  # (B, ...); one problem: a view of its array, no copy
        return like(arrays[0][None] if B == 1 else np.stack(arrays))

    plan, f, g = stacked(plans), stacked(fs), stacked(gs)
    # <P*, C> with the optimal plan held fixed (the simplex's own sum when C needs no gradient),
    # plus first-order terms in the weights (duals) where they need a gradient
    value = (plan * C).sum((-2, -1)) if C.requires_grad else like(costs)
    for w, dual in ((a, f), (b, g)):
        if w.requires_grad:
            value = value + ((w - w.detach()) * dual).sum(-1)
    overflow = problem.output_overflow(f, g, value)
    converged = torch.as_tensor(ok, device=C.device) & ~overflow
    if warn:
        warn_not_converged("emd", converged=converged, max_iter=max_iter, causes={
            f"have outputs beyond the range of {problem.out_dtype} (solve in float32)": overflow,
        })
    n_iter = torch.zeros(B, dtype=torch.int64, device=C.device)
    return problem.result(f=f, g=g, value=value, n_iter=n_iter, converged=converged,
                          operator=DensePlan(geom, a, b, plan, C))
