"""The entropic dual shared by Sinkhorn, SNS and the Sinkhorn divergence.

Convention (OTT/POT): ``P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps)``; a KL penalty rho on a
marginal enters the updates as ``tau = rho / (rho + eps)`` (tau = 1, rho = inf: balanced).
Every sum over points goes through the geometry (``Geometry.total``).
"""

from __future__ import annotations

import math

import torch

from otcore.geometry import Geometry
from otcore.kernels.softmin.blocked import EXP_CEIL


def default_tol(dtype: torch.dtype) -> float:
    """1e-6 in float64, 1e-4 in lower precision (where the marginal error plateaus near 1e-6)."""
    return 1e-6 if dtype == torch.float64 else 1e-4


def psi(f: torch.Tensor, rho: float) -> torch.Tensor:
    """Dual of the KL marginal penalty: rho (1 - exp(-f/rho)); f itself for rho = inf (balanced)."""
    return f if math.isinf(rho) else -rho * torch.expm1(-f / rho)


def rho_of(tau: float, eps: float) -> float:
    """KL penalty strength rho with tau = rho / (rho + eps) (inf for tau = 1)."""
    return math.inf if tau == 1.0 else eps * tau / (1.0 - tau)


def tau_of(rho: float, eps: float) -> float:
    """The update's damping tau = rho / (rho + eps) at a given eps (1 when balanced)."""
    return 1.0 if math.isinf(rho) else rho / (rho + eps)


def dual_value(
    geom: Geometry, a: torch.Tensor, b: torch.Tensor, g: torch.Tensor, *, eps: float,
    rho_a: float = math.inf, rho_b: float = math.inf,
) -> torch.Tensor:
    """Regularised OT objective through the dual at (tau_a softmin(g), g), (B,).

    D(f, g) = <a, psi_a(f)> + <b, psi_b(g)> - eps (sum P - |a| |b|) is maximised over f by
    f~ = tau_a softmin(g) (the c-transform; one row softmin), which is where it is evaluated,
    translated (unbalanced: ``translation``) by the best (f~ + lambda, g - lambda). Where the
    plan of f~ would overflow (an unbalanced iterate far from the optimum: the plan's row masses
    are exp((tau_a - 1) softmin(g)/eps)), f = softmin(g) takes its place, whose rows have the
    mass of a. The value is then finite for any g, a lower bound on the optimum by weak duality
    (D is evaluated at a dual point), and equals
    <P, C> + eps KL(P || a x b) (+ the marginal penalties) at the optimum, where f = f~ and
    lambda = 0, so only g is needed. Unbalanced zero-weight terms are 0 (see ``_on_support``).

    sum P - |a| |b| = sum_i a_i expm1((f~_i - s_i)/eps) + |a| (1 - |b|) (s: the row softmin) is
    computed in that form: at large eps both sums are ~|a| and their rounding, times eps, would
    swamp the value. It does not change under the translation.
    """
    s = geom.softmin(g, eps, b, axis=1)
    total_a, total_b = geom.total(a, 0), geom.total(b, 1)
    if math.isinf(rho_a) and math.isinf(rho_b):  # balanced: f~ = s, lambda = 0, and the expm1 sum is 0
        return geom.total(a * s, 0) + geom.total(b * g, 1) - eps * (total_a * (1 - total_b))
    f = tau_of(rho_a, eps) * s
    if not math.isinf(rho_a):
        with torch.no_grad():
            tame = geom.amax(((f - s) / eps).masked_fill(a == 0, -math.inf), 0) <= EXP_CEIL
        f = torch.where(tame.unsqueeze(-1), f, s)
    excess = geom.total(a * torch.expm1(_on_support(a, (f - s) / eps, rho_a)), 0) + total_a * (1 - total_b)
    shift = translation(geom, a, b, f, g, rho_a, rho_b).unsqueeze(-1)
    return (geom.total(a * psi(_on_support(a, f + shift, rho_a), rho_a), 0)
            + geom.total(b * psi(_on_support(b, g - shift, rho_b), rho_b), 1) - eps * excess)


