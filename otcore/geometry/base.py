"""The geometry owns the softmin: solvers ask it for softmins, plan products and reductions,
never for costs.

A geometry describes a batch of B cost matrices of shape (n, m) without committing to how they
are stored: ``CostMatrix`` holds them, ``PointCloud`` recomputes them from points. Subclasses
provide ``cost_rows`` (a differentiable block of rows of C or of C^T),
``fill_scores`` (the fused no-grad fill of the torch path) and ``kernel_operands`` (what the
Triton kernels read); everything else is written here once, and ``backends`` chooses which
implementation computes the primitives. A Triton geometry keeps float16/bfloat16 tensors as
given (the kernels read them and accumulate in float32) and reports float32 as ``dtype``.

Every sum a solver takes over the points of one side goes through ``total``, so a geometry
whose points are spread over processes can all-reduce it and no solver learns about ranks.

References:
    Cuturi, Teboul, Vert (OTT-JAX geometries), arXiv:2201.12324.
    Feydy et al., "Interpolating between OT and MMD using Sinkhorn divergences", AISTATS 2019.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TypeVar

import torch
from typing_extensions import Self

from otcore._precision import upcast
from otcore.geometry.backends import IMPLEMENTATIONS, torch_blocked

G = TypeVar("G", bound="Geometry")


class Geometry(ABC):
    """A batch of cost matrices C (B, n, m), seen only through reductions over blocks of rows."""

    #: True when the user passed batched tensors (False: results are squeezed back).
    batched: bool
    #: "torch" or "triton" (resolved from the requested backend at construction).
    backend: str
    #: True when the full cost matrix is held anyway (a dense plan then costs no extra order of memory).
    holds_costs: bool = False
    #: Whether the constructor read the tensors' values (False: nothing is read on the host,
    #: ``cost_range`` included).
    validate: bool = True
    #: dtype of the computation when it differs from the tensors' (half tensors on Triton).
    _compute_dtype: torch.dtype | None = None
    #: True when this process holds only a shard of the points (``otcore.distributed``): the
    #: geometry's ``softmin``, ``kernel_apply`` and ``total`` reduce across processes, so a solver
    #: must reduce over points only through them (no local matrix product over a sharded axis).
    sharded: bool = False
    #: False when this process holds no whole row of C (its columns are sharded too): no ``materialize``.
    holds_rows: bool = True

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

    def cost_block(self, rows: slice, transpose: bool = False) -> torch.Tensor:
        """The values of ``cost_rows(rows, transpose)`` without gradient (a geometry that keeps
        its costs reads them)."""
        with torch.no_grad():
            return self.cost_rows(rows, transpose)

    def cost_vjp(self, G: torch.Tensor, transpose: bool, wanted: Sequence[bool]) -> tuple[torch.Tensor | None, ...]:
        """The gradients of sum(G * C) w.r.t. ``tensors`` (None where ``wanted`` is False), C being
        all of this geometry's rows of C (of C^T when ``transpose``): G (B, n, m) or (B, m, n).
        By autograd through ``cost_rows``; a geometry with a closed form overrides it."""
        with torch.enable_grad():
            cost = self.cost_rows(slice(None), transpose)
            sources = [t for t, need in zip(self.tensors, wanted, strict=True) if need]
            grads = iter(torch.autograd.grad(cost, sources, G, allow_unused=True))
        return tuple(next(grads) if need else None for need in wanted)

    @abstractmethod
    def fill_scores(self, rows: slice, buf: torch.Tensor, h: torch.Tensor, inv_eps: float, transpose: bool):
        """Write ``h_j - C_ij * inv_eps`` for the given outputs into ``buf`` (no grad, in place).

        ``h`` is already divided by eps. ``fused_layout`` tells the layout of ``buf``; the
        return value is None or a (B, r) row term that the caller adds to every score of a row.
        """

    @abstractmethod
    def with_tensors(self: G, *tensors: torch.Tensor) -> G:
        """The same kind of geometry built on other tensors (same order as ``tensors``)."""

    @abstractmethod
    def restricted(self, rows: slice, transpose: bool = False) -> Geometry:
        """The geometry of rows ``rows`` of C (of columns ``rows`` when ``transpose``), built on
        views of ``tensors`` in the same order."""

    @abstractmethod
    def kernel_operands(self, transpose: bool) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(a, b, cost code) for the Triton op: a holds the output rows (the dense C, or points)."""

    def fused_layout(self, transpose: bool) -> int:
        """Reduced dim of the buffers ``fill_scores`` writes (-1: rows of C or C^T; -2: columns)."""
        return -1

    def stream_lse(self, scaled: torch.Tensor, inv_eps: float, transpose: bool) -> torch.Tensor | None:
        """A faster no-grad ``log sum_j exp(scaled_j - C_ij inv_eps)`` when the geometry has one."""
        return None

    # ----------------------------------------------------------------- reductions
    def total(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        """Sum of a per-point quantity over the points of one side: ``axis=0`` the n sources,
        t (B, n); ``axis=1`` the m targets, t (B, m). Returns (B,)."""
        return self.sum_partials(t.sum(-1), axis)

    def sum_partials(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        """``t`` (any shape): this process's part of a sum over the points of one side (``axis`` as
        in ``total``, e.g. P^T y over this process's rows), summed over the processes that share
        that side; ``t`` itself unless it is sharded. Differentiable."""
        return t

    def self_transport(self) -> tuple[Geometry, Geometry] | None:
        """The geometries of each measure with itself, (x <-> x, y <-> y), for debiasing (the
        Sinkhorn divergence); None where this geometry cannot make them (a cost matrix)."""
        return None

    def amax(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        """Largest entry of a per-point quantity over the points of one side (as ``total``):
        (B, n) or (B, m) -> (B,). No autograd (a decision or a shift, not a value)."""
        return t.detach().amax(-1)

    def all_true(self, flags: torch.Tensor) -> torch.Tensor:
        """(B,) bool: where ``flags`` (B,) hold on every process sharing this geometry (the
        flags themselves when it is not sharded). Host decisions taken from local data go
        through it, so that every process takes the same branch."""
        return flags

    def pair_dot(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Inner product of stacked dual vectors ``[rows (n); columns (m)]``: (B, n + m) x2 -> (B,)."""
        n = self.shape[1]
        uv = u * v
        return self.total(uv[:, :n], 0) + self.total(uv[:, n:], 1)

    def softmin(self, h: torch.Tensor, eps: float, weights: torch.Tensor | None = None, axis: int = 1) -> torch.Tensor:
        """``-eps * log sum w exp((h - C)/eps)`` reduced over ``axis`` of C.

        Args:
            h: (B, m) potential on the columns when ``axis=1`` (output (B, n), the f-update), or
               (B, n) on the rows when ``axis=0`` (output (B, m), the g-update).
            eps: entropic regularisation (> 0).
            weights: non-negative weights on the reduced axis, same shape as ``h`` (None = 1).
            axis: the axis of C that is reduced.

        Differentiable in ``h``, ``weights`` and the geometry's tensors. For eps at or above the
        costs' range (``cost_range``; not read with ``validate=False``) the torch path's centred
        log-sum-exp runs on every backend: the usual max-shifted one loses the potentials to
        rounding there (an error eps * u, u the unit roundoff).
        """
        if eps >= self.cost_range():
            return torch_blocked.softmin(self, h, eps, weights, axis == 0, centred=True)
        return IMPLEMENTATIONS[self.backend].softmin(self, h, eps, weights, axis == 0)

    def kernel_apply(
        self, f: torch.Tensor, g: torch.Tensor, eps: float, weights: torch.Tensor | None, v: torch.Tensor,
        axis: int = 1, row_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``out_i = a_i sum_j w_j exp((f_i + g_j - C_ij)/eps) v_jk`` (axis=1) or the same on C^T
        (axis=0); with the row weights ``a`` this is the plan product ``P v``.

        Shapes (axis=1): f (B, n), g (B, m), weights (B, m), v (B, m, k), row_weights (B, n)
        (None: no a_i) -> (B, n, k). A zero row weight gives an exact zero row, however large
        its exponents (an iterate cut short, an unbalanced fixed point).
        """
        return IMPLEMENTATIONS[self.backend].kernel_apply(self, f, g, eps, weights, v, axis == 0, row_weights)

    def kernel_cost(
        self, f: torch.Tensor, g: torch.Tensor, eps: float, weights: torch.Tensor | None,
        row_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``a_i sum_j w_j exp((f_i + g_j - C_ij)/eps) C_ij`` per row: (B, n) (as ``kernel_apply``)."""
        return IMPLEMENTATIONS[self.backend].kernel_cost(self, f, g, eps, weights, row_weights)

    def materialize(self) -> torch.Tensor:
        """The full cost matrix (B, n, m), differentiable. Allocates n x m."""
        return self.cost_rows(slice(0, self.shape[1]))

    def cost_range(self) -> float:
        """max C - min C, smallest over the batch, or a cheaper upper bound of it (``PointCloud``:
        its bounding box). Computed once per geometry; reads the host, and is ``inf`` (not read)
        for a geometry built with ``validate=False``."""
        if not self.validate:
            return float("inf")
        if "_cost_range" not in self.__dict__:
            with torch.no_grad():
                self._cost_range = float(self._range_bounds().min())
        return self._cost_range

    def _range_bounds(self) -> torch.Tensor:
        """max C - min C of each problem (B,), block by block."""
        ends = torch_blocked.map_rows(self, _row_ends).amax(dim=1)
        return ends[:, 0] + ends[:, 1]

    def mean_cost(self) -> torch.Tensor:
        """Mean of C_ij over all pairs of each problem (B,), block by block without gradients
        (sums over the sources through ``total``)."""
        with torch.no_grad():
            sums = torch_blocked.map_rows(self, _row_sums)
            return self.total(sums, 0) / (self.total(torch.ones_like(sums), 0) * self.shape[2])

    def max_cost(self) -> torch.Tensor:
        """Largest |C_ij| of each problem (B,), computed block by block without gradients."""
        with torch.no_grad():
            return torch_blocked.map_rows(self, _abs_row_max).amax(dim=-1)

    # ----------------------------------------------------------------- shared machinery
    def _replace(self, **fields) -> Self:
        new = copy.copy(self)
        new.__dict__.pop("_cost_range", None)
        new.__dict__.update(fields)
        return new

    def broadcast_to(self, batch: int) -> Self:
        """The same geometry expanded (as a view) to ``batch`` problems."""
        if self.shape[0] == batch:
            return self
        return self.with_tensors(*(t.expand(batch, *t.shape[1:]) for t in self.tensors))

    def to_dtype(self, dtype: torch.dtype) -> Self:
        """The same geometry computed in ``dtype`` (half tensors stay as they are on Triton)."""
        if self.dtype == dtype:
            return self
        stored = self.tensors[0].dtype
        if self.backend == "triton" and dtype == torch.float32 and stored in (torch.float16, torch.bfloat16):
            return self._replace(_compute_dtype=dtype)
        return self.with_tensors(*(upcast(t, dtype) for t in self.tensors))._replace(_compute_dtype=None)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype potentials and results are computed in."""
        return self._compute_dtype or self.tensors[0].dtype

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    def needs_grad(self, *others: torch.Tensor | None) -> bool:
        """Whether autograd records a computation on the geometry's tensors and ``others``."""
        if not torch.is_grad_enabled():
            return False
        return any(t is not None and t.requires_grad for t in (*self.tensors, *others))


def _row_sums(cost: torch.Tensor) -> torch.Tensor:
    return cost.sum(dim=-1)


def _abs_row_max(cost: torch.Tensor) -> torch.Tensor:
    return cost.abs().amax(dim=-1)


def _row_ends(cost: torch.Tensor) -> torch.Tensor:
    """(max, -min) of each row: (B, r, L) -> (B, r, 2)."""
    return torch.stack((cost.amax(dim=-1), -cost.amin(dim=-1)), dim=-1)
