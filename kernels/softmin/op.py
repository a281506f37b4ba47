"""The Triton kernels as ``torch.library`` operators, with the softmin's autograd formula.

Operands follow ``triton``: ``a`` is a dense cost (B, n, m) (``b`` None) or points
(B, n, d) with ``b`` (B, m, d). The reduced axis carries a potential ``h`` (B, m) and optional
weights ``w`` (B, m). With the row-stochastic matrix pi_ij = w_j exp((h_j - C_ij)/eps - lse_i),

    lse_i = log sum_j w_j exp((h_j - C_ij) / eps)          (``softmin_lse``)
    d lse_i / d h_j = pi_ij / eps,   d lse_i / d w_j = pi_ij / w_j,   d lse_i / d C_ij = -pi_ij / eps.

The backward pass for an upstream gradient G (B, n) is two more streaming passes:

* over rows:    Y_i = sum_j pi_ij k_ij b_j and r_i = sum_j pi_ij k_ij, so that
                dL/da_i = -(G_i / eps) (r_i a_i - Y_i)      (k = dC/da / (a - b): 2, or 1/|a - b|)
* over columns: T_j = sum_i G_i q_ij,  U_j = sum_i G_i q_ij k_ij,  X_j = sum_i G_i q_ij k_ij a_i with
                q_ij = pi_ij / w_j, so that dL/dw_j = T_j, dL/dh_j = w_j T_j / eps and
                dL/db_j = -(w_j / eps) (U_j b_j - X_j).

q is formed without log w (exact zero weights keep finite gradients) and its exponent clamped at
``EXP_CEIL``, as in ``blocked.weighted_lse``. For a dense cost, dL/dC = -(G/eps) pi is an
(n, m) tensor by nature and is formed directly.

The operators are opaque ``torch.library.custom_op``s with shape-only fake implementations, so
``torch.compile`` (and ``torch.export``) keeps them whole, identically on GPUs and under the
CPU interpreter. This module imports Triton: geometries load it only on the ``"triton"`` backend.
"""

from __future__ import annotations

import torch
from torch.library import custom_op

from ..codes import COEF_COST, COEF_DCOST, COEF_ONE, COST_DENSE, COST_SQEUCLIDEAN
from . import triton as kt
from .blocked import EXP_CEIL

INF = float("inf")


