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

from collections.abc import Callable

import torch

Pair = tuple[torch.Tensor, torch.Tensor]


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, *, rtol: float, max_iter: int,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None, diagonal: torch.Tensor | None = None,
) -> torch.Tensor:
    """Solve ``A x = rhs`` for a batch of symmetric PSD operators by (preconditioned) CG; rhs (B, N).

    Each problem stops (is frozen) once its residual is below ``rtol * |rhs|``. ``project``
    (optional) maps vectors onto the range of A, for consistent singular systems; ``diagonal``
    (optional, (B, N)) is a Jacobi preconditioner (entries <= 0 are treated as 1).
    """
    if project is not None:
        rhs = project(rhs)
    inv_diag = None if diagonal is None else torch.where(diagonal > 0, 1 / diagonal, 1.0)

    def precondition(v):
        v = v if inv_diag is None else v * inv_diag
        return v if project is None else project(v)

    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = precondition(r)
    p = z
    rz = (r * z).sum(-1)
    stop = rtol**2 * (r * r).sum(-1)
    active = (r * r).sum(-1) > stop
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        Ap = matvec(p)
        pAp = (p * Ap).sum(-1)
        alpha = torch.where(active & (pAp > 0), rz / torch.where(pAp > 0, pAp, 1), 0).unsqueeze(-1)
        x = x + alpha * p
        r = r - alpha * Ap
        if project is not None:
            r = project(r)
        z = precondition(r)
        rz_new = (r * z).sum(-1)
        beta = torch.where(active, rz_new / torch.where(rz != 0, rz, 1), 0).unsqueeze(-1)
        p = torch.where(active.unsqueeze(-1), z + beta * p, p)
        rz = torch.where(active, rz_new, rz)
        active = active & ((r * r).sum(-1) > stop)
    return project(x) if project is not None else x


def solve_adjoint(
    plan_matmul: Callable[[torch.Tensor, bool], torch.Tensor],
    r: torch.Tensor,
    c: torch.Tensor,
    tau_a: float,
    tau_b: float,
    u: Pair,
    *,
    rtol: float,
    max_iter: int,
) -> Pair:
    """Solve ``(I - dT/dz)^T w = u`` through ``M y = u``, ``w = D y`` (module docstring).

    Args:
        plan_matmul: ``(v, transpose) -> P v`` with v (B, m, 1) (or P^T v, v (B, n, 1)).
        r, c: plan marginals (B, n), (B, m).
        u: (B, n), (B, m) cotangents; rows/columns of zero marginal must already be handled.
    """
    n = r.shape[-1]
    da, db = r / tau_a, c / tau_b

    def matvec(z: torch.Tensor) -> torch.Tensor:
        y, x = z[:, :n], z[:, n:]
        top = da * y + plan_matmul(x.unsqueeze(-1), False).squeeze(-1)
        bottom = db * x + plan_matmul(y.unsqueeze(-1), True).squeeze(-1)
        return torch.cat([top, bottom], dim=-1)

    project = None
    if tau_a == 1.0 and tau_b == 1.0:  # gauge: remove the null direction (1, -1)
        null = torch.cat([torch.ones_like(r), -torch.ones_like(c)], dim=-1)
        null = null / null.norm(dim=-1, keepdim=True)

        def project(z: torch.Tensor) -> torch.Tensor:
            return z - (z * null).sum(-1, keepdim=True) * null

    y = conjugate_gradient(matvec, torch.cat(u, dim=-1), rtol=rtol, max_iter=max_iter, project=project,
                           diagonal=torch.cat([da, db], dim=-1))
    return da * y[:, :n], db * y[:, n:]


class _ImplicitPotentials(torch.autograd.Function):
    """Identity on (f*, g*) forward; the implicit VJP into theta backward."""

    @staticmethod
    def forward(f, g, fixed_point_map, adjoint, *params):
        return f.clone(), g.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        f, g, fixed_point_map, adjoint, *params = inputs
        ctx.fixed_point_map, ctx.adjoint = fixed_point_map, adjoint
        ctx.save_for_backward(f, g, *params)

    @staticmethod
    def backward(ctx, grad_f, grad_g):
        f, g, *params = ctx.saved_tensors
        wf, wg = ctx.adjoint(f, g, grad_f, grad_g)
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(ctx.needs_input_grad[4 + i]) for i, p in enumerate(params)]
            tf, tg = ctx.fixed_point_map(f, g, *leaves)
            wanted = [p for p in leaves if p.requires_grad]
            grads = iter(torch.autograd.grad((tf, tg), wanted, (wf, wg), allow_unused=True)) if wanted else iter(())
        return (None, None, None, None, *[next(grads) if p.requires_grad else None for p in leaves])


def implicit_potentials(
    f: torch.Tensor,
    g: torch.Tensor,
    fixed_point_map: Callable[..., Pair],
    plan_matmul_at: Callable[[torch.Tensor, torch.Tensor], Callable[[torch.Tensor, bool], torch.Tensor]],
    params: tuple[torch.Tensor, ...],
    a: torch.Tensor,
    b: torch.Tensor,
    tau_a: float,
    tau_b: float,
    *,
    rtol: float,
    max_iter: int,
) -> Pair:
    """Attach implicit gradients to converged potentials.

    Args:
        f, g: (B, n), (B, m) converged potentials (no graph).
        fixed_point_map: ``(f, g, *params) -> T(f, g)``, differentiable in params.
        plan_matmul_at: ``(f, g) -> (v, transpose) -> P v``.
        params: tensors the problem depends on (geometry tensors, a, b).
        a, b: the weights (zero weights mark rows/columns solved outside the linear system).

    Returns:
        (f, g) equal to the inputs, whose backward runs the adjoint solve.
    """

    def adjoint(f0, g0, grad_f, grad_g):
        with torch.no_grad():
            matmul = plan_matmul_at(f0, g0)
            r = matmul(torch.ones_like(g0).unsqueeze(-1), False).squeeze(-1)
            c = matmul(torch.ones_like(f0).unsqueeze(-1), True).squeeze(-1)
            zero_a, zero_b = a == 0, b == 0
            has_zero = bool(zero_a.any() or zero_b.any())
            uf, ug = grad_f, grad_g
            if has_zero:  # zero-weight points: w = u there, and their effect moves to the rhs
                with torch.enable_grad():
                    fl, gl = f0.detach().requires_grad_(), g0.detach().requires_grad_()
                    tf, tg = fixed_point_map(fl, gl, *[p.detach() for p in params])
                    ef, eg = torch.autograd.grad((tf, tg), (fl, gl), (uf * zero_a, ug * zero_b), allow_unused=True)
                uf = torch.where(zero_a, 0, uf if ef is None else uf + ef)
                ug = torch.where(zero_b, 0, ug if eg is None else ug + eg)
            wf, wg = solve_adjoint(matmul, r, c, tau_a, tau_b, (uf, ug), rtol=rtol, max_iter=max_iter)
            if has_zero:
                wf, wg = torch.where(zero_a, grad_f, wf), torch.where(zero_b, grad_g, wg)
            return wf, wg

    return _ImplicitPotentials.apply(f, g, fixed_point_map, adjoint, *params)
