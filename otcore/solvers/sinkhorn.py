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

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from otcore._validation import check_finite, check_positive, check_tau
from otcore.geometry import CostMatrix
from otcore.solvers.implicit import implicit_potentials
from otcore.solvers.plan import DensePlan, EntropicPlan
from otcore.solvers.problem import prepare_problem, warn_not_converged
from otcore.solvers.result import OTResult

GRAD_MODES = ("implicit", "unroll", "envelope")


@dataclass(frozen=True)
class SinkhornProgress:
    """What ``callback`` receives at each convergence check.

    Attributes:
        iteration: iterations done so far.
        error: (B,) marginal error |P1 - a|_1 + |P^T 1 - b|_1 of the current iterate (balanced; the
            fixed-point residual when unbalanced).
        active: (B,) problems still iterating.
        eps: the regularisation used at this iteration (differs from the target while annealing).
    """

    iteration: int
    error: torch.Tensor
    active: torch.Tensor
    eps: float


def default_tol(dtype: torch.dtype) -> float:
    """1e-6 in float64, 1e-4 in lower precision (where the marginal error plateaus near 1e-6)."""
    return 1e-6 if dtype == torch.float64 else 1e-4


def _print_progress(p: SinkhornProgress) -> None:
    if p.iteration % 100 == 0 or not bool(p.active.any()):
        print(f"sinkhorn it {p.iteration:6d}  eps {p.eps:.3g}  max error {float(p.error.max()):.3e}  "
              f"active {int(p.active.sum())}/{p.active.numel()}")


def psi(f: torch.Tensor, rho: float) -> torch.Tensor:
    """Dual of the KL marginal penalty: rho (1 - exp(-f/rho)); f itself for rho = inf (balanced)."""
    return f if math.isinf(rho) else -rho * torch.expm1(-f / rho)


def rho_of(tau: float, eps: float) -> float:
    """KL penalty strength rho with tau = rho / (rho + eps) (inf for tau = 1)."""
    return math.inf if tau == 1.0 else eps * tau / (1.0 - tau)


