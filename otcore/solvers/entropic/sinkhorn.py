"""Log-domain Sinkhorn: balanced and unbalanced, batched, differentiable three ways.

Updates (OTT/POT convention, P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps)):

    f <- tau_a * softmin_eps(C, g; b)      (rows)
    g <- tau_b * softmin_eps(C^T, f; a)    (columns)

with tau = rho / (rho + eps) for a KL penalty rho on the marginal (tau = 1: balanced).

References:
    Cuturi, "Sinkhorn distances", NeurIPS 2013.
    Schmitzer, "Stabilized sparse scaling algorithms", SIAM J. Sci. Comput. 2019 (log domain,
    eps-scaling).
    Chizat, Peyre, Schmitzer, Vialard, "Scaling algorithms for unbalanced OT", Math. Comp. 2018.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import torch

from otcore._validation import (
    check_finite,
    check_max_iter,
    check_positive,
    check_ratio,
    check_rho,
    check_tau,
    check_tol,
)
from otcore.core.implicit import FixedPoint, implicit_potentials, needs_implicit
from otcore.core.loop import LoopOutcome, SinkhornProgress, fixed_point_loop, progress_callbacks, resolve_check_every
from otcore.core.plan import EntropicPlan
from otcore.core.problem import Problem, prepare_problem, warn_not_converged
from otcore.core.result import OTResult
from otcore.solvers.entropic.dual import (
    absolute_eps,
    beyond_margin,
    certified,
    default_tol,
    dual_value,
    eps_schedule,
    rho_of,
    rounding_error,
    row_error,
    tau_of,
)
from otcore.solvers.entropic.overrelaxation import Overrelaxation
from otcore.solvers.entropic.scaling import DOMAINS, StabilisedKernel, stabilised_kernel
from otcore.solvers.entropic.scaling_loop import run_scaling_loop

GRAD_MODES = ("implicit", "unroll", "envelope")


def sinkhorn(
    cost,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    eps: float,
    tau_a: float = 1.0,
    tau_b: float = 1.0,
    max_iter: int = 2000,
    tol: float | None = None,
    grad: str = "implicit",
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps_scaling: float | None = None,
    check_every: int | None = None,
    callback: Callable[[SinkhornProgress], None] | None = None,
    verbose: bool = False,
    warn: bool = True,
    validate: bool = True,
    implicit_rtol: float | None = None,
    implicit_max_iter: int = 1000,
    domain: str = "auto",
    relative_eps: str | None = None,
    rho_a: float | None = None,
    rho_b: float | None = None,
    overrelax: bool = True,
) -> OTResult:
    """Entropic OT by Sinkhorn iterations on log potentials (log or scaling domain).

    Solves ``min_P <P, C> + eps KL(P || a x b)`` over couplings of a and b (balanced), or with the
    marginal constraints relaxed to ``rho KL(P1 || a)`` with ``tau = rho / (rho + eps)``.

    Args:
        cost: (n, m) / (B, n, m) tensor (read as a ``CostMatrix``) or a geometry.
        a: (n,) / (B, n) source weights, >= 0 (None: uniform 1/n).
        b: (m,) / (B, m) target weights (None: uniform 1/m). Balanced problems need equal masses.
            Masses are kept, not normalised: weights of total mass k give k times the plan of the
            normalised ones.
        eps: entropic regularisation (> 0), in the units of the cost (or of its scale: see
            ``relative_eps``).
        tau_a: marginal relaxation of ``a`` in (0, 1]; 1 = hard constraint.
        tau_b: marginal relaxation of ``b``, as ``tau_a``.
        rho_a: the same relaxation as the KL penalty strength rho > 0 (POT's ``reg_m``, in the
            units of the cost; inf = hard constraint), instead of tau: tau = rho / (rho + eps),
            converted at the absolute eps.
        rho_b: as ``rho_a``, for ``b`` (instead of ``tau_b``).
        overrelax: over-relax the row updates at the target eps, f <- f + omega (softmin(g) - f),
            with omega = 2 / (1 + sqrt(1 - theta)) from the error's contraction factor theta
            measured over the first 20 iterations (per problem; capped at 1.9, backed off if the
            error climbs). Where Sinkhorn is slow (theta near 1) this takes 1.5 to 5 times fewer
            iterations. The columns stay exact (g = softmin(f)), so ``tol``, ``converged`` and the
            solution mean what they do for plain Sinkhorn. False: plain Sinkhorn iterates (to
            compare iteration counts with other libraries). Balanced problems only: an unbalanced
            problem near balance has a nearly flat direction (the translation f + c, g - c) in
            which a residual of tol allows a value error larger than tol; relaxed iterates stop
            at another point of it than plain ones.
        max_iter: iteration cap (one iteration = an f- and a g-update).
        tol: stop when |P1 - a|_1 + |P^T 1 - b|_1 <= tol (balanced; for unbalanced problems the
            same L1 residual of the fixed point f = tau_a softmin(g)). Default: 1e-6 in float64,
            1e-4 otherwise. ``tol=0`` runs exactly ``max_iter`` iterations with no stopping test;
            ``converged`` then only says that the iterates stayed finite.
        grad: ``"implicit"`` (linear solve at the fixed point, constant memory), ``"unroll"``
            (backprop through every iteration) or ``"envelope"`` (potentials returned detached; the
            gradient of ``value`` is exact by the envelope theorem, other outputs see only their
            explicit dependence). In every mode d value / d C = plan; except for ``"unroll"``,
            ``value`` is differentiated by the envelope theorem (its implicit term vanishes).
        init: warm start ``(f0, g0)``; the first update recomputes f from g0.
        eps_scaling: if set (a ratio in (0, 1)), anneal eps_t = max(eps, max|C| * ratio^t) before
            iterating at ``eps``; convergence is only checked at the target eps. Reads max|C| on
            the host once.
        check_every: iterations between host synchronisations (loop exit, callback) of the log
            domain; default 1 on CPU, 10 on GPU. Convergence itself is tracked every iteration on
            the device, so results do not depend on this value. (Balanced scaling-domain solves
            without a callback check each problem on their own adaptive schedule instead: see
            ``domain``.)
        callback: called with a ``SinkhornProgress`` at every check.
        verbose: print progress every 100 iterations (as well as calling ``callback``).
        warn: emit one ``ConvergenceWarning`` if a problem did not converge.
        validate: check input values (finite costs and weights, equal masses), which reads them
            on the host. With ``validate=False`` and ``tol=0`` nothing is read on the host from
            input to output (training loops, CUDA graphs); shapes are still checked.
        implicit_rtol: conjugate-gradient setting of the implicit backward: its relative
            residual.
        implicit_max_iter: conjugate-gradient setting of the implicit backward: its iteration cap.
        domain: how an iteration computes its two softmins. ``"log"``: log-sum-exp over the
            costs (streamed by blocks or Triton kernels; one exponential per entry of C).
            ``"scaling"``: products with a stabilised kernel exp((f0 + g0 - C)/eps), rebuilt
            at the iterate whenever the scalings exp((f - f0)/eps) leave a safe range
            (absorption, Schmitzer 2019): matrix-vector speed with no overflow at any eps; it
            holds a (B, n, m) kernel. Balanced problems without a ``callback`` run
            ``scaling_loop``: two products and two divisions per iteration, the marginal error
            measured on each problem's own schedule (every k <= 64 iterations, and at most
            max(16, a quarter of the iterations run), k adapted to its contraction), so a problem stops at the first such check at or after the iteration
            at which its error reached tol (a few iterations later, and closer to the optimum,
            than the log domain; the same whether it is solved alone or in a batch). Others
            read the host once per half-step. ``"auto"``
            (default): scaling on the CPU where it is safe and worthwhile (no ``"unroll"``,
            float32 or float64, eps below the costs' range, a kernel within
            ``otcore.solvers.entropic.scaling.DENSE_BUDGET_BYTES``, 256 MiB by default), the
            log domain otherwise, and from the iteration on where absorptions come more often
            than every other iteration (eps small against the costs). Annealing iterations
            (``eps_scaling``) run in the log domain. Results agree within tol (potentials up
            to the gauge f + c, g - c of balanced problems).

        relative_eps: None (default), ``"mean"`` or ``"max"``: ``eps`` is then a fraction of the
            mean cost (OTT-JAX's ``relative_epsilon="mean"``) or of max |C|, averaged over a
            batch; ``result.eps`` holds the absolute value used. Reads the costs on the host.

    Returns:
        ``OTResult`` (batched if any input was). ``info`` holds ``{"error": final residual (B,)}``
        and, where float32 potentials were large against eps (|f| + |g| > eps tol / (10 u)),
        ``"error_float64"``: their marginal error re-evaluated in float64, which ``converged``
        then also requires to be <= tol (a float32 residual cannot resolve tol there). A solve
        stopped by a float32 error that float64 does not confirm, with room for the float32
        rounding of a plan's marginals (2 u (|f| + |g|) / eps), iterates on (within
        ``max_iter``) to tol / 4 before it is judged again (on tol alone).

    Raises:
        ValueError: invalid shapes, weights, costs, eps, tau, grad or unequal balanced masses.
    """
    eps = check_positive("eps", eps)
    tau_a, tau_b = check_tau("tau_a", tau_a), check_tau("tau_b", tau_b)
    given_rho_a, given_rho_b = check_rho("rho_a", rho_a, tau_a, "tau_a"), check_rho("rho_b", rho_b, tau_b, "tau_b")
    if grad not in GRAD_MODES:
        raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}")
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    max_iter = check_max_iter("max_iter", max_iter)
    eps_scaling = check_ratio("eps_scaling", eps_scaling)
    implicit_rtol = None if implicit_rtol is None else check_positive("implicit_rtol", implicit_rtol)
    implicit_max_iter = check_max_iter("implicit_max_iter", implicit_max_iter, minimum=0)
    balanced = all(rho is None or math.isinf(rho) for rho in (given_rho_a, given_rho_b)) and tau_a == tau_b == 1.0
    problem = prepare_problem(cost, a, b, balanced=balanced, validate=validate, sharded=True)
    geom = problem.geom
    eps = absolute_eps(geom, eps, relative_eps)
    tol = check_tol(default_tol(geom.dtype) if tol is None else tol)
    rho_a = rho_of(tau_a, eps) if given_rho_a is None else given_rho_a
    rho_b = rho_of(tau_b, eps) if given_rho_b is None else given_rho_b
    tau_a = tau_a if given_rho_a is None else tau_of(rho_a, eps)
    tau_b = tau_b if given_rho_b is None else tau_of(rho_b, eps)
    check_every = resolve_check_every(check_every, geom.device)
    callbacks = progress_callbacks("sinkhorn", callback, verbose)

    solve = functools.partial(run_sinkhorn, problem, eps=eps, rho_a=rho_a, rho_b=rho_b, check_every=check_every,
                              callbacks=callbacks, domain=domain, overrelax=bool(overrelax))
    judge = functools.partial(certified, geom, problem.a, problem.b, eps=eps, rho_a=rho_a, rho_b=rho_b, tol=tol)
    with torch.set_grad_enabled(grad == "unroll" and torch.is_grad_enabled()):
        outcome = solve(max_iter=max_iter, tol=tol, init=_initial_potentials(init, problem, validate=validate),
                        schedule=eps_schedule(geom, eps, eps_scaling))
        f, g = outcome.state
        remaining = 0
        if beyond_margin(geom, f.detach(), g.detach(), eps=eps, tol=tol, converged=outcome.converged):
            remaining = max_iter - int(outcome.n_iter.max())
        if remaining > 0:  # a judgement that could not pass: judged below, after more iterations
            converged, error64 = torch.zeros_like(outcome.converged), None
        else:
            converged, error64 = judge(f.detach(), g.detach(), converged=outcome.converged, margin=True)
            remaining = max_iter - int(outcome.n_iter.max()) if error64 is not None else 0
        if remaining > 0 and bool((outcome.converged & ~converged).any()):
            # stopped by a float32 error that float64 does not confirm: iterate on to a tighter tol
            more = solve(max_iter=remaining, tol=tol / 4, init=(f, g))
            outcome = dataclasses.replace(more, n_iter=outcome.n_iter + more.n_iter)
            f, g = outcome.state
            converged, error64 = judge(f.detach(), g.detach(), converged=~outcome.failed)  # tol itself, in float64
    info = {"error": outcome.error} if error64 is None else {"error": outcome.error, "error_float64": error64}
    if grad != "unroll":  # value: envelope theorem; f, g: constants (envelope) or implicit
        f, g = f.detach(), g.detach()
    value = dual_value(geom, problem.a, problem.b, g, eps=eps, rho_a=rho_a, rho_b=rho_b)
    imprecise = None if error64 is None else outcome.converged & ~converged
    converged, overflow = problem.without_overflow(converged, f, g, value)
    if warn and (tol > 0 or validate):
        warn_not_converged("sinkhorn", converged=converged, max_iter=max_iter, causes={
            "stopped on a non-finite iterate": outcome.failed,
            f"met tol in {geom.dtype} but not in float64 (potentials too large against eps for {geom.dtype}: "
            "solve in float64, loosen tol or increase eps)": imprecise,
            f"have outputs beyond the range of {problem.out_dtype} (solve in float32)": overflow,
        })
    point = FixedPoint(geom=geom, a=problem.a, b=problem.b, eps=eps, tau_a=tau_a, tau_b=tau_b)
    if grad == "implicit" and needs_implicit(point):
        f, g = implicit_potentials(point, f, g, rtol=implicit_rtol, max_iter=implicit_max_iter)
    return problem.result(
        f=f, g=g, value=value, n_iter=outcome.n_iter, converged=converged,
        operator=EntropicPlan(geom, problem.a, problem.b, f, g, eps), eps=eps, info=info,
    )


def run_sinkhorn(
    problem: Problem, *, eps: float, max_iter: int, tol: float, rho_a: float = math.inf, rho_b: float = math.inf,
    init: tuple[torch.Tensor, torch.Tensor] | None = None, schedule: Sequence[float] = (), check_every: int = 1,
    callbacks: Sequence[Callable[[SinkhornProgress], None]] = (), domain: str = "auto", overrelax: bool = True,
) -> LoopOutcome:
    """The Sinkhorn iterations on a prepared problem; ``state`` of the outcome is (f, g), batched.

    Problems freeze (stop updating) as soon as they converge. Differentiable by unrolling when
    gradients are enabled. ``init`` defaults to zeros. ``domain``: how iterations at the target
    eps compute their softmins (``sinkhorn``); annealing iterations run in the log domain.
    ``overrelax``: adaptive over-relaxation of the row updates at the target eps
    (``overrelaxation``).
    """
    geom, a, b = problem.geom, problem.a, problem.b
    B, n, m = geom.shape
    start = init if init is not None else (torch.zeros(B, n, dtype=geom.dtype, device=geom.device),
                                           torch.zeros(B, m, dtype=geom.dtype, device=geom.device))

    positive = a > 0
    zero_weight = not geom.validate or not bool(positive.all())  # validate=False: no host read
    kernel = stabilised_kernel(geom, eps, domain)
    balanced = math.isinf(rho_a) and math.isinf(rho_b)
    relaxation = Overrelaxation(positive if zero_weight else None, functools.partial(rounding_error, geom, eps=eps),
                                tol) if overrelax and balanced else None

    def step(state, e):
        f, g = state
        f_new, g_new, error = sinkhorn_step(geom, a, b, f, g, eps=e, rho_a=rho_a, rho_b=rho_b, kernel=kernel,
                                            relax=relaxation if e == eps else None)
        return (f_new, g_new), error, (refresh_zero_weight(positive, f, f_new) if zero_weight else f, g)

    loop = functools.partial(fixed_point_loop, step, eps=eps, check_every=check_every, callbacks=callbacks,
                             host_reads=geom.validate, agree=geom.all_true if geom.sharded else None)
    if kernel is None or not balanced or callbacks:
        # the first iteration's error is that of the initial (f, g), which is not a Sinkhorn iterate
        return loop(start, max_iter=max_iter, tol=tol, schedule=schedule, first_check=2)
    # scaling iterations checked every k iterations, after any annealing (log domain)
    annealed = None
    if schedule:
        # (its one iteration at eps measures nothing: max_iter ending here leaves it not converged)
        annealed = loop(start, max_iter=min(max_iter, len(schedule) + 1), tol=tol, schedule=schedule, first_check=2)
        start = (annealed.state[0], annealed.state[1])
    remaining = max_iter - (len(schedule) + 1 if schedule else 0)
    if remaining <= 0 and annealed is not None:
        return annealed
    outcome, finished = run_scaling_loop(kernel, a, b, *start, max_iter=remaining, tol=tol,
                                         factor=None if relaxation is None else relaxation.factor)
    if not finished:  # handed back: on with per-half-step iterations from its last checked iterate
        if relaxation is not None:
            relaxation.observed = int(outcome.n_iter.max())
        more = loop(outcome.state, max_iter=max(1, remaining - int(outcome.n_iter.max())), tol=tol, first_check=1)
        outcome = dataclasses.replace(more, n_iter=outcome.n_iter + more.n_iter)
    if annealed is not None:
        outcome = dataclasses.replace(outcome, n_iter=outcome.n_iter + annealed.n_iter,
                                      failed=outcome.failed | annealed.failed)
    return outcome


def sinkhorn_step(
    geom, a, b, f, g, *, eps: float, rho_a: float, rho_b: float, kernel: StabilisedKernel | None = None,
    relax: Overrelaxation | None = None,
):
    """One Sinkhorn iteration: ``(f_new, g_new, error of (f, g))``, (B, n), (B, m), (B,).

    (f, g) has exact column marginals (g was the last update), so its marginal error is the row
    error, which the f-update gives without a plan product. With a ``kernel`` the softmins are
    its (scaling domain at its eps), else the geometry's (log domain). With ``relax`` (at the
    target eps) the row update is over-relaxed and the error recorded in it.
    """
    if kernel is None:
        rows = geom.softmin(g, eps, b, axis=1)
    else:
        rows = kernel.softmin(f, g, b, axis=1, eps=eps)
    f_new = _damped(tau_of(rho_a, eps), rows)
    with torch.no_grad():
        error = row_error(geom, a, f, f_new, eps)
    if relax is not None:
        relax.observe(error, f, g)
        f_new = relax.relax(f, f_new)
    if kernel is None:
        columns = geom.softmin(f_new, eps, a, axis=0)
    else:
        columns = kernel.softmin(f_new, g, a, axis=0, eps=eps)
    g_new = _damped(tau_of(rho_b, eps), columns)
    return f_new, g_new, error


def refresh_zero_weight(positive: torch.Tensor, p: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``p``, with the entries of zero-weight points (``positive`` False) taken from ``update``.

    No marginal error sees a zero-weight point, so an accepted potential would otherwise keep
    whatever value it had (e.g. the c-transform of the initial g); its gradient in the weight
    reads that value.
    """
    return torch.where(positive, p, update)


def _damped(tau: float, potential: torch.Tensor) -> torch.Tensor:
    """``tau * potential``, without the multiplication when balanced (tau = 1)."""
    return potential if tau == 1.0 else tau * potential


def _initial_potentials(init, problem: Problem, *, validate: bool):
    if init is None:
        return None
    B, n, m = problem.geom.shape
    dtype = problem.geom.dtype
    if not isinstance(init, (tuple, list)) or len(init) != 2:
        raise ValueError(f"init must be a pair (f0, g0) of tensors, got {type(init).__name__}")
    f0, g0 = init
    for name, t, k in (("init[0]", f0, n), ("init[1]", g0, m)):
        shaped = torch.is_tensor(t) and t.is_floating_point() and t.shape[-1:] == (k,)
        if not shaped or t.dim() not in (1, 2) or (t.dim() == 2 and t.shape[0] not in (1, B)):
            shape = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"{name} must be a real floating tensor of shape ({k},) or ({B}, {k}), got {shape}")
        if validate:
            check_finite(name, t)
    return (f0.detach().to(dtype).expand(B, n).clone(), g0.detach().to(dtype).expand(B, m).clone())
