"""Debiased Sinkhorn divergence (balanced or unbalanced), all three transport problems in one loop."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import torch

from otcore._validation import check_max_iter, check_positive, check_ratio, check_rho, check_tol
from otcore.core.loop import LoopOutcome, SinkhornProgress, fixed_point_loop, progress_callbacks, resolve_check_every
from otcore.core.problem import prepare_problem, warn_not_converged
from otcore.geometry import CostMatrix, Geometry, PointCloud, as_geometry
from otcore.solvers.entropic.dual import (
    absolute_eps,
    default_tol,
    dual_value,
    eps_schedule,
    rounding_error,
    row_error,
    tau_of,
)
from otcore.solvers.entropic.overrelaxation import Overrelaxation
from otcore.solvers.entropic.scaling import stabilised_kernel
from otcore.solvers.entropic.scaling_loop import run_laddered_scaling_loop, run_symmetric_scaling_loop
from otcore.solvers.entropic.sinkhorn import GRAD_MODES, refresh_zero_weight, sinkhorn_step


def sinkhorn_divergence(
    x,
    y: torch.Tensor | None = None,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    eps: float,
    cost=None,
    backend: str | None = None,
    self_costs: tuple | None = None,
    rho: float | None = None,
    tol: float | None = None,
    max_iter: int = 2000,
    grad: str = "implicit",
    eps_scaling: float | None = None,
    check_every: int | None = None,
    callback: Callable[[SinkhornProgress], None] | None = None,
    verbose: bool = False,
    warn: bool = True,
    validate: bool = True,
    relative_eps: str | None = None,
) -> torch.Tensor:
    """``S_eps(a, b) = OT_eps(a, b) - OT_eps(a, a)/2 - OT_eps(b, b)/2 (+ eps/2 (|a| - |b|)^2)``.

    ``OT_eps`` is ``sinkhorn(...).value`` (<P, C> + eps KL(P || a x b), plus the marginal
    penalties rho KL(P1 || a) + rho KL(P^T 1 || b) when ``rho`` is finite). The mass term
    eps/2 (|a| - |b|)^2 (Sejourne et al. 2019, Def. 6) is 0 for balanced problems. S is exactly 0
    for identical inputs (the same tensors, or equal ones when ``validate``), symmetric, and
    smooth in the points, the costs and the weights. It is >= 0 when exp(-C/eps) is a positive
    definite kernel: the squared-Euclidean, Euclidean, cosine and L1 costs and p-norms with
    p <= 2 (Feydy et al. 2019, Thm. 1; Sejourne et al. 2019, Thm. 1 for finite rho). For these
    costs the result is clamped at 0: the three terms are computed separately (each within
    ``tol`` of its optimum), so nearly identical inputs can otherwise give a difference a few
    rounding errors below 0; where the clamp acts S is at its minimum and its gradient is 0.
    Other costs (other p-norms, callables, cost matrices) are returned unclamped. Weights keep
    their mass (not normalised), as in ``sinkhorn``.
    The cross potentials advance by alternating Sinkhorn updates and the two self-transport
    potentials by averaged symmetric updates (which converge where alternating ones oscillate),
    all in one loop; a self term stops being updated once it has converged. Where the scaling
    domain runs (``sinkhorn``'s ``domain="auto"``: CPU, kernels within budget, balanced, no
    ``callback``, no annealing, not ``"unroll"``), the three problems run one after the other in
    ``scaling_loop``'s iterations instead, each checked on its own schedule.

    Three ways to give the measures:

    * points: ``sinkhorn_divergence(x, y, a, b, eps=...)`` with x (n, d) / (B, n, d) and
      y (m, d) / (B, m, d), the cost named by ``cost`` (default ``"sqeuclidean"``);
    * a point cloud: ``sinkhorn_divergence(PointCloud(x, y, cost=...), a=a, b=b, eps=...)``
      (its cost and backend are used; ``cost`` and ``backend`` must then be left unset), or
      one sharded across processes (``otcore.distributed.RowSharded(PointCloud(x_local, y))``,
      ``BothSharded(x_local, y_local)``, with this rank's weights): every rank gets the global
      value, and backward gives each rank the gradients of its own points and weights;
    * cost matrices: ``sinkhorn_divergence(C_xy, a=a, b=b, self_costs=(C_xx, C_yy), eps=...)``
      with C_xy (n, m), C_xx (n, n) and C_yy (m, m) (or batched (B, ., .)), tensors or
      ``CostMatrix`` geometries; C_xx and C_yy must be symmetric (checked when ``validate``).

    Args:
        x: source points, a ``PointCloud``, or the cost matrix C_xy (see above).
        y: target points (points only; None otherwise).
        a: (n,) / (B, n) weights of the sources (None: uniform 1/n).
        b: (m,) / (B, m) weights of the targets (None: uniform 1/m); balanced problems need the
            same total mass as ``a``.
        eps: regularisation (> 0), in the units of the cost.
        cost: for points, as in ``PointCloud`` (None: ``"sqeuclidean"``, |x - y|^2).
        backend: for points, as in ``PointCloud`` (None: ``"auto"``).
        self_costs: ``(C_xx, C_yy)`` when ``x`` is a cost matrix.
        rho: KL penalty on both marginals (> 0, in the units of the cost; POT's ``reg_m``;
            None or inf: balanced). GeomLoss's ``reach`` r with its cost |x - y|^p / p is
            rho = r^p in its units: see ``otcore.nn.SinkhornLoss`` for that spelling.
        tol: stop when every term's marginal error is <= tol (default as in ``sinkhorn``;
            0: run exactly ``max_iter`` iterations).
        max_iter: iteration cap (one iteration updates all three problems).
        grad: ``"implicit"`` or ``"envelope"`` (the same here: the divergence is a sum of
            optimal values, whose gradient is exact by the envelope theorem), or ``"unroll"``
            (backpropagate through the iterations).
        eps_scaling: as in ``sinkhorn``: anneal all three problems from eps = max|C| by this
            ratio per iteration before iterating at ``eps``. Off by default: measured, a ratio
            of 0.5 halves the iterations between separated clouds at eps below about a
            hundredth of the costs' range, but multiplies them by 10 or more between nearly
            identical clouds (where a loss being minimised ends up): from an annealed start the
            alternating cross updates converge slowly there, from zero they do not. Reads
            max|C| on the host once. Without it, a balanced cross problem solved by scaling
            iterations (CPU or dense enough, no callback; 0 < tol < 1e-3) that is still far
            from its optimum after 50 iterations (marginal error above 1e-2) goes through two
            coarser eps (4 eps, 2 eps) before finishing at eps, problem by problem
            (``otcore.solvers.entropic.scaling_loop.LADDER``); nearly identical clouds are left
            alone.
        check_every: as in ``sinkhorn``.
        callback: as in ``sinkhorn``; its ``error`` is the largest of the three terms' errors.
        verbose: as in ``sinkhorn``.
        warn: as in ``sinkhorn``.
        validate: as in ``sinkhorn``.
        relative_eps: as in ``sinkhorn``, relative to the costs between x and y.

    Returns:
        () or (B,) tensor.

    Raises:
        ValueError: bad shapes or values (as ``sinkhorn``), ``y`` missing for points or given
            beside a geometry or cost matrix, ``cost``/``backend`` beside a geometry, self costs
            of the wrong shapes or not symmetric.

    Reference: Feydy, Sejourne, Vialard, Amari, Trouve, Peyre, "Interpolating between optimal
    transport and MMD using Sinkhorn divergences", AISTATS 2019 (Sec. 3.1, the symmetric
    updates); Sejourne, Feydy, Vialard, Trouve, Peyre, "Sinkhorn divergences for unbalanced
    optimal transport", arXiv:1910.12958 (the unbalanced divergence); GeomLoss's
    ``sinkhorn_loop`` (one loop for the three problems).
    """
    return divergence_and_potentials(
        x, y, a, b, eps=eps, cost=cost, backend=backend, self_costs=self_costs, rho=rho, tol=tol,
        max_iter=max_iter, grad=grad, eps_scaling=eps_scaling, check_every=check_every, callback=callback,
        verbose=verbose, warn=warn, validate=validate, relative_eps=relative_eps)[0]


def divergence_and_potentials(
    x, y=None, a=None, b=None, *, eps, cost=None, backend=None, self_costs=None, rho=None, tol=None,
    max_iter=2000, grad="implicit", eps_scaling=None, check_every=None, callback=None, verbose=False, warn=True,
    validate=True, init: tuple[torch.Tensor, ...] | None = None, relative_eps: str | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``sinkhorn_divergence`` (same arguments), and the potentials it ended at: a warm start.

    The potentials are (f, g, p_x, p_y), each (B, n) or (B, m), detached; (p,) alone when the
    two measures are the same. ``init``: such a tuple from an earlier call on measures of the
    same shapes (and the same sameness); the solve then starts from it at ``eps`` without
    annealing (a cross problem left far from its optimum still takes ``scaling_loop.LADDER``).
    """
    eps = check_positive("eps", eps)
    if grad not in GRAD_MODES:
        raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}")
    max_iter = check_max_iter("max_iter", max_iter)
    eps_scaling = check_ratio("eps_scaling", eps_scaling)
    rho = math.inf if rho is None else check_rho("rho", rho, 1.0, "tau")
    measures = _three_problems(x, y, cost=cost, backend=backend, self_costs=self_costs, validate=validate)
    problem = prepare_problem(measures.cross, a, b, balanced=math.isinf(rho), validate=validate, sharded=True)
    geom, wa, wb = problem.geom, problem.a, problem.b
    self_x, self_y = measures.self_geometries(geom, validate=validate)
    eps = absolute_eps(geom, eps, relative_eps)
    tol = check_tol(default_tol(geom.dtype) if tol is None else tol)
    checks = resolve_check_every(check_every, geom.device)
    callbacks = progress_callbacks("sinkhorn_divergence", callback, verbose)
    unroll = grad == "unroll"
    identical = not unroll and measures.points is not None and same_measures(
        *measures.points, a, b, compare_values=validate)

    with torch.set_grad_enabled(unroll and torch.is_grad_enabled()):  # no kernels for unrolling
        cross_kernel = stabilised_kernel(geom, eps, "auto")
        term_x = _SelfTerm(self_x, wa, settle_at=tol if tol > 0 else None, eps=eps, rho=rho)
        term_y = _SelfTerm(self_y, wb, settle_at=tol if tol > 0 else None, eps=eps, rho=rho)
    # over-relaxed cross updates (balanced only, as in ``sinkhorn``)
    relaxation = Overrelaxation(term_x.positive, functools.partial(rounding_error, geom, eps=eps),
                                tol) if math.isinf(rho) else None
    iteration = [0]

    def step(state, e):
        iteration[0] += 1
        check = iteration[0] % checks == 0
        if identical:  # the cross problem is the self problem: S = 0 exactly
            (p,) = state
            p_new, error, p_kept = term_x.update(p, e, check=False)
            return (p_new,), error, (p_kept,)
        f, g, px, py = state
        f_new, g_new, error = sinkhorn_step(geom, wa, wb, f, g, eps=e, rho_a=rho, rho_b=rho, kernel=cross_kernel,
                                            relax=relaxation if e == eps else None)
        px_new, error_x, px_kept = term_x.update(px, e, check=check)
        py_new, error_y, py_kept = term_y.update(py, e, check=check)
        for error_self in (error_x, error_y):
            if error_self is not None:
                error = torch.maximum(error, error_self)
        kept = (refresh_zero_weight(term_x.positive, f, f_new), g, px_kept, py_kept)
        return (f_new, g_new, px_new, py_new), error, kept

    zeros_n, zeros_m = torch.zeros_like(wa), torch.zeros_like(wb)
    start: tuple[torch.Tensor, ...] = (zeros_n,) if identical else (zeros_n, zeros_m, zeros_n, zeros_m)
    if init is not None:
        if len(init) != len(start) or any(t.shape != s.shape for t, s in zip(init, start, strict=False)):
            raise ValueError(f"init must be potentials of shapes {[tuple(s.shape) for s in start]}, got "
                             f"{[tuple(t.shape) for t in init]}")
        start = tuple(t.detach().to(s.dtype) for t, s in zip(init, start, strict=True))
    schedule = [] if init is not None else eps_schedule(geom, eps, eps_scaling)
    loop = functools.partial(fixed_point_loop, step, eps=eps, tol=tol, check_every=checks, callbacks=callbacks,
                             host_reads=validate, agree=geom.all_true if geom.sharded else None)
    kernels = (term_x.kernel,) if identical else (cross_kernel, term_x.kernel, term_y.kernel)
    with torch.set_grad_enabled(unroll and torch.is_grad_enabled()):
        if schedule or callbacks or not math.isinf(rho) or any(k is None for k in kernels):
            outcome = loop(start, max_iter=max_iter, schedule=schedule, first_check=1 if identical else 2)
        else:  # each problem in scaling iterations checked every k (``scaling_loop``)
            outcome, finished = _scaling_solves(cross_kernel, term_x, term_y, wa, wb, start, max_iter=max_iter,
                                                tol=tol, relaxation=relaxation)
            if not finished:  # handed back: on with the per-half-step loop from where they are
                if relaxation is not None:
                    relaxation.observed = int(outcome.n_iter.max())
                outcome = loop(outcome.state, max_iter=max(1, max_iter - int(outcome.n_iter.max())), first_check=1)
    if warn and (tol > 0 or validate):
        warn_not_converged("sinkhorn_divergence", converged=outcome.converged, max_iter=max_iter,
                           causes={"stopped on a non-finite iterate": outcome.failed})

    state = outcome.state if unroll else tuple(t.detach() for t in outcome.state)
    if identical:  # the three terms are one dual value: S and its gradient are exactly 0
        ot_xy = ot_xx = ot_yy = dual_value(geom, wa, wb, state[0], eps=eps, rho_a=rho, rho_b=rho)
    else:
        _, g, px, py = state  # the value needs g alone (f enters as the c-transform of g)
        ot_xy = dual_value(geom, wa, wb, g, eps=eps, rho_a=rho, rho_b=rho)
        ot_xx = dual_value(self_x, wa, wa, px, eps=eps, rho_a=rho, rho_b=rho)
        ot_yy = dual_value(self_y, wb, wb, py, eps=eps, rho_a=rho, rho_b=rho)
    value = ot_xy - 0.5 * ot_xx - 0.5 * ot_yy
    if not math.isinf(rho):
        value = value + 0.5 * eps * (geom.total(wa, 0) - geom.total(wb, 1)) ** 2
    if measures.positive_kernel:
        value = value.clamp(min=0)  # S >= 0 in exact arithmetic: see the docstring
    potentials = tuple(t.detach() for t in outcome.state)
    return (value if problem.batched else value.squeeze(0)).to(problem.out_dtype), potentials


