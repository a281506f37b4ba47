"""The torch backend: a geometry's primitives computed one block of rows at a time.

Forward passes run without autograd: each block of scores ``h_j - C_ij / eps`` is written by
the geometry (``fill_scores``) into a reused buffer and reduced in place
(``kernels.softmin.blocked``). When gradients are needed, ``_Recomputed`` wraps that forward in
an autograd function whose backward recomputes one block at a time with the differentiable
``block_*`` functions and adds each block's gradients in place into preallocated totals. Memory
stays O(n + m) per call in both passes, and no per-block allocation outlives its block (blocks
that leave small tensors behind fragment the CPU heap: peak RSS then grows by gigabytes).

Every function takes the geometry first and ``transpose`` (True: reduce over the rows of C,
i.e. work on C^T); shapes are those of ``Geometry.softmin`` / ``kernel_apply`` / ``kernel_cost``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

from otcore.kernels.softmin import blocked


def map_rows(geom, block_fn: Callable[..., torch.Tensor], transpose: bool = False) -> torch.Tensor:
    """``block_fn(cost_block)`` (B, r, ...) over blocks of rows, concatenated (no grad)."""
    B, n, m = geom.shape
    n_rows, row_len = (m, n) if transpose else (n, m)
    with torch.no_grad():
        blocks = blocked.row_blocks(n_rows, row_len, B, blocked.block_elements(geom.device))
        return torch.cat([block_fn(geom.cost_block(rows, transpose)) for rows in blocks], dim=1)


class _Recomputed(torch.autograd.Function):
    """A blocked primitive: ``fast()`` forward, block-by-block recomputed backward.

    ``inputs`` are ``n_row`` tensors indexed by the output rows (sliced per block), then tensors
    shared by every block (None allowed), then the geometry's tensors. ``block_fn(cost_block,
    *row_slices, *shared)`` is the differentiable computation of one block of outputs;
    ``block_grad(cost_block, *row_slices, *shared, grad_out_block, wanted)``, where given, its
    vector-Jacobian product in closed form (a gradient for each input and the cost block, None
    where ``wanted`` says it is not needed), used instead of autograd through ``block_fn``.
    """

    @staticmethod
    def forward(ctx, geom, block_fn, block_grad, fast, transpose, n_row, *inputs):
        ctx.geom, ctx.block_fn, ctx.block_grad = geom, block_fn, block_grad
        ctx.transpose, ctx.n_row = transpose, n_row
        ctx.save_for_backward(*inputs)
        return fast()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        geom, transpose, n_row = ctx.geom, ctx.transpose, ctx.n_row
        inputs = ctx.saved_tensors
        n_geom = len(geom.tensors)
        wanted = ctx.needs_input_grad[6:]
        totals = [torch.zeros_like(t) if need else None for t, need in zip(inputs, wanted, strict=True)]
        leaves = [t.detach().requires_grad_(need) if t is not None else None for t, need in zip(inputs, wanted, strict=True)]
        leaf_geom = geom.with_tensors(*leaves[-n_geom:])
        total_geom = geom.with_tensors(*(t if t is not None else g for t, g in zip(totals[-n_geom:], geom.tensors, strict=True)))
        geom_wanted = wanted[-n_geom:]
        source_wanted = (*wanted[:-n_geom], any(geom_wanted))  # the inputs before the geometry's, then the costs
        B, n, m = geom.shape
        n_rows, row_len = (m, n) if transpose else (n, m)
        for rows in blocked.row_blocks(n_rows, row_len, B, blocked.block_elements(geom.device)):
            # the block's costs: their gradient G reaches the geometry's tensors through
            # ``cost_vjp`` (a closed form where the geometry has one)
            cost = geom.cost_block(rows, transpose).detach()
            row_leaves = [t[:, rows] if t is not None else None for t in leaves[:n_row]]
            sources = [*row_leaves, *leaves[n_row:-n_geom], cost]
            if ctx.block_grad is not None:
                grads = ctx.block_grad(*(t.detach() if t is not None else None for t in sources),
                                       grad_out[:, rows], source_wanted)
            else:
                grads = _autograd_block(ctx.block_fn, sources, grad_out[:, rows], source_wanted)
            targets = [*(t[:, rows] if t is not None else None for t in totals[:n_row]), *totals[n_row:-n_geom]]
            for total, grad in zip(targets, grads[:-1], strict=True):
                if grad is not None and total is not None:
                    total.add_(grad)
            if grads[-1] is not None:
                with torch.enable_grad():  # views of the leaves that autograd follows
                    block = leaf_geom.restricted(rows, transpose)
                block_grads = block.cost_vjp(grads[-1], transpose, geom_wanted)
                for total, grad in zip(total_geom.restricted(rows, transpose).tensors, block_grads, strict=True):
                    if grad is not None:
                        total.add_(grad)
        return (None, None, None, None, None, None, *totals)


def _autograd_block(block_fn, sources, grad_out, wanted) -> list[torch.Tensor | None]:
    """The gradients of ``block_fn(*sources)`` in the ``wanted`` sources (the cost block last),
    None elsewhere, by autograd through it."""
    leaves = [t.detach().requires_grad_(need) if t is not None else None for t, need in zip(sources, wanted, strict=True)]
    with torch.enable_grad():
        out = block_fn(leaves[-1], *leaves[:-1])
        chosen = [t for t, need in zip(leaves, wanted, strict=True) if need and t is not None]
        found = iter(torch.autograd.grad(out, chosen, grad_out, allow_unused=True))
    return [next(found) if need else None for need in wanted]


def _recomputed(geom, block_fn, fast, transpose: bool, row_args, shared_args, block_grad=None) -> torch.Tensor:
    return _Recomputed.apply(geom, block_fn, block_grad, fast, transpose, len(row_args), *row_args, *shared_args,
                             *geom.tensors)


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


def softmin(geom, h, eps, weights, transpose, centred: bool = False):
    """``centred``: the log-sum-exp of ``blocked.centred_lse`` (for eps above the costs' range),
    one allocated block at a time: such solves take few iterations."""
    block = functools.partial(blocked.block_softmin, eps=eps, centred=centred)
    if centred:
        fast = functools.partial(map_rows, geom, lambda cost: block(cost, h, weights), transpose)
    else:
        fast = functools.partial(_softmin, geom, h, eps, weights, transpose)
    if geom.needs_grad(h, weights):
        closed_form = None if centred else functools.partial(_softmin_grad, eps=eps)
        return _recomputed(geom, block, fast, transpose, (), (h, weights), closed_form)
    return fast()


def _softmin_grad(h, weights, cost, grad_out, wanted, *, eps):
    return blocked.block_softmin_grad(cost, h, weights, grad_out, eps, wanted)


def _softmin(geom, h, eps, weights, transpose):
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


def kernel_apply(geom, f, g, eps, weights, v, transpose, row_weights=None):
    fast = functools.partial(_kernel_apply, geom, f, g, eps, weights, v, transpose, row_weights)
    if geom.needs_grad(f, g, weights, v, row_weights):
        block = functools.partial(blocked.block_kernel_apply, eps=eps)
        return _recomputed(geom, block, fast, transpose, (f, row_weights), (g, weights, v))
    return fast()


def _kernel_apply(geom, f, g, eps, weights, v, transpose, row_weights):
    with torch.no_grad():
        scaled = g / eps + blocked.log_weights(weights, g)
        row_term = f / eps + blocked.log_weights(row_weights, f)  # zero row weights: exp(-inf) = 0

        def block_fn(rows, buffers):
            buf, dim, offset = _scores(geom, rows, buffers, scaled, 1.0 / eps, transpose)
            row = row_term[:, rows] if offset is None else offset + row_term[:, rows]
            return blocked.exp_matmul_(buf, v, dim, row)

        return _fused(geom, block_fn, transpose)


def kernel_cost(geom, f, g, eps, weights, row_weights=None):
    fast = functools.partial(_kernel_cost, geom, f, g, eps, weights, row_weights)
    if geom.needs_grad(f, g, weights, row_weights):
        block = functools.partial(blocked.block_kernel_cost, eps=eps)
        return _recomputed(geom, block, fast, False, (f, row_weights), (g, weights))
    return fast()


def _kernel_cost(geom, f, g, eps, weights, row_weights):
    with torch.no_grad():
        zeros = torch.zeros_like(g)
        # weights join the exponent: zero weights give exp(-inf) = 0, not inf * 0
        log_w = blocked.log_weights(weights, g)
        log_a = blocked.log_weights(row_weights, f)

        def block_fn(rows, buffers):
            # scores with h = 0 and inv_eps = -1 are the costs themselves (up to a row term)
            cost, _, offset = _scores(geom, rows, buffers, zeros, -1.0, False, index=1)
            if offset is not None:
                cost.add_(offset.unsqueeze(-1))
            kernel = torch.sub(g.unsqueeze(-2), cost, out=buffers.get(0, cost.shape))
            kernel.add_(f[:, rows].unsqueeze(-1)).div_(eps).add_(log_w.unsqueeze(-2))
            kernel.add_(log_a[:, rows].unsqueeze(-1)).exp_()
            return kernel.mul_(cost).sum(-1)

        return _fused(geom, block_fn, False)