def translation(
    geom: Geometry, a: torch.Tensor, b: torch.Tensor, f: torch.Tensor, g: torch.Tensor, rho_a: float, rho_b: float
) -> torch.Tensor:
    """The lambda (B,) maximising the marginal terms <a, psi_a(f + lambda)> + <b, psi_b(g - lambda)>
    (the transport term of the dual does not see it; Sejourne et al., "Translation-invariant
    Sinkhorn", AISTATS 2022): 0 when balanced, else where the two sides' derivatives
    <a, exp(-(f + lambda)/rho_a)> and <b, exp(-(g - lambda)/rho_b)> (|a|, |b| on a balanced side)
    meet, computed from their logarithms. 0 at an optimum; it keeps the value of an iterate cut
    short finite (psi of a very negative potential overflows). No gradient: it maximises.
    """
    if math.isinf(rho_a) and math.isinf(rho_b):
        return torch.zeros_like(f[:, 0])
    with torch.no_grad():
        log_a = _log_total(geom, a, f, rho_a, 0)
        log_b = _log_total(geom, b, g, rho_b, 1)
        if math.isinf(rho_b):
            return rho_a * (log_a - log_b)
        if math.isinf(rho_a):
            return rho_b * (log_a - log_b)
        return (log_a - log_b) * (rho_a * rho_b / (rho_a + rho_b))


def _log_total(geom: Geometry, w: torch.Tensor, p: torch.Tensor, rho: float, axis: int) -> torch.Tensor:
    """log <w, exp(-p/rho)> (log |w| when rho = inf): (B,), through the geometry's sums."""
    if math.isinf(rho):
        return torch.log(geom.total(w, axis))
    logits = torch.where(w > 0, torch.log(torch.where(w > 0, w, 1.0)) - p / rho, -math.inf)
    top = torch.nan_to_num(geom.amax(logits, axis), neginf=0.0)
    return torch.log(geom.total(torch.exp(logits - top.unsqueeze(-1)), axis)) + top


def _on_support(w: torch.Tensor, x: torch.Tensor, rho: float) -> torch.Tensor:
    """``x``, set to 0 where w = 0 when a KL marginal is in play (finite rho), before any
    exponential: an unbalanced potential's exponential term may overflow at a zero-weight point,
    and neither the value nor its gradient (0 * exp(inf) in backward) may see it. Balanced
    terms are finite, and keep their derivative in a zero weight."""
    return x if math.isinf(rho) else torch.where(w > 0, x, 0.0)


def row_error(
    geom: Geometry, a: torch.Tensor, f: torch.Tensor, f_new: torch.Tensor, eps: float, axis: int = 0
) -> torch.Tensor:
    """|P1 - a|_1 of potentials (f, g) whose row update gives ``f_new`` = softmin(g): (B,).

    (P1)_i = a_i exp((f_i - f_new_i)/eps), so the error needs no plan product. With ``axis=1``
    the same for the columns: |P^T 1 - b|_1 from (b, g, g_new).
    """
    return geom.total((a * torch.expm1((f - f_new) / eps)).abs(), axis)