def _scaling_solves(cross_kernel, term_x, term_y, wa, wb, start, *, max_iter, tol, relaxation):
    """The cross problem (``run_scaling_loop``) and the two self-transport ones
    (``run_symmetric_scaling_loop``; only the one when the measures are the same, ``start`` =
    (p,)), one after the other: (the outcome of all of them, as the combined loop's, finished).
    The cross problem may take ``scaling_loop.LADDER``."""
    if len(start) == 1:
        return run_symmetric_scaling_loop(term_x.kernel, wa, start[0], max_iter=max_iter, tol=tol)
    f, g, px, py = start
    parts = [run_laddered_scaling_loop(cross_kernel, wa, wb, f, g, max_iter=max_iter, tol=tol,
                                       factor=None if relaxation is None else relaxation.factor),
             run_symmetric_scaling_loop(term_x.kernel, wa, px, max_iter=max_iter, tol=tol),
             run_symmetric_scaling_loop(term_y.kernel, wb, py, max_iter=max_iter, tol=tol)]
    outcomes = [outcome for outcome, _ in parts]
    state = (*outcomes[0].state, outcomes[1].state[0], outcomes[2].state[0])
    combined = LoopOutcome(
        state=state, n_iter=functools.reduce(torch.maximum, [o.n_iter for o in outcomes]),
        converged=functools.reduce(torch.logical_and, [o.converged for o in outcomes]),
        failed=functools.reduce(torch.logical_or, [o.failed for o in outcomes]),
        error=functools.reduce(torch.maximum, [o.error for o in outcomes]))
    return combined, all(finished for _, finished in parts)