def dual_value(geom, a, b, f, g, eps, rho_a, rho_b) -> torch.Tensor:
    """Regularised OT objective through the dual, (B,).

    D = <a, psi_a(f)> + <b, psi_b(g)> - eps (sum P - |a| |b|), with sum P obtained from one row
    softmin. At the optimum it equals <P, C> + eps KL(P || a x b) (+ the marginal penalties).
    """
    s = geom.softmin(g, eps, b, axis=1)
    mass = (a * torch.exp((f - s) / eps)).sum(-1)
    return (a * psi(f, rho_a)).sum(-1) + (b * psi(g, rho_b)).sum(-1) - eps * (mass - a.sum(-1) * b.sum(-1))


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
    implicit_rtol: float | None = None,
    implicit_max_iter: int = 1000,
) -> OTResult:
    """Entropic OT by log-domain Sinkhorn iterations.

    Solves ``min_P <P, C> + eps KL(P || a x b)`` over couplings of a and b (balanced), or with the
    marginal constraints relaxed to ``rho KL(P1 || a)`` with ``tau = rho / (rho + eps)``.

    Args:
        cost: (n, m) / (B, n, m) tensor (read as a ``CostMatrix``) or a geometry.
        a: (n,) / (B, n) source weights, >= 0 (None: uniform 1/n).
        b: (m,) / (B, m) target weights (None: uniform 1/m). Balanced problems need equal masses.
        eps: entropic regularisation (> 0), in the units of the cost.
        tau_a, tau_b: marginal relaxation in (0, 1]; 1 = hard constraint.
        max_iter: iteration cap (one iteration = an f- and a g-update).
        tol: stop when |P1 - a|_1 + |P^T 1 - b|_1 <= tol (balanced; for unbalanced problems the
            same L1 residual of the fixed point f = tau_a softmin(g)). Default: ``default_tol``.
        grad: ``"implicit"`` (linear solve at the fixed point, constant memory), ``"unroll"``
            (backprop through every iteration) or ``"envelope"`` (potentials returned detached; the
            gradient of ``value`` is exact by the envelope theorem, other outputs see only their
            explicit dependence). In every mode d value / d C = plan; except for ``"unroll"``,
            ``value`` is differentiated by the envelope theorem (its implicit term vanishes).
        init: warm start ``(f0, g0)``; the first update recomputes f from g0.
        eps_scaling: if set (a ratio in (0, 1)), anneal eps_t = max(eps, max|C| * ratio^t) before
            iterating at ``eps``; convergence is only checked at the target eps.
        check_every: iterations between host synchronisations (loop exit, callback); default 1 on
            CPU, 10 on GPU. Convergence itself is tracked every iteration on the device, so results
            do not depend on this value.
        callback: called with a ``SinkhornProgress`` at every check.
        verbose: print progress every 100 iterations.
        warn: emit one ``ConvergenceWarning`` if a problem did not converge.
        implicit_rtol, implicit_max_iter: conjugate-gradient settings of the implicit backward.

    Returns:
        ``OTResult`` (batched if any input was). ``info`` holds ``{"error": final residual (B,)}``.

    Raises:
        ValueError: invalid shapes, weights, costs, eps, tau, grad or unequal balanced masses.
    """
    eps = check_positive("eps", eps)
    tau_a, tau_b = check_tau("tau_a", tau_a), check_tau("tau_b", tau_b)
    if grad not in GRAD_MODES:
        raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter!r}")
    if eps_scaling is not None and not 0.0 < float(eps_scaling) < 1.0:
        raise ValueError(f"eps_scaling must lie in (0, 1), got {eps_scaling!r}")
    problem = prepare_problem(cost, a, b, balanced=tau_a == 1.0 and tau_b == 1.0)
    geom, a, b = problem.geom, problem.a, problem.b
    tol = check_positive("tol", default_tol(geom.dtype) if tol is None else tol)
    B, n, m = geom.shape
    rho_a, rho_b = rho_of(tau_a, eps), rho_of(tau_b, eps)
    f, g = _initial_potentials(init, B, n, m, geom)
    if check_every is None:
        check_every = 10 if geom.device.type == "cuda" else 1
    if verbose and callback is None:
        callback = _print_progress

    schedule = _eps_schedule(geom, eps, eps_scaling)
    with torch.set_grad_enabled(grad == "unroll" and torch.is_grad_enabled()):
        f, g, n_iter, converged, failed, error = _iterate(
            geom, a, b, f, g, eps, rho_a, rho_b, schedule, int(max_iter), tol, int(check_every), callback
        )
    warn_not_converged("sinkhorn", converged, failed, int(max_iter), warn)

    if grad != "unroll":  # value: envelope theorem; f, g: constants (envelope) or implicit
        f, g = f.detach(), g.detach()
    value = dual_value(geom, a, b, f, g, eps, rho_a, rho_b)
    params = (*geom.tensors, a, b)
    if grad == "implicit" and torch.is_grad_enabled() and any(p.requires_grad for p in params):
        f, g = attach_implicit(geom, a, b, f, g, eps, tau_a, tau_b, implicit_rtol, implicit_max_iter)

    out = problem.out_dtype
    operator = EntropicPlan(geom, a, b, f, g, eps)
    return OTResult(
        f.to(out), g.to(out), value.to(out), n_iter, converged, operator, a, b, problem.batched, eps,
        {"error": error},
    )


def _initial_potentials(init, B, n, m, geom):
    if init is None:
        return tuple(torch.zeros(B, k, dtype=geom.dtype, device=geom.device) for k in (n, m))
    f0, g0 = init
    for name, t, k in (("init[0]", f0, n), ("init[1]", g0, m)):
        if not torch.is_tensor(t) or t.shape[-1] != k or t.dim() not in (1, 2):
            raise ValueError(f"{name} must be a tensor of shape ({k},) or ({B}, {k})")
        check_finite(name, t)
    return (f0.detach().to(geom.dtype).expand(B, n).clone(), g0.detach().to(geom.dtype).expand(B, m).clone())