def rounding_error(geom: Geometry, f: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """(B,) u (|f| + |g|) / eps: the relative rounding of the plan's exponents (f + g - C)/eps in
    the compute dtype (unit roundoff u), which bounds how small a marginal error it can show."""
    return (geom.amax(f.abs(), 0) + geom.amax(g.abs(), 1)) * (torch.finfo(geom.dtype).eps / eps)


def certified(
    geom: Geometry, a: torch.Tensor, b: torch.Tensor, f: torch.Tensor, g: torch.Tensor, *, eps: float,
    rho_a: float, rho_b: float, tol: float, converged: torch.Tensor, margin: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``converged``, re-judged in float64 where the compute dtype cannot resolve ``tol``.

    A marginal error measured in a dtype of unit roundoff u rests on exponents
    (f_i + g_j - C_ij)/eps rounded by about u (|f| + |g|)/eps; where that exceeds tol/10 the
    measurement cannot vouch for tol: those problems get their returned potentials evaluated
    in float64 (row and column residuals, as ``row_error``), and ``converged`` only where that
    meets ``tol``. Returns (converged, the float64 errors (B,) or None when none was needed).
    With ``margin``, the float64 error must also leave room for the compute dtype's rounding
    (twice the bound above, what a marginal error evaluated in that dtype may add): the first
    judgement of a stopped solve, so that one accepted there also shows an error <= tol when
    its plan is evaluated in its own dtype. Reads one flag on the host; a dense cost is copied
    to float64 for the check.
    """
    if geom.dtype == torch.float64 or tol == 0:
        return converged, None
    rounding = rounding_error(geom, f, g, eps)
    if not bool((converged & (rounding > tol / 10)).any()):
        return converged, None
    with torch.no_grad():
        geom64 = geom.to_dtype(torch.float64)
        a64, b64, f64, g64 = (t.double() for t in (a, b, f, g))
        f_new = tau_of(rho_a, eps) * geom64.softmin(g64, eps, b64, axis=1)
        g_new = tau_of(rho_b, eps) * geom64.softmin(f64, eps, a64, axis=0)
        error = row_error(geom64, a64, f64, f_new, eps) + row_error(geom64, b64, g64, g_new, eps, axis=1)
    slack = 2 * rounding if margin else 0.0
    return converged & (error + slack <= tol), error


def beyond_margin(geom: Geometry, f: torch.Tensor, g: torch.Tensor, *, eps: float, tol: float,
                  converged: torch.Tensor) -> bool:
    """Whether ``certified(..., margin=True)`` must reject every problem in ``converged`` whatever
    its float64 error: some problem converged, and for each one twice the rounding bound
    (``rounding_error``, the margin ``certified`` adds to a float64 error >= 0) exceeds ``tol``,
    compared as there, in float64; so the evaluation in float64 can be skipped. False in float64
    and for ``tol=0``. Reads one flag on the host."""
    if geom.dtype == torch.float64 or tol == 0:
        return False
    hopeless = 2 * rounding_error(geom, f, g, eps).double() > tol
    return bool(torch.stack((converged.any(), (hopeless | ~converged).all())).all())


RELATIVE_EPS = ("mean", "max")


def absolute_eps(geom: Geometry, eps: float, relative: str | None) -> float:
    """eps in the units of the cost: as given (``relative=None``), or times the mean cost
    (``"mean"``, OTT-JAX's ``relative_epsilon="mean"``) or the largest |C_ij| (``"max"``) of the
    problems, averaged over a batch. Reads one number on the host, and refuses ``validate=False``
    geometries, which read nothing there."""
    if relative is None:
        return eps
    if relative not in RELATIVE_EPS:
        raise ValueError(f"relative_eps must be None or one of {RELATIVE_EPS}, got {relative!r}")
    if not geom.validate:
        raise ValueError("relative_eps reads the costs on the host: it needs validate=True")
    scale = float((geom.mean_cost() if relative == "mean" else geom.max_cost()).mean())
    if not scale > 0:
        raise ValueError(f"relative_eps={relative!r} needs costs of positive {relative}, got {scale}")
    return eps * scale


def eps_schedule(geom: Geometry, eps: float, ratio: float | None) -> list[float]:
    """Annealed eps values max|C| ratio^t (> eps) that precede the target; empty for ``ratio=None``.

    Reads max|C| on the host once.
    """
    if ratio is None:
        return []
    start = float(geom.max_cost().max())
    steps = []
    while start > eps:
        steps.append(start)
        start *= ratio
    return steps
