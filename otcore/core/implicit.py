"""Implicit differentiation of entropic OT potentials at their fixed point.

The solvers return potentials z* = (f*, g*) solving z = T(z; theta) with the Jacobi map

    T(f, g) = (tau_a * softmin_rows(g; b), tau_b * softmin_cols(f; a)).

For a loss L(z*), the implicit function theorem gives dL/dtheta = w^T dT/dtheta where
(I - dT/dz)^T w = dL/dz. With D = diag(r / tau_a, c / tau_b) (r = P1, c = P^T 1),

    I - dT/dz = D^{-1} M,   M = [[diag(r) / tau_a, P], [P^T, diag(c) / tau_b]],

and M is symmetric positive semi-definite (null vector (1, -1) when balanced, the gauge f + t,
g - t), so w = D y with M y = dL/dz solved by conjugate gradient using only plan products.
Points of zero weight influence nothing, so their rows of the system are solved exactly first.

Sinkhorn and Sinkhorn-Newton-Sparse share this module: they reach the same fixed point.

Reference: Luise et al., "Differential properties of Sinkhorn approximation", NeurIPS 2018;
Cuturi et al., OTT-JAX ``implicit_differentiation.py`` (the symmetric system).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from otcore.core.linalg import conjugate_gradient
from otcore.core.plan import DensePlan, EntropicPlan
from otcore.geometry import Geometry
from otcore.warnings import ConvergenceWarning

Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class FixedPoint:
    """The entropic fixed point being differentiated (weights batched, (B, n) and (B, m))."""

    geom: Geometry
    a: torch.Tensor
    b: torch.Tensor
    eps: float
    tau_a: float = 1.0
    tau_b: float = 1.0

    def map(self, f: torch.Tensor, g: torch.Tensor, *params: torch.Tensor) -> Pair:
        """``T(f, g)`` on the parameters ``(*geometry tensors, a, b)``, differentiable in them."""
        *tensors, a, b = params
        geom = self.geom.with_tensors(*tensors)
        return (self.tau_a * geom.softmin(g, self.eps, b, axis=1),
                self.tau_b * geom.softmin(f, self.eps, a, axis=0))

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        return (*self.geom.tensors, self.a, self.b)


def solve_adjoint(
    point: FixedPoint, plan: EntropicPlan | DensePlan, marginals: Pair, decoupled: Pair, u: Pair, *, rtol: float,
    max_iter: int,
) -> Pair:
    """Solve ``(I - dT/dz)^T w = u`` through ``M y = u``, ``w = D y`` (module docstring).

    CG runs on the symmetrically scaled system ``S^-1 M S^-1 (S y) = S^-1 u`` with S = D^(1/2)
    (identity diagonal, off-diagonal norm <= sqrt(tau_a tau_b)): its unknown S y = w / S stays
    within the dtype where y = w / D would not for points of tiny marginal mass. ``decoupled``
    (B, n), (B, m) marks the points solved outside (``_adjoint``): their ``u`` must be 0, and
    their w returned here is 0.
    """
    geom, n = point.geom, point.a.shape[-1]
    r, c = marginals
    scale = torch.cat([r / point.tau_a, c / point.tau_b], dim=-1).sqrt()
    scale = torch.where(torch.cat(decoupled, dim=-1), 0.0, scale)
    inv_scale = torch.where(scale > 0, 1 / torch.where(scale > 0, scale, 1.0), 0.0)

    def matvec(z: torch.Tensor) -> torch.Tensor:
        t = inv_scale * z
        top = plan.matmul(t[:, n:].unsqueeze(-1)).squeeze(-1)
        bottom = plan.matmul(t[:, :n].unsqueeze(-1), transpose=True).squeeze(-1)
        return z + inv_scale * torch.cat([top, bottom], dim=-1)

    project = None
    if point.tau_a == 1.0 and point.tau_b == 1.0:  # gauge: remove the null direction S (1, -1)
        null = scale * torch.cat([torch.ones_like(r), -torch.ones_like(c)], dim=-1)
        null = null / geom.pair_dot(null, null).sqrt().unsqueeze(-1)

        def project(z: torch.Tensor) -> torch.Tensor:
            return z - geom.pair_dot(z, null).unsqueeze(-1) * null

    scaled, solved = conjugate_gradient(matvec, inv_scale * torch.cat(u, dim=-1), rtol=rtol, max_iter=max_iter,
                                        project=project, inner=geom.pair_dot)
    if not bool(solved.all()):
        warnings.warn(
            f"implicit backward: the adjoint conjugate gradient did not reach rtol={rtol:g} within "
            f"implicit_max_iter={max_iter} for {int((~solved).sum())} of {solved.numel()} problem(s); "
            "the gradients are approximate. Raise implicit_max_iter or loosen implicit_rtol.",
            ConvergenceWarning, stacklevel=2,
        )
    w = scale * scaled
    return w[:, :n], w[:, n:]


def _adjoint(point: FixedPoint, f: torch.Tensor, g: torch.Tensor, grad_f, grad_g, *, rtol, max_iter) -> Pair:
    """``w`` for cotangents (grad_f, grad_g); decoupled points solved outside the CG.

    A point of zero weight, or whose plan marginal is below sqrt(tiny) of the dtype (an
    unbalanced point the plan gives no mass), influences no other point's update: there
    w = u, and its effect on the others moves to their right-hand side.
    """
    plan = EntropicPlan(point.geom, point.a, point.b, f, g, point.eps).for_products()
    r, c = plan.marginals()
    floor = math.sqrt(torch.finfo(r.dtype).tiny)
    zero_a = (point.a == 0) | (r <= floor * point.tau_a)
    zero_b = (point.b == 0) | (c <= floor * point.tau_b)
    has_zero = bool((~point.geom.all_true(~(zero_a.any(-1) | zero_b.any(-1)))).any())  # on any process
    uf, ug = grad_f, grad_g
    if has_zero:
        with torch.enable_grad():
            fl, gl = f.detach().requires_grad_(), g.detach().requires_grad_()
            tf, tg = point.map(fl, gl, *[p.detach() for p in point.params])
            ef, eg = torch.autograd.grad((tf, tg), (fl, gl), (uf * zero_a, ug * zero_b), allow_unused=True)
        uf = torch.where(zero_a, 0, uf if ef is None else uf + ef)
        ug = torch.where(zero_b, 0, ug if eg is None else ug + eg)
    wf, wg = solve_adjoint(point, plan, (r, c), (zero_a, zero_b), (uf, ug), rtol=rtol, max_iter=max_iter)
    if has_zero:
        wf, wg = torch.where(zero_a, grad_f, wf), torch.where(zero_b, grad_g, wg)
    return wf, wg


class _ImplicitPotentials(torch.autograd.Function):
    """Identity on (f*, g*) forward; the implicit VJP into theta backward."""

    @staticmethod
    def forward(f, g, point, options, *params):
        return f.clone(), g.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        f, g, point, options, *params = inputs
        ctx.point, ctx.options = point, options
        ctx.save_for_backward(f, g, *params)

    @staticmethod
    def backward(ctx, grad_f, grad_g):
        f, g, *params = ctx.saved_tensors
        with torch.no_grad():
            wf, wg = _adjoint(ctx.point, f, g, grad_f, grad_g, **ctx.options)
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(ctx.needs_input_grad[4 + i]) for i, p in enumerate(params)]
            tf, tg = ctx.point.map(f, g, *leaves)
            wanted = [p for p in leaves if p.requires_grad]
            grads = iter(torch.autograd.grad((tf, tg), wanted, (wf, wg), allow_unused=True)) if wanted else iter(())
        return (None, None, None, None, *[next(grads) if p.requires_grad else None for p in leaves])


def default_rtol(dtype: torch.dtype) -> float:
    """Relative residual of the adjoint CG: 1e-10 in float64, 1e-5 otherwise."""
    return 1e-10 if dtype == torch.float64 else 1e-5


def implicit_potentials(
    point: FixedPoint, f: torch.Tensor, g: torch.Tensor, *, rtol: float | None = None, max_iter: int = 1000,
) -> Pair:
    """Attach implicit gradients to converged potentials (B, n), (B, m) (no graph).

    Returns (f, g) equal to the inputs, whose backward solves the adjoint system by conjugate
    gradient (``rtol``: its relative residual, default ``default_rtol``; ``max_iter`` its cap)
    and pulls the result back through ``point.map`` into the geometry's tensors and the weights.
    """
    options = {"rtol": default_rtol(f.dtype) if rtol is None else rtol, "max_iter": max_iter}
    return _ImplicitPotentials.apply(f, g, point, options, *point.params)


def needs_implicit(point: FixedPoint) -> bool:
    """Whether autograd records through the fixed point (grad mode on, a parameter requires grad)."""
    return torch.is_grad_enabled() and any(p.requires_grad for p in point.params)