def _eps_schedule(geom, eps: float, ratio: float | None) -> list[float]:
    """Annealed eps values that precede the target (empty without eps-scaling)."""
    if ratio is None:
        return []
    start = float(geom.max_cost().max())
    steps = []
    while start > eps:
        steps.append(start)
        start *= ratio
    return steps


def _iterate(geom, a, b, f, g, eps, rho_a, rho_b, schedule, max_iter, tol, check_every, callback):
    """The Sinkhorn loop; problems freeze (stop updating) as soon as they converge."""
    B = a.shape[0]
    device = a.device
    active = torch.ones(B, dtype=torch.bool, device=device)
    converged = torch.zeros_like(active)
    failed = torch.zeros_like(active)
    n_iter = torch.zeros(B, dtype=torch.int64, device=device)
    error = torch.full((B,), float("inf"), dtype=a.dtype, device=device)
    for it in range(1, max_iter + 1):
        annealing = it <= len(schedule)
        e = schedule[it - 1] if annealing else eps
        ta = 1.0 if math.isinf(rho_a) else rho_a / (rho_a + e)
        tb = 1.0 if math.isinf(rho_b) else rho_b / (rho_b + e)
        f_new = ta * geom.softmin(g, e, b, axis=1)
        if not annealing and it > 1:  # (f, g) has exact column marginals: measure its row error
            with torch.no_grad():
                error = torch.where(active, (a * torch.expm1((f - f_new) / e)).abs().sum(-1), error)
                done = active & (error <= tol)
                converged = converged | done
                active = active & ~done
        g_new = tb * geom.softmin(f_new, e, a, axis=0)
        with torch.no_grad():
            bad = active & ~(torch.isfinite(f_new).all(-1) & torch.isfinite(g_new).all(-1))
            failed = failed | bad
            active = active & ~bad
            n_iter = n_iter + active.long()
        keep = active.unsqueeze(-1)
        f, g = torch.where(keep, f_new, f), torch.where(keep, g_new, g)
        if it % check_every == 0 or it == max_iter:
            if callback is not None:
                callback(SinkhornProgress(it, error, active, e))
            if not bool(active.any()):
                break
    return f, g, n_iter, converged, failed, error


def symmetric_potential(geom, a, eps, *, tol, max_iter, warn=True):
    """Self-transport potential f = softmin(C, f; a) of a symmetric problem (C = C^T, b = a).

    Averaged updates f <- (f + softmin(f)) / 2 converge in a few iterations where the alternating
    Sinkhorn map oscillates (Feydy et al. 2019, Sec. 3.1). Differentiable by unrolling when grad
    is enabled. Returns f (B, n).
    """
    f = torch.zeros_like(a)
    active = torch.ones(a.shape[0], dtype=torch.bool, device=a.device)
    for _ in range(max_iter):
        s = geom.softmin(f, eps, a, axis=1)
        with torch.no_grad():
            error = 2 * (a * torch.expm1((f - s) / eps)).abs().sum(-1)
            active = active & (error > tol)
        if not bool(active.any()):
            break
        f = torch.where(active.unsqueeze(-1), 0.5 * (f + s), f)
    warn_not_converged("sinkhorn (symmetric)", ~active, torch.zeros_like(active), max_iter, warn)
    return f


def attach_implicit(geom, a, b, f, g, eps, tau_a, tau_b, rtol, max_iter):
    def fixed_point_map(f0, g0, *params):
        *tensors, a0, b0 = params
        gm = geom.with_tensors(*tensors)
        return tau_a * gm.softmin(g0, eps, b0, axis=1), tau_b * gm.softmin(f0, eps, a0, axis=0)

    def plan_matmul_at(f0, g0):
        op = EntropicPlan(geom, a, b, f0, g0, eps)
        if isinstance(geom, CostMatrix):  # a dense plan costs no more memory than C itself
            op = DensePlan(op.dense(), geom.materialize())
        return op.matmul

    if rtol is None:
        rtol = 1e-10 if geom.dtype == torch.float64 else 1e-5
    return implicit_potentials(
        f, g, fixed_point_map, plan_matmul_at, (*geom.tensors, a, b), a, b, tau_a, tau_b,
        rtol=rtol, max_iter=max_iter,
    )