@dataclasses.dataclass(frozen=True)
class _Measures:
    """The cross geometry as the user gave it, and how to make the two self-transport ones."""

    cross: Geometry
    self_costs: tuple[Geometry, Geometry] | None  # cost matrices C_xx, C_yy; None: from the points
    points: tuple[torch.Tensor, torch.Tensor] | None  # x, y as given (for ``same_measures``)
    positive_kernel: bool

    def self_geometries(self, geom: Geometry, *, validate: bool) -> tuple[Geometry, Geometry]:
        """(x <-> x, y <-> y) geometries matching the prepared cross ``geom`` (B, n, m): its dtype
        and batch size."""
        if self.self_costs is None:
            pair = geom.self_transport()
            if pair is None:
                raise ValueError(f"x: a {type(geom).__name__} of a cost matrix cannot give the costs of each measure "
                                 "with itself; give point clouds, or cost matrices with self_costs")
            return pair
        B, n, m = geom.shape
        prepared = []
        for name, c, size in (("self_costs[0] (C_xx)", self.self_costs[0], n), ("self_costs[1] (C_yy)",
                                                                               self.self_costs[1], m)):
            Bc, rows, cols = c.shape
            if (rows, cols) != (size, size) or Bc not in (1, B):
                raise ValueError(f"{name} must have shape ({size}, {size}) or ({B}, {size}, {size}) for a cost "
                                 f"of shape {tuple(geom.shape)}, got {(Bc, rows, cols) if c.batched else (rows, cols)}")
            c = c.to_dtype(geom.dtype).broadcast_to(B)
            if validate:
                C = c.materialize()
                asymmetry = float((C - C.mT).abs().amax())
                if asymmetry > 1e3 * torch.finfo(C.dtype).eps * max(float(C.abs().amax()), 1.0):
                    raise ValueError(f"{name} must be symmetric (a cost between a measure and itself), "
                                     f"max |C - C^T| = {asymmetry:.3g}")
            prepared.append(c)
        return prepared[0], prepared[1]


