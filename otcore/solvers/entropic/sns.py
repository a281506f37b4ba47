"""Sinkhorn-Newton-Sparse: Sinkhorn warm-up, then Newton steps on the dual with a sparsified Hessian.

Dual (maximised), with the plan P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps):

    D(f, g) = <a, f> + <b, g> - eps (sum P - |a||b|),   grad D = (a - P1, b - P^T 1),
    -Hess D = H = [[diag(P1), P], [P^T, diag(P^T 1)]] / eps   (PSD, null vector (1, -1)).

Each Newton step solves (H_s + lam I) d = grad D by Jacobi-preconditioned conjugate gradient,
where H_s keeps the exact diagonals and drops the entries of P below delta / m (the dropped mass
of a row is at most delta = nu |grad D|_2, so H_s stays diagonally dominant, hence PSD, and the
shift lam = mu |grad D|_2 makes it definite and removes the gauge). The step length is the first
of {1, 1/2, 1/4, 1/10} that increases D; mu adapts to the ratio of actual to predicted increase
(trust-region style). Both devices come from SSNS; the warm-up and sparsity from SNS. Small
problems take ``newton_direct`` instead (``hessian="direct"``): exact Hessian, Cholesky, and a
Sinkhorn sweep after every Newton step.

References:
    Tang, Shavlovsky, Rahmanian, Tardini, Thekumparampil, Xiao, Ying, "Accelerating Sinkhorn
    algorithm with sparse Newton iterations", ICLR 2024.
    Tang, Qiu, "Safe and sparse Newton method for entropic-regularized optimal transport",
    NeurIPS 2024.
"""

from __future__ import annotations

import math
import warnings

import torch

from otcore._validation import check_max_iter, check_positive, check_tol
from otcore.core.implicit import FixedPoint, default_rtol, implicit_potentials, needs_implicit
from otcore.core.linalg import conjugate_gradient
from otcore.core.loop import select
from otcore.core.plan import EntropicPlan
from otcore.core.problem import prepare_problem, warn_not_converged
from otcore.core.result import OTResult
from otcore.solvers.entropic.dual import certified, default_tol, dual_value
from otcore.solvers.entropic.newton_direct import MU_DOWN, MU_MIN, MU_UP, RHO_HIGH, RHO_LOW, direct_newton
from otcore.solvers.entropic.sinkhorn import refresh_zero_weight, run_sinkhorn

STEPS, NU = (1.0, 0.5, 0.25, 0.1), 0.01
#: ``hessian="auto"`` solves Newton systems directly when n m min(n, m) (the work of one step) is at most this
DIRECT_MAX = 500**3


class _DualState:
    """Potentials with the plan, its marginals, the dual value and gradient at them.

    ``hessian="sparse"`` materialises P (B, n, m) once per evaluation (dense costs, or points
    with n x m memory; on ``RowSharded`` this rank's rows, the column sums all-reduced through
    ``Geometry.sum_partials``); ``"dense"`` never does and multiplies by P through the geometry,
    as ``"sparse"`` does on a geometry holding no whole rows (``BothSharded``: ``C`` None, its
    kept entries of P assembled for each Newton step by ``_kept_plan``).
    """

    def __init__(self, geom, C, a, b, f, g, eps):
        self.f, self.g = f, g
        plan = EntropicPlan(geom, a, b, f, g, eps)
        if C is not None:
            self.P = plan.dense(cost=C)
            self.r, self.c = self.P.sum(-1), geom.sum_partials(self.P.sum(-2), 0)
        else:
            self.P = None
            self.r, self.c = plan.marginals()
        mass, mass_a, mass_b = geom.total(self.r, 0), geom.total(a, 0), geom.total(b, 1)
        self.value = geom.total(a * f, 0) + geom.total(b * g, 1) - eps * (mass - mass_a * mass_b)
        self.grad = torch.cat([a - self.r, b - self.c], dim=-1)
        self.error = geom.pair_dot(self.grad.abs(), torch.ones_like(self.grad))


