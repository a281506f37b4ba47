"""The entropic dual shared by Sinkhorn, SNS and the Sinkhorn divergence.

Convention (OTT/POT): ``P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps)``; a KL penalty rho on a
marginal enters the updates as ``tau = rho / (rho + eps)`` (tau = 1, rho = inf: balanced).
Every sum over points goes through the geometry (``Geometry.total``).
"""

from __future__ import annotations

import math

import torch

from otcore.geometry import Geometry


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
    geom: Geometry, a: torch.Tensor, b: torch.Tensor, f: torch.Tensor, g: torch.Tensor, *, eps: float,
    rho_a: float = math.inf, rho_b: float = math.inf,
) -> torch.Tensor:
    """Regularised OT objective through the dual, (B,).

    D = <a, psi_a(f)> + <b, psi_b(g)> - eps (sum P - |a| |b|), with sum P obtained from one row
    softmin. At the optimum it equals <P, C> + eps KL(P || a x b) (+ the marginal penalties).

    sum P - |a| |b| = sum_i a_i expm1((f_i - s_i)/eps) + |a| (1 - |b|) (s: the row softmin) is
    computed in that form: at large eps both sums are ~|a| and their rounding, times eps, would
    swamp the value.
    """
    s = geom.softmin(g, eps, b, axis=1)
    total_a, total_b = geom.total(a, 0), geom.total(b, 1)
    excess = geom.total(a * torch.expm1((f - s) / eps), 0) + total_a * (1 - total_b)
    return geom.total(a * psi(f, rho_a), 0) + geom.total(b * psi(g, rho_b), 1) - eps * excess


def row_error(geom: Geometry, a: torch.Tensor, f: torch.Tensor, f_new: torch.Tensor, eps: float) -> torch.Tensor:
    """|P1 - a|_1 of potentials (f, g) whose row update gives ``f_new`` = softmin(g): (B,).

    (P1)_i = a_i exp((f_i - f_new_i)/eps), so the error needs no plan product.
    """
    return geom.total((a * torch.expm1((f - f_new) / eps)).abs(), 0)


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
