"""Sparsity-constrained OT: at most k nonzeros in each column of the plan.

Solves ``min_{T in U(a, b)} <T, C> + sum_j Omega(t_j)`` with ``t_j`` the j-th column of T and

    Omega(t) = (gamma / 2) |t|_2^2 + indicator(|t|_0 <= k),

the convention of POT's ``ot.smooth`` with ``reg=gamma`` (``max_nz=k``), through one of two
concave maximisations over potentials:

* semi-dual ``S(alpha) = <a, alpha> - sum_j max_{t in b_j Delta, |t|_0 <= k} <alpha - c_j, t>
  - (gamma/2)|t|^2``, whose inner maximiser is the sparse simplex projection
  ``t_j = proj_{b_j Delta_k}((alpha - c_j) / gamma)``: columns sum exactly to b;
* dual ``D(alpha, beta) = <a, alpha> + <b, beta> - (gamma/2) |T|^2`` with
  ``T = topk_relu(alpha + beta_j - c_j) / gamma`` per column ("top-k squared ReLU").

In both, ``T_ij = [f_i + g_j - C_ij]_+ / gamma`` on the top-k support of each column (the
semi-dual's ``g_j = -gamma theta_j`` is the threshold of column j's projection). k >= n is the
squared-l2 regularised OT of Blondel et al. (POT ``reg_type="l2"``); k = 1 tends to
unregularised OT as gamma -> 0. For k < n the objectives are only piecewise smooth (ties
between supports), and both are convex relaxations: their optimum is a lower bound of the
nonconvex primal, the semi-dual's the tighter one.

References:
    Liu, Puigcerver, Blondel, "Sparsity-constrained optimal transport", ICLR 2023.
    Blondel, Seguy, Rolet, "Smooth and sparse optimal transport", AISTATS 2018.
    Kyrillidis, Becker, Cevher, Koch, "Sparse projections onto the simplex", ICML 2013.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import scipy.optimize
import torch

from otcore._validation import _real, check_max_iter, check_positive, check_tol
from otcore.core.linalg import conjugate_gradient
from otcore.core.plan import DensePlan
from otcore.core.problem import prepare_problem, warn_not_converged
from otcore.core.result import OTResult
from otcore.solvers.entropic.dual import default_tol
from otcore.solvers.projections import simplex_projection_sorted, top_k

FORMULATIONS = ("semi-dual", "dual")
METHODS = ("lbfgs", "adam")
DEFAULT_MAX_ITER = {"lbfgs": 500, "adam": 20}
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
_RESTARTS = 2  # L-BFGS-B restarts from its last point while they improve the objective ...
_RESTART_GAIN = 1e-9  # ... by more than this, relatively
_MEMORY = 30  # L-BFGS-B curvature pairs (scipy's default 10 stalls earlier at the kinks of k < n)
_NEWTON_STEPS = 30  # polishing steps after L-BFGS ...
_LINE_SEARCH = 30  # ... each with at most this many halvings
_FLAT = 1e-14  # objective changes below this (relative) are rounding
_WINDOW = 10  # k < n: L-BFGS stops when the objective rose over its last _WINDOW iterations ...
_FLATTENED = 1e-9  # ... by at most this, relatively, and has converged if by at most
_STALL = 1e-6  # this (see sparse_ot's docstring)
_FTOL = 1e-9  # L-BFGS-B, k >= n: stop when the objective decreases by less than this, relatively (POT's stopThr)

# (x, C^T / gamma, a, b) -> objective (B,), its gradient in x (B, N), plan (B, n, m), f (B, n), g (B, m)
# (plan and, for the semi-dual, g are None with plan=False)
Objective = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]]


def sparse_ot(
    cost,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    k: int,
    gamma: float = 1.0,
    formulation: str = "semi-dual",
    method: str = "lbfgs",
    tol: float | None = None,
    max_iter: int | None = None,
    lr: float = 1e-2,
    warn: bool = True,
    validate: bool = True,
) -> OTResult:
    """Sparsity-constrained OT (Liu, Puigcerver & Blondel 2023): a plan with <= k nonzeros per column.

    Maximises the semi-dual ``S(alpha)`` (default) or the dual ``D(alpha, beta)`` of the module
    docstring, with ``Omega(t) = (gamma/2)|t|^2`` on each column limited to k nonzeros: the same
    scaling as POT's ``ot.smooth.smooth_ot_semi_dual(a, b, C, reg=gamma,
    reg_type="sparsity_constrained", max_nz=k)`` (and ``reg_type="l2"`` for k >= n).

    Methods:
        ``"lbfgs"``: scipy's L-BFGS-B in float64, one problem at a time. The objective and its
        gradient are evaluated on the host for the semi-dual on the CPU (one ``torch.topk``, the
        rest in numpy: at n = 100 torch's per-operation dispatch was most of the time), else by
        torch on the input's device (only the potentials cross to the host). Chosen over
        ``torch.optim.LBFGS`` because its line search copes with the piecewise-smooth k < n
        objective (in trials torch's strong-Wolfe search stalled at kinks well below POT's
        optimum), and float64 whatever the input's dtype. It starts from ``alpha_i = min_j C_ij``
        (the c-transform of a zero column potential: every row within reach of its nearest
        column; beta = 0 for the dual), keeps 30 curvature pairs, and stops when every gradient
        entry is below tol / N (N = n, or n + m for the dual); for k >= n also as POT does
        (relative decrease of the objective below 1e-9 in one iteration); for k < n when the
        objective rose by at most 1e-9 relatively over the last 10 iterations (one small step is
        no sign of a maximum there: L-BFGS creeps along kinks, and POT's test stops it short).
        After a failed line search it restarts from its last point (fresh curvature memory)
        while that gains more than 1e-9 relatively, all within ``max_iter`` iterations. For
        k >= n (smooth) semismooth Newton steps on the plan's support then polish the problems
        above ``tol`` (quadratic once the support settles).
        The potentials are then differentiated implicitly: a conjugate-gradient solve with the
        objective's Hessian on the plan's support (exact where the support is locally constant).
        ``"adam"``: ``max_iter`` Adam steps of size ``lr`` from zero potentials, no host
        synchronisation (the V-MoE router recipe: 20 steps, lr 1e-2, gamma 1); the potentials
        and plan are differentiated by unrolling the steps (epsilon inside Adam's square root,
        so the unrolled graph stays finite).

    Args:
        cost: (n, m) / (B, n, m) tensor or a geometry (materialised: the method is O(nm)).
        a: (n,) / (B, n) source weights (None: uniform).
        b: (m,) / (B, m) target weights (None: uniform); equal total mass to a.
        k: at most k nonzeros per column (an integer >= 1; k >= n imposes no sparsity).
        gamma: weight of the quadratic term (> 0), in the units of the cost per unit mass.
        formulation: ``"semi-dual"`` (columns sum exactly to b) or ``"dual"``.
        method: ``"lbfgs"`` (to ``tol``) or ``"adam"`` (``max_iter`` steps).
        tol: target for the marginal error ``|T1 - a|_1 + |T^T 1 - b|_1`` (the gradient's l1
            norm). Default 1e-6 in float64, 1e-4 otherwise. With ``"adam"``, ``tol=0`` skips the
            test (``converged`` then only says the potentials are finite).
        max_iter: L-BFGS iterations (default 500, POT's) or Adam steps (default 20).
        lr: Adam's step size (ignored by L-BFGS, which uses a line search).
        warn: one ``ConvergenceWarning`` if a problem did not converge.
        validate: check input values (finite costs, weights, masses) on the host.

    Returns:
        ``OTResult`` with ``plan`` the sparse plan T (<= k nonzeros per column), ``f`` the
        potential alpha, ``g`` the column potential (beta; for the semi-dual ``-gamma theta_j``
        as above), ``value`` the objective reached (S or D; a lower bound of the sparse primal),
        ``eps=None`` and ``info={"error": marginal error (B,), "gain": (B,)}``, ``gain`` the
        objective's relative rise ``(S_last - S_10_before) / max(1, |S_last|)`` over the last 10
        L-BFGS iterations (fewer if fewer ran; NaN for Adam). ``converged`` is True when the
        error is <= tol, or, for k < n with L-BFGS, when ``gain <= 1e-6`` (the objective is
        flat: no certificate of the maximum, which often sits at a kink where the gradient,
        hence the row error, cannot vanish; the relaxation's plan is then only approximately
        feasible on the rows: read ``info["error"]``). ``value`` is
        differentiated by the envelope theorem in every mode: its gradient is the plan in C, f
        in a and g in b (for Adam, with the potentials held fixed). ``n_iter``: L-BFGS
        iterations (restarts included) or Adam steps.

    Raises:
        ValueError: k not an integer >= 1, gamma <= 0, unknown formulation or method, lr <= 0,
            and the usual bad shapes, weights, costs and unequal masses.
    """
    k = _check_k(k)
    gamma = check_positive("gamma", gamma)
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    max_iter = check_max_iter("max_iter", DEFAULT_MAX_ITER[method] if max_iter is None else max_iter)
    lr = check_positive("lr", lr)
    problem = prepare_problem(cost, a, b, balanced=True, validate=validate)
    C = problem.geom.materialize()
    a, b = problem.a, problem.b
    tol = check_tol(default_tol(C.dtype) if tol is None else tol)
    objective = _semi_dual if formulation == "semi-dual" else _dual
    scaled = _scaled_cost(C, gamma)
    B, n, m = C.shape
    x0 = torch.zeros(B, n if formulation == "semi-dual" else n + m, dtype=C.dtype, device=C.device)

    if method == "lbfgs":
        a64, b64 = a.detach().double(), b.detach().double()
        scaled64 = _scaled_cost(C.detach().double(), gamma)
        if formulation == "semi-dual" and C.device.type == "cpu":  # no per-evaluation dispatch of torch
            fns = [_host_semi_dual(scaled64[i], a64[i].numpy(), b64[i].numpy(), gamma=gamma, k=k) for i in range(B)]
        else:
            fns = [_device_objective(objective, scaled64[i:i + 1], a64[i:i + 1], b64[i:i + 1], gamma=gamma, k=k)
                   for i in range(B)]
        x0[:, :n] = C.detach().amin(-1)  # alpha = the c-transform of a zero column potential
        x, n_iter, gain = _lbfgs(fns, x0, max_iter=max_iter, tol=tol, smooth=k >= n)
        if k >= n:  # smooth: polish to tol; k < n: a stationary objective is the stopping test
            x = _newton_polish(objective, x, scaled64, a64, b64, gamma=gamma, k=k, tol=tol)
        stopped = (gain <= _STALL) & (k < n)
        x = _ImplicitPotentials.apply(x.to(C.dtype), C, a, b, gamma, k, formulation)
    else:
        x = adam_ascent(lambda x: objective(x, scaled, a, b, gamma=gamma, k=k, plan=False)[1], x0,
                        steps=max_iter, lr=lr)
        n_iter = torch.full((B,), max_iter, dtype=torch.int64, device=C.device)
        stopped = torch.zeros(B, dtype=torch.bool, device=C.device)
        gain = torch.full((B,), math.nan, dtype=torch.float64, device=C.device)
    objective_value, _, plan, f, g = objective(x, scaled, a, b, gamma=gamma, k=k)
    value = (objective_value.detach() + (plan.detach() * (C - C.detach())).sum((-2, -1))
             + (f.detach() * (a - a.detach())).sum(-1) + (g.detach() * (b - b.detach())).sum(-1))

    with torch.no_grad():
        error = _marginal_error(plan, a, b)
        finite = torch.isfinite(error) & torch.isfinite(f).all(-1) & torch.isfinite(g).all(-1)
        met = error <= tol if (method == "lbfgs" or tol > 0) else torch.ones_like(finite)
        converged, overflow = problem.without_overflow((met | stopped) & finite, f, g, value)
    if warn:
        warn_not_converged("sparse_ot", converged=converged, max_iter=max_iter, causes={
            "have non-finite potentials": ~finite,
            f"have outputs beyond the range of {problem.out_dtype} (solve in float32)": overflow,
        })
    return problem.result(f=f, g=g, value=value, n_iter=n_iter, converged=converged,
                          operator=DensePlan(problem.geom, a, b, plan, C),
                          info={"error": error, "gain": gain})


def _check_k(k) -> int:
    """k as an int, or ValueError unless it is an integer >= 1."""
    try:
        ok = _real("k", k, "an integer >= 1").is_integer() and int(k) >= 1
    except (ValueError, OverflowError):
        ok = False
    if not ok:
        raise ValueError(f"k (nonzeros per column) must be an integer >= 1, got {k!r}")
    return int(k)


# ------------------------------------------------------------------------------ objectives
def _scaled_cost(C: torch.Tensor, gamma: float) -> torch.Tensor:
    """C^T / gamma (B, m, n), contiguous: every column of the plan is then a contiguous row."""
    return (C.mT / gamma).contiguous()


def _minus_support_sums(a: torch.Tensor, t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """a - T1 (B, n) for the plan whose column j holds t[:, j] (B, m, k) at rows index[:, j]."""
    return a.scatter_add(-1, index.flatten(-2), t.flatten(-2).neg())


def _semi_dual(alpha, scaled, a, b, *, gamma: float, k: int, plan: bool = True):
    """Semi-dual S(alpha) (B,), its gradient a - T1 (B, n), the plan T (B, n, m), f, g (T and g
    None unless ``plan``); ``scaled`` is C^T / gamma (B, m, n).

    Column j of T is the projection of (alpha - c_j)/gamma onto {t >= 0, sum t = b_j, |t|_0 <= k}.
    Everything but the plan is computed on the (B, m, k) support: on it X_ij = gamma u, and
    since u = t + theta_j where t > 0, the column's term <X_j, t_j> - (gamma/2)|t_j|^2 is
    gamma ((1/2)|t_j|^2 + theta_j b_j).
    """
    values, index = top_k((alpha / gamma).unsqueeze(-2) - scaled, k)  # (B, m, k) each
    t, theta = simplex_projection_sorted(values, b)
    t_flat = t.flatten(-2)
    vecdot = torch.linalg.vecdot
    value = vecdot(a, alpha) - gamma * (vecdot(theta, b) + 0.5 * vecdot(t_flat, t_flat))
    grad = _minus_support_sums(a, t, index)
    if not plan:
        return value, grad, None, alpha, None
    return value, grad, t.new_zeros(scaled.shape).scatter(-1, index, t).mT, alpha, -gamma * theta


def _dual(x, scaled, a, b, *, gamma: float, k: int, plan: bool = True):
    """Dual D(alpha, beta) (B,), its gradient [a - T1, b - T^T 1] (B, n + m), the plan (None unless
    ``plan``), alpha, beta; ``scaled`` is C^T / gamma (B, m, n). T = [X]_+ / gamma on the top k of
    each column of X = alpha + beta - C."""
    n = scaled.shape[-1]
    alpha, beta = x[:, :n], x[:, n:]
    values, index = top_k((alpha / gamma).unsqueeze(-2) + (beta / gamma).unsqueeze(-1) - scaled, k)
    t = values.clamp(min=0)  # (B, m, k): the plan's entries on the support
    value = (a * alpha).sum(-1) + (b * beta).sum(-1) - 0.5 * gamma * (t * t).sum((-2, -1))
    grad = torch.cat([_minus_support_sums(a, t, index), b - t.sum(-1)], -1)
    T = t.new_zeros(scaled.shape).scatter(-1, index, t).mT if plan else None
    return value, grad, T, alpha, beta


# ------------------------------------------------------------------------------ objectives for L-BFGS
def _host_semi_dual(scaled: torch.Tensor, a: np.ndarray, b: np.ndarray, *, gamma: float, k: int):
    """The semi-dual of one problem for L-BFGS on the host: ``alpha (n,) -> (-S(alpha), -grad)``,
    float64 numpy; ``scaled`` is C^T / gamma (m, n), a float64 CPU tensor.

    ``_semi_dual`` in a dozen operations: one ``torch.topk`` (faster than numpy's partition),
    the rest in numpy on the (m, k) support, where an operation costs a microsecond, not torch's
    several (at n = 100 torch's dispatch was most of the evaluation's time). Among entries tied at
    the k-th place any may be kept: the value is the same, the gradient one of its supergradients
    (the returned plan applies the tie rule of ``top_k``).
    """
    n = scaled.shape[-1]
    ranks = np.arange(1.0, min(k, n) + 1)
    mass = b[:, None]

    def negated(alpha: np.ndarray):
        top = torch.topk(torch.from_numpy(alpha / gamma).sub(scaled), min(k, n), dim=-1)
        values, index = top.values.numpy(), top.indices.numpy()  # (m, k), descending
        theta = ((values.cumsum(-1) - mass) / ranks).max(-1)  # as simplex_projection_sorted
        t = np.maximum(values - theta[:, None], 0.0)
        value = a @ alpha - gamma * (theta @ b + 0.5 * np.vdot(t, t))
        return -value, np.bincount(index.ravel(), t.ravel(), minlength=n) - a

    return negated


def _device_objective(objective: Objective, scaled, a, b, *, gamma: float, k: int):
    """``objective`` of one problem (``scaled``, a, b with a batch of 1) for L-BFGS on the host:
    ``x (N,) -> (-value, -gradient)`` in float64 numpy, evaluated by torch on the tensors' device
    (only the N potentials cross)."""
    def negated(z: np.ndarray):
        with torch.no_grad():
            value, grad = objective(torch.as_tensor(z, device=scaled.device).unsqueeze(0), scaled, a, b,
                                    gamma=gamma, k=k, plan=False)[:2]
        return -float(value), -grad[0].cpu().numpy()

    return negated


# ------------------------------------------------------------------------------ optimisers
def _lbfgs(fns, x0: torch.Tensor, *, max_iter: int, tol: float, smooth: bool):
    """Maximise B objectives by scipy's L-BFGS-B, ``fns[i](z) -> (-value, -gradient)`` in float64
    numpy for problem i (``_host_semi_dual`` or ``_device_objective``).

    One float64 solve per problem, ``_MEMORY`` curvature pairs. L-BFGS-B stops when the
    gradient's entries are all below ``tol / N``, when its line search fails, or, if ``smooth``,
    when the objective's relative decrease falls below ``_FTOL`` (POT's test). Not smooth
    (k < n), one step that gains little is no sign of an optimum: L-BFGS creeps along a kink
    before it gets past it, and that test stopped it (and POT) short of the maximum, by 1e-4
    relatively on the asv problem. It stops instead when the objective rose by at most
    ``_FLATTENED`` relatively over its last ``_WINDOW`` iterations; after a failed line search it
    is restarted from its last point (fresh curvature memory) until a restart gains less than
    ``_RESTART_GAIN`` relatively; ``max_iter`` iterations in all.
    Returns the maximisers (B, N) (detached, float64), the iterations run (B,), and (B,) the
    objective's relative rise over the last ``_WINDOW`` iterations (fewer if fewer were run).
    """
    N = x0.shape[-1]
    xs, n_iter, gains = [], [], []
    values = []  # minus the objective: at the start, then after each iteration of the current problem

    def record(intermediate_result):
        values.append(intermediate_result.fun)
        if not smooth and len(values) > _WINDOW and values[-1 - _WINDOW] - values[-1] <= _FLATTENED * max(
                1.0, abs(values[-1])):
            raise StopIteration  # flat (k < n): L-BFGS-B returns with status 99

    for i, negated in enumerate(fns):
        z, nit = x0[i].detach().double().cpu().numpy(), 0
        values[:] = [negated(z)[0]]
        best = values[0]
        for attempt in range(_RESTARTS + 1):  # a fresh curvature memory gets L-BFGS past kinks (k < n)
            res = scipy.optimize.minimize(negated, z, jac=True, method="L-BFGS-B", options={
                "maxiter": max_iter - nit, "gtol": tol / N, "ftol": _FTOL if smooth else 0.0,
                "maxcor": _MEMORY, "maxfun": 25 * max_iter}, callback=record)
            nit, gain, z, best = nit + res.nit, best - res.fun, res.x, res.fun
            small = np.abs(res.jac).max() <= tol / N
            flat = res.status == 99 or attempt > 0 and gain <= _RESTART_GAIN * max(1.0, abs(res.fun))
            if small or flat or nit >= max_iter:
                break
        window = values[-1 - min(_WINDOW, len(values) - 1)]
        xs.append(torch.as_tensor(z, dtype=torch.float64, device=x0.device))
        n_iter.append(nit)
        gains.append(max(window - values[-1], 0.0) / max(1.0, abs(values[-1])))
    device = x0.device
    return (torch.stack(xs), torch.tensor(n_iter, dtype=torch.int64, device=device),
            torch.tensor(gains, dtype=torch.float64, device=device))


def adam_ascent(grad_fn, x0: torch.Tensor, *, steps: int, lr: float) -> torch.Tensor:
    """``steps`` Adam ascent steps from ``x0`` on the objective whose gradient is ``grad_fn(x)``.

    Betas (0.9, 0.999); epsilon 1e-8 inside the square root (``sqrt(v_hat + eps^2)``), so the
    unrolled graph stays finite where a gradient entry vanishes. Differentiable by unrolling
    (when autograd is on); no host synchronisation; seven elementwise operations a step.
    """
    beta1, beta2 = _ADAM_BETAS
    x, m, v = x0, torch.zeros_like(x0), torch.zeros_like(x0)
    for step in range(1, steps + 1):
        grad = grad_fn(x)
        m = torch.lerp(m, grad, 1 - beta1)
        v = torch.addcmul(beta2 * v, grad, grad, value=1 - beta2)
        x = torch.addcdiv(x, m, (v / (1 - beta2**step) + _ADAM_EPS**2).sqrt(), value=lr / (1 - beta1**step))
    return x



# ------------------------------------------------------------------------------ second order
def _marginal_error(plan: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|T1 - a|_1 + |T^T 1 - b|_1 per problem: (B,)."""
    return (plan.sum(-1) - a).abs().sum(-1) + (plan.sum(-2) - b).abs().sum(-1)


def _hessian(M: torch.Tensor, gamma: float, *, semi: bool, shift: float = 0.0) -> tuple[Callable, Callable | None]:
    """Minus the Hessian H of the objective with the plan's support M (B, n, m) held fixed, as
    ``(matvec, project)``: H v on (B, N), and the projection onto the range of H (off the gauge).

    Semi-dual: H = (1/gamma) sum_j (diag(M_j) - M_j M_j^T / |M_j|), gauge alpha + c.
    Dual: H = (1/gamma) [[diag(M 1), M], [M^T, diag(M^T 1)]], gauge (alpha + c, beta - c).
    Rows (and dual columns) outside the support are in the null space and projected to 0.
    ``shift > 0`` returns H + delta I instead (delta = shift x H's largest diagonal entry, no
    projection): solvable whatever the support's connected components.
    """
    rows, cols = M.sum(-1), M.sum(-2)
    n = M.shape[-2]
    if semi:
        per_col = cols.clamp(min=1)

        def matvec(v):
            mean = (M.mT @ v.unsqueeze(-1)) / per_col.unsqueeze(-1)
            return (rows * v - (M @ mean).squeeze(-1)) / gamma

        active = rows > 0
        gauge = active.to(M.dtype)
    else:
        def matvec(v):
            va, vb = v[:, :n], v[:, n:]
            return torch.cat([rows * va + (M @ vb.unsqueeze(-1)).squeeze(-1),
                              (M.mT @ va.unsqueeze(-1)).squeeze(-1) + cols * vb], -1) / gamma

        active = torch.cat([rows > 0, cols > 0], -1)
        gauge = torch.cat([(rows > 0).to(M.dtype), -(cols > 0).to(M.dtype)], -1)
    if shift > 0:
        delta = (shift / gamma) * torch.cat([rows, cols], -1).amax(-1, keepdim=True).clamp(min=1)
        return (lambda v: matvec(v) + delta * v), None
    norm2 = (gauge * gauge).sum(-1, keepdim=True).clamp(min=1)

    def project(v):
        v = torch.where(active, v, 0)
        return v - gauge * (v * gauge).sum(-1, keepdim=True) / norm2

    return matvec, project


def _solve(matvec, project, rhs: torch.Tensor) -> torch.Tensor:
    """H x = rhs on the range of H by conjugate gradient (B, N)."""
    rtol = 1e-13 if rhs.dtype == torch.float64 else 1e-6
    x, _ = conjugate_gradient(matvec, rhs, rtol=rtol, max_iter=min(1000, max(50, 2 * rhs.shape[-1])), project=project,
                              inner=lambda u, v: (u * v).sum(-1))
    return x


def _newton_polish(objective: Objective, x, scaled, a, b, *, gamma: float, k: int, tol: float) -> torch.Tensor:
    """Up to ``_NEWTON_STEPS`` semismooth Newton steps on the problems whose marginal error
    exceeds ``tol``: x <- x + t d with (H + delta I) d = grad (H on the current support; delta,
    1e-8 of H's largest diagonal, keeps disconnected supports solvable), t halved until the
    objective rises (Armijo) or, once it is flat to machine precision, the error falls. L-BFGS's
    value-based line search stalls there, far from a tight tol; Newton converges quadratically
    where the support settles (k >= n). A problem leaves the loop at the first failed search."""
    semi = objective is _semi_dual
    active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(_NEWTON_STEPS):
        value, grad, plan = objective(x, scaled, a, b, gamma=gamma, k=k)[:3]
        assert plan is not None  # plan=True
        error = _marginal_error(plan, a, b)
        active = active & (error > tol)
        if not bool(active.any()):
            break
        M = (plan > 0).to(x.dtype)
        step = _solve(*_hessian(M, gamma, semi=semi, shift=1e-8), grad)
        slope = (grad * step).sum(-1)
        pending = active
        for j in range(_LINE_SEARCH):
            t = 0.5**j
            trial = x + t * step
            value_t, _, plan_t = objective(trial, scaled, a, b, gamma=gamma, k=k)[:3]
            assert plan_t is not None
            flat = value_t >= value - _FLAT * value.abs().clamp(min=1)  # equal to machine precision
            better = pending & ((value_t > value + 1e-4 * t * slope) | flat & (_marginal_error(plan_t, a, b) < error))
            x = torch.where(better.unsqueeze(-1), trial, x)
            pending = pending & ~better
            if not bool(pending.any()):
                break
        active = active & ~pending
    return x


# ------------------------------------------------------------------------------ implicit gradient
class _ImplicitPotentials(torch.autograd.Function):
    """Identity on the optimal potentials x* (B, N) in the forward; in the backward, the
    implicit-function gradient of x*(C, a, b) through the optimality condition grad(x) = 0.

    With M the plan's support (T > 0) and the support held fixed, the condition's Jacobian in
    x is a PSD matrix H (singular along the gauge: alpha + c for the semi-dual, (alpha + c,
    beta - c) for the dual); ``H w = upstream`` is solved by conjugate gradient on the range of H.
    Semi-dual: H = (1/gamma) sum_j (diag(M_j) - M_j M_j^T / |M_j|); dual: (1/gamma) [[diag(M1), M],
    [M^T, diag(M^T 1)]].
    """

    @staticmethod
    def forward(x, C, a, b, gamma, k, formulation):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, C, a, b, gamma, k, formulation = inputs
        with torch.no_grad():
            objective = _semi_dual if formulation == "semi-dual" else _dual
            plan = objective(x, _scaled_cost(C, gamma), a, b, gamma=gamma, k=k)[2]
        ctx.save_for_backward((plan > 0).to(x.dtype))
        ctx.gamma, ctx.semi = gamma, formulation == "semi-dual"

    @staticmethod
    def backward(ctx, upstream):
        (M,) = ctx.saved_tensors
        gamma, n = ctx.gamma, M.shape[-2]
        matvec, project = _hessian(M, gamma, semi=ctx.semi)
        w = _solve(matvec, project, upstream)
        if ctx.semi:
            mean_on_support = (M.mT @ w.unsqueeze(-1)).squeeze(-1) / M.sum(-2).clamp(min=1)
            grad_C = M * (w.unsqueeze(-1) - mean_on_support.unsqueeze(-2)) / gamma
            grad_a, grad_b = w, -mean_on_support
        else:
            grad_a, grad_b = w[:, :n], w[:, n:]
            grad_C = M * (grad_a.unsqueeze(-1) + grad_b.unsqueeze(-2)) / gamma
        return None, grad_C, grad_a, grad_b, None, None, None