def newton_direction(state, geom, a, b, eps, shift, drop, *, rtol, max_iter):
    """Solve ``(H_s + shift I) d = grad D`` for the ascent direction d, (B, n + m).

    Args:
        state: a ``_DualState``.
        shift: (B,) Tikhonov shift lam.
        drop: (B,) entries of P below ``drop`` leave the off-diagonal blocks (0: exact Hessian);
            None: the Hessian-free products (each a pass over the geometry, ``hessian="dense"``).
    """
    n = a.shape[-1]
    lam = shift.unsqueeze(-1)
    if drop is not None:
        matmul = _kept_plan(state, geom, a, b, eps, drop)
    else:
        plan = EntropicPlan(geom, a, b, state.f, state.g, eps)

        def matmul(v, transpose):
            return plan.matmul(v.unsqueeze(-1), transpose).squeeze(-1)

    def matvec(z):
        y, x = z[:, :n], z[:, n:]
        top = (state.r * y + matmul(x, False)) / eps
        bottom = (state.c * x + matmul(y, True)) / eps
        return torch.cat([top, bottom], dim=-1) + lam * z

    diagonal = torch.cat([state.r, state.c], dim=-1) / eps + lam
    # an inexact Newton step is fine (the line search guards it): CG's convergence flag is not needed
    direction, _ = conjugate_gradient(matvec, state.grad, rtol=rtol, max_iter=max_iter, diagonal=diagonal,
                                      inner=geom.pair_dot)
    return direction, matvec


def _kept_plan(state, geom, a, b, eps, drop):
    """``matmul(v, transpose)``: products with the plan at ``state``, its entries below ``drop``
    (B,) zeroed: ``P v``, v (B, m) -> (B, n), or ``P^T v``, v (B, n) -> (B, m), these being this
    rank's shards on a sharded geometry (the products summed over every rank's points)."""
    if not geom.holds_rows:  # no whole rows of P here (BothSharded): its kept blocks, assembled around its ring
        return geom.kept_plan(a, b, state.f, state.g, eps, drop).matmul
    kept = torch.where(state.P >= drop[:, None, None], state.P, 0)
    if kept.device.type == "cpu":  # sparse products pay on CPU; GPUs keep the masked dense block
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            rows = [k.to_sparse_csr() for k in kept]
            cols = [k.T.contiguous().to_sparse_csr() for k in kept]

    def matmul(v, transpose):  # v (B, k)
        if kept.device.type != "cpu":
            out = torch.matmul(kept.mT if transpose else kept, v.unsqueeze(-1)).squeeze(-1)
        else:
            out = torch.stack([blk @ vk for blk, vk in zip(cols if transpose else rows, v)])
        # P^T y sums over the rows: this rank's part of it, on a geometry sharded by rows
        return geom.sum_partials(out, 0) if transpose else out

    return matmul