def _three_problems(x, y, *, cost, backend, self_costs, validate: bool) -> _Measures:
    """Read the three ways of giving the measures (see ``sinkhorn_divergence``)."""
    clouds = isinstance(x, Geometry) and not isinstance(x, CostMatrix)  # PointCloud, RowSharded, BothSharded
    if clouds or (self_costs is None and not isinstance(x, Geometry)):
        if self_costs is not None:
            raise ValueError("self_costs is for cost matrices; a PointCloud makes its own")
        if clouds:
            if y is not None or cost is not None or backend is not None:
                raise ValueError("given a PointCloud, leave y, cost and backend unset (the geometry holds them)")
            geom = x
        else:
            if y is None:
                raise ValueError("y is missing: give points x and y, a PointCloud, or a cost matrix C_xy with "
                                 "self_costs=(C_xx, C_yy)")
            geom = PointCloud(x, y, cost="sqeuclidean" if cost is None else cost,
                              backend="auto" if backend is None else backend, validate=validate)
        # sharded measures are never "the same": that would be each rank's own decision
        points = None if geom.sharded else geom.tensors if clouds else (x, y)
        inner = geom.inner if geom.sharded else geom  # type: ignore[attr-defined]
        return _Measures(cross=geom, self_costs=None, points=None if points is None else (points[0], points[1]),
                         positive_kernel=isinstance(inner, PointCloud) and _positive_kernel(inner.cost))
    if y is not None or cost is not None or backend is not None:
        raise ValueError("given a cost matrix C_xy, leave y, cost and backend unset")
    if self_costs is None:
        raise ValueError(f"x is a {type(x).__name__}: give self_costs=(C_xx, C_yy) as well, the costs of "
                         "each measure with itself (only a PointCloud derives them)")
    if not isinstance(self_costs, (tuple, list)) or len(self_costs) != 2:
        raise ValueError(f"self_costs must be a pair (C_xx, C_yy), got {type(self_costs).__name__}")
    cross = as_geometry(x, validate=validate)
    pair = tuple(as_geometry(c, validate=validate) for c in self_costs)
    for c in (cross, *pair):
        if not isinstance(c, CostMatrix):
            kind = type(c).__name__
            raise ValueError(f"sinkhorn_divergence takes points, a PointCloud or cost matrices, got {kind}")  # noqa: TRY004 (the API contract: ValueError)
    return _Measures(cross=cross, self_costs=(pair[0], pair[1]), points=None, positive_kernel=False)