@custom_op("otcore::plan_apply", mutates_args=())
def plan_apply(
    a: torch.Tensor, b: torch.Tensor | None, s: torch.Tensor, l: torch.Tensor, v: torch.Tensor | None,
    r: torch.Tensor | None, eps: float, cost: int, coef: int, ceil: float, want_rows: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``triton.apply`` as an operator (no autograd)."""
    return kt.apply(a, b, s.contiguous(), l.contiguous(), v, None if r is None else r.contiguous(),
                    eps, cost, coef, ceil, want_rows)


@custom_op("otcore::softmin_lse", mutates_args=())
def softmin_lse(
    a: torch.Tensor, b: torch.Tensor | None, h: torch.Tensor, w: torch.Tensor | None, eps: float, cost: int,
) -> torch.Tensor:
    """``log sum_j w_j exp((h_j - C_ij)/eps)``: (B, n), in ``h``'s dtype."""
    return kt.lse(a, b, _scores(h, w, eps), eps, cost)


@plan_apply.register_fake
def _plan_apply_shapes(a, b, s, l, v, r, eps, cost, coef, ceil, want_rows):
    B, n = a.shape[:2]
    return s.new_empty(B, n, 0 if v is None else v.shape[-1]), s.new_empty(B, n)


@softmin_lse.register_fake
def _softmin_lse_shapes(a, b, h, w, eps, cost):
    return h.new_empty(a.shape[:2])


def _scores(h: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    s = h / eps
    return s if w is None else s + torch.log(w.to(h.dtype))


def _setup_context(ctx, inputs, output):
    a, b, h, w, eps, cost = inputs
    ctx.save_for_backward(a, b, h, w, output)
    ctx.eps, ctx.cost = eps, cost


def _backward(ctx, grad):
    a, b, h, w, lse = ctx.saved_tensors
    eps, cost = ctx.eps, ctx.cost
    need_a, need_b, need_h, need_w = ctx.needs_input_grad[:4]
    grad = grad.to(h.dtype)
    grad_a = grad_b = grad_h = grad_w = None
    dense = cost == COST_DENSE
    if need_a:
        s = _scores(h, w, eps)
        if dense:
            grad_a = _dense_cost_grad(a, s, lse, grad, eps)
        else:
            ys, rows = plan_apply(a, b, s, lse, b, None, eps, cost, COEF_DCOST, INF, True)
            grad_a = -(grad / eps).unsqueeze(-1) * (rows.unsqueeze(-1) * a.to(ys.dtype) - ys)
            grad_a = grad_a.to(a.dtype)
    if need_b or need_h or need_w:
        # the same sums over the rows i, as plan products of the transposed problem
        at, bt = (a.mT, None) if dense else (b, a)
        weighted_points = grad.unsqueeze(-1) * a.to(grad.dtype) if (need_b and not dense) else None
        coef = COEF_DCOST if weighted_points is not None else COEF_ONE
        xs, us = plan_apply(at, bt, -lse, -h / eps, weighted_points, grad, eps, cost, coef, EXP_CEIL, True)
        ww = torch.ones_like(h) if w is None else w.to(h.dtype)
        if weighted_points is not None:
            grad_b = (-(ww / eps).unsqueeze(-1) * (us.unsqueeze(-1) * b.to(xs.dtype) - xs)).to(b.dtype)
        if need_h or need_w:
            if coef == COEF_ONE:
                totals = us
            elif cost == COST_SQEUCLIDEAN:  # k_ij = 2 everywhere
                totals = us / 2
            else:
                _, totals = plan_apply(at, bt, -lse, -h / eps, None, grad, eps, cost, COEF_ONE, EXP_CEIL, True)
            grad_h = ww * totals / eps if need_h else None
            grad_w = totals.to(w.dtype) if need_w else None
    return grad_a, grad_b, grad_h, grad_w, None, None


def _dense_cost_grad(C: torch.Tensor, s: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor, eps: float):
    """``-(G_i / eps) exp(s_j - C_ij / eps - lse_i)``: (B, n, m), built in place in one buffer."""
    out = C.to(s.dtype, copy=True).mul_(-1.0 / eps)
    out.add_(s.unsqueeze(-2)).sub_(lse.unsqueeze(-1)).exp_().mul_((grad / -eps).unsqueeze(-1))
    return out.to(C.dtype)


softmin_lse.register_autograd(_backward, setup_context=_setup_context)


def softmin(a, b, cost: int, h, w, eps: float) -> torch.Tensor:
    """``-eps log sum_j w_j exp((h_j - C_ij)/eps)``: (B, n), differentiable in a, b, h and w."""
    return -eps * softmin_lse(a, b, h, w, eps, cost)


def kernel_apply(a, b, cost: int, f, g, w, v, eps: float) -> torch.Tensor:
    """``sum_j w_j exp((f_i + g_j - C_ij)/eps) v_jk``: (B, n, k) (no autograd)."""
    out, _ = plan_apply(a, b, _scores(g, w, eps), -f / eps, v.to(f.dtype), None, eps, cost, COEF_ONE, INF, False)
    return out


def kernel_cost(a, b, cost: int, f, g, w, eps: float) -> torch.Tensor:
    """``sum_j w_j exp((f_i + g_j - C_ij)/eps) C_ij``: (B, n) (no autograd)."""
    _, rows = plan_apply(a, b, _scores(g, w, eps), -f / eps, None, None, eps, cost, COEF_COST, INF, True)
    return rows
