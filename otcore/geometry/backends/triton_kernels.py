"""The Triton backend: a geometry's primitives through the fused kernels.

The softmin carries its own autograd (``kernels.softmin.op``); plan products that need
gradients (unrolled solves) take the differentiable torch path, the no-grad ones the kernels.
Triton is imported on the first call, never at package import.
"""

from __future__ import annotations

import torch

from . import torch_blocked


def _op():
    from otcore.kernels.softmin import op

    return op


def softmin(geom, h, eps, weights, transpose):
    return _op().softmin(*geom.kernel_operands(transpose), h, weights, eps)


def kernel_apply(geom, f, g, eps, weights, v, transpose, row_weights=None):
    if geom.needs_grad(f, g, weights, v, row_weights):
        return torch_blocked.kernel_apply(geom, f, g, eps, weights, v, transpose, row_weights)
    with torch.no_grad():
        return _op().kernel_apply(*geom.kernel_operands(transpose), _folded(f, row_weights, eps), g, weights, v, eps)


def kernel_cost(geom, f, g, eps, weights, row_weights=None):
    if geom.needs_grad(f, g, weights, row_weights):
        return torch_blocked.kernel_cost(geom, f, g, eps, weights, row_weights)
    with torch.no_grad():
        return _op().kernel_cost(*geom.kernel_operands(False), _folded(f, row_weights, eps), g, weights, eps)


def _folded(f: torch.Tensor, row_weights: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``f + eps log a``: the row weights joined into the exponent (-inf rows give exact zeros)."""
    return f if row_weights is None else f + eps * torch.log(row_weights.to(f.dtype))