class _SelfTerm:
    """The self-transport potential p = tau softmin(C, p; w) of a symmetric problem (C = C^T, b = a;
    tau = rho / (rho + eps), 1 when balanced).

    Averaged updates p <- (p + tau softmin(p)) / 2 converge in a few iterations where the
    alternating Sinkhorn map oscillates (Feydy et al. 2019, Sec. 3.1). Once every problem of the
    batch has reached ``settle_at`` at the target ``eps`` (read on the host at checks only), the
    term stops computing: its measured potential is kept and it reports no error. The settling
    iteration depends on ``check_every``, so the result does too, within ``tol``.
    """

    def __init__(self, geom, w: torch.Tensor, *, settle_at: float | None, eps: float, rho: float):
        self.geom, self.w, self.settle_at, self.eps, self.rho = geom, w, settle_at, eps, rho
        self.positive = w > 0
        self.settled = False
        self.kernel = stabilised_kernel(geom, eps, "auto")  # symmetric: K~ built at (p0, p0)

    def update(self, p: torch.Tensor, e: float, *, check: bool):
        """(new potential, error of ``p`` or None once settled, ``p`` as kept when accepted).

        Zero-weight points, which no error sees, take the exact c-transform rather than the
        average (their fixed point given the other points), in the new and the kept potential.
        """
        if self.settled:
            return p, None, p
        if self.kernel is None:
            s = self.geom.softmin(p, e, self.w, axis=1)
        else:
            s = self.kernel.softmin(p, p, self.w, axis=1, eps=e)
        tau = tau_of(self.rho, e)
        if tau != 1.0:
            s = tau * s
        with torch.no_grad():
            error = 2 * row_error(self.geom, self.w, p, s, e)
        kept = refresh_zero_weight(self.positive, p, s)
        if check and self.settle_at is not None and e == self.eps:
            self.settled = bool((error <= self.settle_at).all())
            if self.settled:  # freeze the state that was measured
                self.kernel = None
                return kept, error, kept
        return refresh_zero_weight(self.positive, 0.5 * (p + s), s), error, kept


def _positive_kernel(cost) -> bool:
    """Whether exp(-cost/eps) is a positive definite kernel (so that S_eps >= 0): the squared
    Euclidean cost (Gaussian kernel) and |x - y|_p for 1 <= p <= 2 (negative definite functions, so
    exp(-t |x - y|_p) is positive definite by Schoenberg's theorem), and the cosine cost
    (exp(-(1 - cos)/eps) = e^(-1/eps) exp(<x/|x|, y/|y|>/eps), the exponential of a positive
    semi-definite kernel)."""
    if callable(cost):  # unknown: no clamp
        return False
    if isinstance(cost, str):
        return cost.lower() in ("sqeuclidean", "euclidean", "cosine", "l1")
    return float(cost) <= 2


def same_measures(x, y, a, b, *, compare_values: bool) -> bool:
    """Whether (x, a) and (y, b) are the same measure: the same tensors, or (when
    ``compare_values``, a host read) equal ones."""

    def same(s, t):
        if s is None or t is None:
            return s is None and t is None
        return s is t or (compare_values and s.shape == t.shape and torch.equal(s, t))

    return same(x, y) and same(a, b)