def sns(
    cost,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    eps: float,
    tol: float | None = None,
    max_iter: int = 500,
    sinkhorn_iter: int = 20,
    hessian: str = "auto",
    grad: str = "implicit",
    cg_rtol: float | None = None,
    cg_max_iter: int = 500,
    warn: bool = True,
    validate: bool = True,
) -> OTResult:
    """Entropic OT by Sinkhorn-Newton-Sparse (balanced problems).

    Same problem, potentials and ``OTResult`` as ``sinkhorn``; converges in tens of iterations
    at small eps where Sinkhorn needs thousands.

    Args:
        cost: (n, m) / (B, n, m) tensor or a geometry.
        a: weights as in ``sinkhorn`` (None: uniform; masses kept, not normalised).
        b: as ``a``; the same total mass.
        eps: entropic regularisation (> 0).
        tol: stop when |P1 - a|_1 + |P^T 1 - b|_1 <= tol (default: 1e-6 in float64, 1e-4
            otherwise; 0: run exactly ``max_iter`` iterations, and ``converged`` then only says
            that they stayed finite).
        max_iter: cap on all iterations (Sinkhorn warm-up + Newton).
        sinkhorn_iter: warm-up Sinkhorn iterations (it stops early if already converged).
        hessian: ``"direct"`` (materialise P and solve each Newton system with the exact Hessian
            by Cholesky on its Schur complement, ``newton_direct``: O(n m min(n, m)) per step,
            a few kernels, no inner iterations; each Newton iteration there ends with
            ceil(min(n, m) / ``SWEEP_COLUMNS``) Sinkhorn iterations, counted as part of it),
            ``"sparse"`` (materialise P each step, drop small entries, conjugate gradient),
            ``"dense"`` (Hessian-free CG: every product is a pass over the geometry, O(n + m)
            memory; suits GPUs and point clouds) or ``"auto"`` (``"direct"`` when
            n m min(n, m) <= ``DIRECT_MAX``, else ``"sparse"``). On a geometry sharded across
            processes (``otcore.distributed``) CG's dot products are reductions across the ranks,
            and every rank drops entries below the same threshold as one process on the whole
            problem; ``"sparse"`` runs on ``RowSharded`` (each rank materialises its rows of P,
            (n_local, m), and all-reduces P^T y) and on ``BothSharded`` (each rank keeps its
            rows' entries against each rank's columns as a sparse block, computed in chunks of
            rows as the column shards pass around the ring, never a dense (n_local, m_j) block:
            O(nnz_local + (n + m)/P) memory; P x passes x's shards around the ring and P^T y
            reduce-scatters around it, ``otcore.distributed.sparse_plan``), ``"dense"`` on both
            (its products are ring or all-reduce passes), and ``"direct"`` on neither;
            ``"auto"`` takes ``"sparse"`` where one process on the whole problem (every rank's n
            and m) would, else ``"dense"``.
        grad: ``"implicit"`` or ``"envelope"`` as in ``sinkhorn`` (the fixed point is the same;
            ``"unroll"`` is not offered: CG and sparsification are not differentiated).
        cg_rtol: inner conjugate-gradient setting of the Newton steps: the smallest relative
            residual asked of it (default: 1e-10 in float64, 1e-5 otherwise); the implicit
            backward uses its own defaults.
        cg_max_iter: inner conjugate-gradient setting of the Newton steps: its iteration cap.
        warn: one ``ConvergenceWarning`` on non-convergence.
        validate: check input values as in ``sinkhorn`` (the Newton loop itself reads its
            progress on the host every iteration).

    Returns:
        ``OTResult``; ``n_iter`` counts all iterations and ``info`` holds
        ``{"sinkhorn_iter": ..., "newton_iter": ..., "error": ...}`` (per problem).
    """
    eps = check_positive("eps", eps)
    if hessian not in ("auto", "direct", "sparse", "dense"):
        raise ValueError(f"hessian must be 'auto', 'direct', 'sparse' or 'dense', got {hessian!r}")
    if grad not in ("implicit", "envelope"):
        raise ValueError(f"grad must be 'implicit' or 'envelope' for sns, got {grad!r}")
    max_iter = check_max_iter("max_iter", max_iter)
    sinkhorn_iter = check_max_iter("sinkhorn_iter", sinkhorn_iter, minimum=0)
    problem = prepare_problem(cost, a, b, balanced=True, validate=validate, sharded=True)
    geom, a, b = problem.geom, problem.a, problem.b
    if geom.sharded and hessian == "direct":
        raise ValueError("hessian='direct' factors the whole Hessian, which no rank of a geometry sharded across "
                         "processes holds: use hessian='sparse', 'dense' or 'auto'")
    tol = check_tol(default_tol(geom.dtype) if tol is None else tol)
    cg_rtol = default_rtol(geom.dtype) if cg_rtol is None else check_positive("cg_rtol", cg_rtol)

    with torch.no_grad():
        if hessian == "auto":
            hessian = _auto_hessian(geom, a, b)
        warm_iter = max(1, min(sinkhorn_iter, max_iter))
        if hessian == "direct":  # its own warm-up: the same Sinkhorn iterations on the materialised cost
            f, g, error, n_sinkhorn, n_newton = direct_newton(geom.materialize().detach(), a, b, eps, tol=tol,
                                                              max_iter=max_iter, sinkhorn_iter=warm_iter)
        else:
            warm = run_sinkhorn(problem, eps=eps, tol=tol, max_iter=warm_iter)
            f, g = warm.state
            n_sinkhorn = warm.n_iter
            budget = max(0, max_iter - int(n_sinkhorn.max()))
            f, g, error, n_newton = _iterative_newton(geom, a, b, f, g, eps, tol=tol, max_iter=budget,
                                                      sparse=hessian == "sparse", cg_rtol=cg_rtol,
                                                      cg_max_iter=cg_max_iter)
        if bool((~geom.all_true(~((a == 0).any(-1) | (b == 0).any(-1)))).any()):  # on any process
            # zero-weight points: their potentials take no part in Newton's system; as in
            # sinkhorn, return their c-transforms (what the weights' derivatives read)
            f = refresh_zero_weight(a > 0, f, geom.softmin(g, eps, b, axis=1))
            g = refresh_zero_weight(b > 0, g, geom.softmin(f, eps, a, axis=0))
        finite = torch.isfinite(error)
        converged = error <= tol if tol > 0 else finite  # tol=0: max_iter Newton steps, as in sinkhorn
    converged, error64 = certified(geom, a, b, f, g, eps=eps, rho_a=math.inf, rho_b=math.inf, tol=tol,
                                   converged=converged)
    value = dual_value(geom, a, b, g, eps=eps)
    imprecise = None if error64 is None else (error <= tol) & ~converged
    converged, overflow = problem.without_overflow(converged, f, g, value)
    if warn:
        warn_not_converged("sns", converged=converged, max_iter=max_iter, causes={
            "stopped on a non-finite iterate": ~finite,
            f"met tol in {geom.dtype} but not in float64 (solve in float64 or loosen tol)": imprecise,
            f"have outputs beyond the range of {problem.out_dtype} (solve in float32)": overflow,
        })
    point = FixedPoint(geom=geom, a=a, b=b, eps=eps)
    if grad == "implicit" and needs_implicit(point):
        f, g = implicit_potentials(point, f, g)
    info = {"sinkhorn_iter": n_sinkhorn, "newton_iter": n_newton, "error": error}
    if error64 is not None:
        info["error_float64"] = error64
    return problem.result(f=f, g=g, value=value, n_iter=n_sinkhorn + n_newton, converged=converged,
                          operator=EntropicPlan(geom, a, b, f, g, eps), eps=eps, info=info)


