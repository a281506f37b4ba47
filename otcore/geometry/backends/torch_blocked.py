"""The torch backend: a geometry's primitives computed one block of rows at a time.

Without gradients, each block of scores ``h_j - C_ij / eps`` is written by the geometry
(``fill_scores``) into a reused buffer and reduced in place (``kernels.softmin.blocked``). With
gradients, each block runs the differentiable ``block_*`` function on ``cost_rows`` under
activation checkpointing, so autograd keeps only the inputs and memory stays O(n + m) per call.

Every function takes the geometry first and ``transpose`` (True: reduce over the rows of C,
i.e. work on C^T); shapes are those of ``Geometry.softmin`` / ``kernel_apply`` / ``kernel_cost``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from otcore.kernels.softmin import blocked


def map_rows(geom, block_fn: Callable[..., torch.Tensor], transpose: bool, row_args, col_args, grad: bool):
    """Concatenate ``block_fn(cost_block, *row_args[rows], *col_args)`` over blocks of rows."""
    B, n, m = geom.shape
    n_rows, row_len = (m, n) if transpose else (n, m)
    outs = []
    for rows in blocked.row_blocks(n_rows, row_len, B, blocked.block_elements(geom.device)):
        def run(rows=rows):
            sliced = [t[:, rows] if t is not None else None for t in row_args]
            return block_fn(geom.cost_rows(rows, transpose), *sliced, *col_args)

        outs.append(checkpoint(run, use_reentrant=False) if grad else run())
    return torch.cat(outs, dim=1)


def _fused(geom, block_fn, transpose: bool) -> torch.Tensor:
    B, n, m = geom.shape
    n_out, n_red = (m, n) if transpose else (n, m)
    return blocked.blocked_map(block_fn, n_out, n_red, B, geom.dtype, geom.device)


def _scores(geom, rows: slice, buffers, h: torch.Tensor, inv_eps: float, transpose: bool, index: int = 0):
    """Fill a reused buffer with ``h_j - C_ij * inv_eps`` for ``rows``; returns (buf, dim, row offset)."""
    B, n, m = geom.shape
    width, length = rows.stop - rows.start, (n if transpose else m)
    dim = geom.fused_layout(transpose)
    buf = buffers.get(index, (B, width, length) if dim == -1 else (B, length, width))
    offset = geom.fill_scores(rows, buf, h, inv_eps, transpose)
    return buf, dim, offset


def softmin(geom, h, eps, weights, transpose):
    if geom.needs_grad(h, weights):
        block = functools.partial(blocked.block_softmin, eps=eps)
        return map_rows(geom, block, transpose, (), (h, weights), grad=True)
    with torch.no_grad():
        scaled = h / eps + blocked.log_weights(weights, h)
        streamed = geom.stream_lse(scaled, 1.0 / eps, transpose)
        if streamed is not None:
            return streamed.mul_(-eps)

        def block_fn(rows, buffers):
            buf, dim, offset = _scores(geom, rows, buffers, scaled, 1.0 / eps, transpose)
            lse = blocked.lse_(buf, dim)
            return (lse if offset is None else lse.add_(offset)).mul_(-eps)

        return _fused(geom, block_fn, transpose)


def kernel_apply(geom, f, g, eps, weights, v, transpose):
    if geom.needs_grad(f, g, weights, v):
        block = functools.partial(blocked.block_kernel_apply, eps=eps)
        return map_rows(geom, block, transpose, (f,), (g, weights, v), grad=True)
    with torch.no_grad():
        scaled = g / eps + blocked.log_weights(weights, g)

        def block_fn(rows, buffers):
            buf, dim, offset = _scores(geom, rows, buffers, scaled, 1.0 / eps, transpose)
            row = f[:, rows] / eps if offset is None else offset + f[:, rows] / eps
            return blocked.exp_matmul_(buf, v, dim, row)

        return _fused(geom, block_fn, transpose)


def kernel_cost(geom, f, g, eps, weights):
    if geom.needs_grad(f, g, weights):
        block = functools.partial(blocked.block_kernel_cost, eps=eps)
        return map_rows(geom, block, False, (f,), (g, weights), grad=True)
    with torch.no_grad():
        zeros = torch.zeros_like(g)
        w = torch.ones_like(g) if weights is None else weights

        def block_fn(rows, buffers):
            # scores with h = 0 and inv_eps = -1 are the costs themselves (up to a row term)
            cost, _, offset = _scores(geom, rows, buffers, zeros, -1.0, False, index=1)
            if offset is not None:
                cost.add_(offset.unsqueeze(-1))
            kernel = torch.sub(g.unsqueeze(-2), cost, out=buffers.get(0, cost.shape))
            kernel.add_(f[:, rows].unsqueeze(-1)).div_(eps).exp_().mul_(w.unsqueeze(-2))
            return kernel.mul_(cost).sum(-1)

        return _fused(geom, block_fn, False)
