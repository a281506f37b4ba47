"""The geometry owns the softmin: solvers ask it for softmins and plan products, never for costs.

A geometry describes a batch of B cost matrices of shape (n, m) without committing to how they
are stored: ``CostMatrix`` holds them, ``PointCloud`` recomputes them from points. Subclasses
provide ``cost_rows`` (a differentiable block of rows of C or of C^T), ``transpose``,
``fill_scores`` (the fused no-grad fill of the torch hot path) and ``kernel_operands`` (what the
Triton kernels read); everything else is written here once.

Two backends compute the same primitives (``backend.py`` chooses): ``"torch"`` streams blocks
of rows through ``kernels.reference``, ``"triton"`` calls the fused kernels of ``kernels.ops``
(softmin with its autograd, and no-grad plan products). A Triton geometry keeps float16/bfloat16
tensors as given (the kernels read them and accumulate in float32) and reports float32 as
``dtype``; the torch backend converts them.

References:
    Cuturi, Teboul, Vert (OTT-JAX geometries), arXiv:2201.12324.
    Feydy et al., "Interpolating between OT and MMD using Sinkhorn divergences", AISTATS 2019.
"""

from __future__ import annotations

import copy
import functools
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from otcore.kernels import reference


class Geometry(ABC):
    """A batch of cost matrices C (B, n, m), seen only through reductions over blocks of rows."""

    #: True when the user passed unbatched tensors (results are squeezed back).
    batched: bool
    #: "torch" or "triton" (resolved from the requested backend at construction).
    backend: str
    #: dtype of the computation when it differs from the tensors' (half tensors on Triton).
    _compute_dtype: torch.dtype | None = None

    # ----------------------------------------------------------------- subclass interface
    @property
    @abstractmethod
    def shape(self) -> tuple[int, int, int]:
        """(B, n, m)."""

    @property
    @abstractmethod
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors the costs are computed from (the ones gradients flow to)."""

    @abstractmethod
    def cost_rows(self, rows: slice, transpose: bool = False) -> torch.Tensor:
        """Differentiable rows ``rows`` of C, or of C^T when ``transpose``: (B, r, m) or (B, r, n)."""

    @abstractmethod
    def transpose(self) -> Geometry:
        """The geometry of C^T (rows and columns swapped)."""

    @abstractmethod
    def fill_scores(self, rows: slice, buf: torch.Tensor, h: torch.Tensor, inv_eps: float, transpose: bool):
        """Write ``h_j - C_ij * inv_eps`` for the given outputs into ``buf`` (no grad, in place).

        ``h`` is already divided by eps. Layout and optional returned offset as in
        ``kernels.reference.softmin_fused``; ``fused_layout`` tells which layout is used.
        """

    @abstractmethod
    def with_tensors(self, *tensors: torch.Tensor) -> Geometry:
        """The same kind of geometry built on other tensors (same order as ``tensors``)."""

    @abstractmethod
    def kernel_operands(self, transpose: bool) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(a, b, cost code) for ``kernels.ops``: a holds the output rows (the dense C, or points)."""

    def fused_layout(self, transpose: bool) -> int:
        """Reduced dim of the buffers ``fill_scores`` writes (-1: rows of C or C^T; -2: columns)."""
        return -1

    # ----------------------------------------------------------------- shared machinery
    def _replace(self, **fields) -> Geometry:
        new = copy.copy(self)
        new.__dict__.update(fields)
        return new

    def broadcast_to(self, batch: int) -> Geometry:
        """The same geometry expanded (as a view) to ``batch`` problems."""
        if self.shape[0] == batch:
            return self
        return self.with_tensors(*(t.expand(batch, *t.shape[1:]) for t in self.tensors))

    def to_dtype(self, dtype: torch.dtype) -> Geometry:
        """The same geometry computed in ``dtype`` (half tensors stay as they are on Triton)."""
        if self.dtype == dtype:
            return self
        stored = self.tensors[0].dtype
        if self.backend == "triton" and dtype == torch.float32 and stored in (torch.float16, torch.bfloat16):
            return self._replace(_compute_dtype=dtype)
        return self.with_tensors(*(t.to(dtype) for t in self.tensors))._replace(_compute_dtype=None)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype potentials and results are computed in."""
        return self._compute_dtype or self.tensors[0].dtype

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    def _needs_grad(self, *others: torch.Tensor | None) -> bool:
        if not torch.is_grad_enabled():
            return False
        return any(t is not None and t.requires_grad for t in (*self.tensors, *others))

    def _map_rows(self, block_fn: Callable[..., torch.Tensor], transpose: bool, row_args, col_args, grad: bool):
        """Concatenate ``block_fn(cost_block, *row_args[rows], *col_args)`` over blocks of rows.

        With ``grad`` each block runs under activation checkpointing, so autograd keeps only the
        inputs and recomputes the (r, L) block in the backward pass: memory stays O(n + m) per call.
        """
        B, n, m = self.shape
        n_rows, row_len = (m, n) if transpose else (n, m)
        outs = []
        for rows in reference.row_blocks(n_rows, row_len, B, reference.block_elements(self.device)):
            def run(rows=rows):
                sliced = [t[:, rows] if t is not None else None for t in row_args]
                return block_fn(self.cost_rows(rows, transpose), *sliced, *col_args)

            outs.append(checkpoint(run, use_reentrant=False) if grad else run())
        return torch.cat(outs, dim=1)

    def _fused(self, block_fn, transpose: bool) -> torch.Tensor:
        B, n, m = self.shape
        n_out, n_red = (m, n) if transpose else (n, m)
        return reference.blocked_map(block_fn, n_out, n_red, B, self.dtype, self.device)

    def _scores(self, rows: slice, buffers, h: torch.Tensor, inv_eps: float, transpose: bool, index: int = 0):
        """Fill a reused buffer with ``h_j - C_ij * inv_eps`` for ``rows``; returns (buf, row offset)."""
        B, n, m = self.shape
        width, length = rows.stop - rows.start, (n if transpose else m)
        dim = self.fused_layout(transpose)
        buf = buffers.get(index, (B, width, length) if dim == -1 else (B, length, width))
        offset = self.fill_scores(rows, buf, h, inv_eps, transpose)
        return buf, dim, offset

    def softmin(self, h: torch.Tensor, eps: float, weights: torch.Tensor | None = None, axis: int = 1) -> torch.Tensor:
        """``-eps * log sum w exp((h - C)/eps)`` reduced over ``axis`` of C.

        Args:
            h: (B, m) potential on the columns when ``axis=1`` (output (B, n), the f-update), or
               (B, n) on the rows when ``axis=0`` (output (B, m), the g-update).
            eps: entropic regularisation (> 0).
            weights: non-negative weights on the reduced axis, same shape as ``h`` (None = 1).
            axis: the axis of C that is reduced.

        Differentiable in ``h``, ``weights`` and the geometry's tensors (blocks are recomputed in
        the backward pass); without gradients it runs the fused, buffer-reusing kernel.
        """
        transpose = axis == 0
        if self.backend == "triton":
            from otcore.kernels import ops

            return ops.softmin(*self.kernel_operands(transpose), h, weights, eps)
        if self._needs_grad(h, weights):
            block = functools.partial(reference.block_softmin, eps=eps)
            return self._map_rows(block, transpose, (), (h, weights), grad=True)
        with torch.no_grad():
            scaled = h / eps + reference.log_weights(weights, h)

            return self._softmin_nograd(scaled, eps, transpose)

    def _softmin_nograd(self, scaled: torch.Tensor, eps: float, transpose: bool) -> torch.Tensor:
        """Fused no-grad softmin of already scaled potentials (h / eps + log w)."""

        def block_fn(rows, buffers):
            buf, dim, offset = self._scores(rows, buffers, scaled, 1.0 / eps, transpose)
            lse = reference.lse_(buf, dim)
            return (lse if offset is None else lse.add_(offset)).mul_(-eps)

        return self._fused(block_fn, transpose)

    def kernel_apply(
        self, f: torch.Tensor, g: torch.Tensor, eps: float, weights: torch.Tensor | None, v: torch.Tensor,
        axis: int = 1,
    ) -> torch.Tensor:
        """``out_i = sum_j w_j exp((f_i + g_j - C_ij)/eps) v_jk`` (axis=1) or the same on C^T (axis=0).

        Shapes (axis=1): f (B, n), g (B, m), weights (B, m), v (B, m, k) -> (B, n, k). With
        ``f = f + eps log a`` folded in by the caller this is the plan product ``P v``.
        """
        transpose = axis == 0
        if self._needs_grad(f, g, weights, v):
            block = functools.partial(reference.block_kernel_apply, eps=eps)
            return self._map_rows(block, transpose, (f,), (g, weights, v), grad=True)
        if self.backend == "triton":
            from otcore.kernels import ops

            with torch.no_grad():
                return ops.kernel_apply(*self.kernel_operands(transpose), f, g, weights, v, eps)
        with torch.no_grad():
            scaled = g / eps + reference.log_weights(weights, g)

            def block_fn(rows, buffers):
                buf, dim, offset = self._scores(rows, buffers, scaled, 1.0 / eps, transpose)
                row = f[:, rows] / eps if offset is None else offset + f[:, rows] / eps
                return reference.exp_matmul_(buf, v, dim) * torch.exp(row).unsqueeze(-1)

            return self._fused(block_fn, transpose)

    def kernel_cost(self, f: torch.Tensor, g: torch.Tensor, eps: float, weights: torch.Tensor | None) -> torch.Tensor:
        """``sum_j w_j exp((f_i + g_j - C_ij)/eps) C_ij`` per row: (B, n)."""
        if self._needs_grad(f, g, weights):
            block = functools.partial(reference.block_kernel_cost, eps=eps)
            return self._map_rows(block, False, (f,), (g, weights), grad=True)
        if self.backend == "triton":
            from otcore.kernels import ops

            with torch.no_grad():
                return ops.kernel_cost(*self.kernel_operands(False), f, g, weights, eps)
        with torch.no_grad():
            zeros = torch.zeros_like(g)
            w = torch.ones_like(g) if weights is None else weights

            def block_fn(rows, buffers):
                # scores with h = 0 and inv_eps = -1 are the costs themselves (up to a row term)
                cost, _, offset = self._scores(rows, buffers, zeros, -1.0, False, index=1)
                if offset is not None:
                    cost.add_(offset.unsqueeze(-1))
                kernel = torch.sub(g.unsqueeze(-2), cost, out=buffers.get(0, cost.shape))
                kernel.add_(f[:, rows].unsqueeze(-1)).div_(eps).exp_().mul_(w.unsqueeze(-2))
                return kernel.mul_(cost).sum(-1)

            return self._fused(block_fn, False)

    def materialize(self) -> torch.Tensor:
        """The full cost matrix (B, n, m), differentiable. Allocates n x m."""
        return self.cost_rows(slice(0, self.shape[1]))

    def max_cost(self) -> torch.Tensor:
        """Largest |C_ij| of each problem (B,), computed block by block without gradients."""
        with torch.no_grad():
            return self._map_rows(_abs_row_max, False, (), (), grad=False).amax(dim=-1)


def _abs_row_max(cost: torch.Tensor) -> torch.Tensor:
    return cost.abs().amax(dim=-1)