def _auto_hessian(geom, a, b) -> str:
    """``hessian="auto"``: one process's choice by the whole problem's sizes (``_whole_sizes``),
    or ``"dense"`` where it is ``"direct"`` on a sharded geometry (no rank holds the Hessian)."""
    n, m = _whole_sizes(geom, a, b)
    choice = "direct" if n * m * min(n, m) <= DIRECT_MAX else "sparse"
    return "dense" if geom.sharded and choice == "direct" else choice


def _whole_sizes(geom, a, b) -> tuple[int, int]:
    """(n, m) of the whole problem: on a sharded geometry every rank's points (each count one all-reduce)."""
    _, n, m = geom.shape
    if geom.sharded:
        n, m = (int(geom.total(torch.ones_like(w[:1], dtype=torch.int64), axis)) for axis, w in ((0, a), (1, b)))
    return n, m


def _iterative_newton(geom, a, b, f, g, eps, *, tol, max_iter, sparse, cg_rtol, cg_max_iter):
    """Newton steps solved by conjugate gradient (``hessian`` "sparse" or "dense"): (f, g, error, iterations)."""
    # this rank's rows of C, where it holds whole rows (BothSharded assembles its blocks of P around its ring)
    C = geom.materialize().detach() if sparse and geom.holds_rows else None
    B, n, _ = geom.shape
    _, m = _whole_sizes(geom, a, b)  # the drop threshold is the whole problem's
    state = _DualState(geom, C, a, b, f, g, eps)
    mu = torch.ones(B, dtype=geom.dtype, device=geom.device)
    active = state.error > tol
    n_newton = torch.zeros(B, dtype=torch.int64, device=geom.device)
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        norm = geom.pair_dot(state.grad, state.grad).sqrt()
        # inexact Newton: the forcing term min(0.1, sqrt|grad|) keeps superlinear convergence
        forcing = max(cg_rtol, min(0.1, math.sqrt(float(norm[active].max()))))
        d, matvec = newton_direction(state, geom, a, b, eps, mu * norm, NU * norm / m if sparse else None,
                                     rtol=forcing, max_iter=cg_max_iter)
        noise = 64 * torch.finfo(geom.dtype).eps * (state.value.abs() + eps)
        slope = geom.pair_dot(state.grad, d)
        curvature = geom.pair_dot(d, matvec(d))
        best, best_step = state, torch.zeros_like(mu)
        for step in STEPS:
            trial = _DualState(geom, C, a, b, state.f + step * d[:, :n], state.g + step * d[:, n:], eps)
            # near the optimum D changes below its rounding noise: then the marginal error decides
            level = trial.value >= state.value - noise
            gain = (trial.value > state.value + noise) | (level & (trial.error < state.error))
            better = active & (best_step == 0) & gain & torch.isfinite(trial.value)
            best = _select(better, trial, best)
            best_step = torch.where(better, step, best_step)
            if bool((best_step > 0)[active].all()):
                break
        predicted = best_step * slope - 0.5 * best_step**2 * curvature
        ratio = torch.where(predicted > noise, (best.value - state.value) / predicted, -1.0)
        ratio = torch.where((predicted <= noise) & (best_step > 0), 1.0, ratio)
        mu = torch.where(ratio < RHO_LOW, mu * MU_UP, torch.where(ratio > RHO_HIGH, (mu * MU_DOWN).clamp_min(MU_MIN), mu))
        n_newton = n_newton + active.long()
        state = best
        active = active & (state.error > tol) & torch.isfinite(state.error)
    return state.f, state.g, state.error, n_newton


def _select(mask: torch.Tensor, new: _DualState, old: _DualState) -> _DualState:
    """Per problem, ``new`` where ``mask`` else ``old`` (all fields)."""
    out = object.__new__(_DualState)
    for name, new_value in vars(new).items():
        old_value = getattr(old, name)
        if new_value is None:
            setattr(out, name, None)
            continue
        setattr(out, name, select(mask, new_value, old_value))
    return out
