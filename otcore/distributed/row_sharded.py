"""A geometry whose rows (source points) are spread over the processes of a torch.distributed group.

Each rank holds a ``PointCloud`` of its shard of the sources against all the targets (or a
``CostMatrix`` of its rows of C). The solvers run unchanged on every rank: the f-update and
every per-row quantity stay on the rank's rows, while every reduction over the rows goes through
the geometry and becomes a collective:

* ``softmin(axis=0)`` (the g-update): each rank's log-sum-exp over its rows, combined by a
  stable log-sum-exp all-reduce (MAX, then SUM of the shifted exponentials);
* ``total(axis=0)`` (masses, marginal errors, the dual value, conjugate-gradient dot products),
  ``kernel_apply(axis=0)`` (plan products P^T v) and ``sum_partials(axis=0)`` (products with
  this rank's rows of a materialised plan, as ``sns``'s sparse Hessian takes them): all-reduce SUM;
* ``cost_range`` and ``max_cost``: all-reduce MAX.

Every replicated output is computed identically on every rank (gloo's and NCCL's all-reduce
give every rank the same result), so every rank takes the same branches and the same number of
iterations. Gradients follow the tensor-parallel convention of ``collectives``: backward on a
replicated loss (the ``value`` every rank holds) gives each rank the gradient of its shard, and
the whole gradient of the replicated tensors (the targets y, the weights b) on every rank.

References:
    Shoeybi et al., "Megatron-LM: training multi-billion parameter language models using model
    parallelism", arXiv:1909.08053 (replicated and sharded tensors in forward and backward).
    Feydy et al., "Interpolating between OT and MMD using Sinkhorn divergences", AISTATS 2019
    (the softmin as a log-sum-exp reduction).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.distributed as dist

from otcore.distributed.collectives import (
    all_reduce,
    all_reduce_sum,
    check_group,
    enter_shard,
    gather_descriptors,
    logsumexp_across,
)
from otcore.distributed.sharded import ShardedGeometry
from otcore.geometry import CostMatrix, Geometry, PointCloud
from otcore.geometry.backends import torch_blocked
from otcore.geometry.base import _row_ends

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NAMED_COSTS = ("sqeuclidean", "euclidean", "l1", "cosine")
_CALLABLE_COST = 9  # a user's callable: only "a callable" can be compared across ranks
_BACKENDS = ("torch", "triton")
# what every rank's geometry must agree on, in the order of ``_descriptor``
_FIELDS = ("geometry type", "batch size B", "number of columns m", "dimension d", "dtype", "cost", "backend",
           "validate", "batched")


def shard(t: torch.Tensor, dim: int = 0, group=None) -> torch.Tensor:
    """This rank's contiguous part of ``t`` along ``dim`` (``torch.tensor_split`` over the ranks
    of ``group``: sizes differ by at most one). A view; every rank needs at least one row.

    Raises:
        ValueError: torch.distributed not initialised, or fewer entries than ranks.
    """
    check_group(group)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if t.shape[dim] < world:
        raise ValueError(f"t has {t.shape[dim]} entries along dim {dim}, fewer than the {world} ranks")
    return torch.tensor_split(t, world, dim=dim)[rank]


class RowSharded(ShardedGeometry):
    """``geom``'s rows are this rank's shard of the sources; its columns are replicated.

    ``otcore.sinkhorn(RowSharded(PointCloud(x_local, y)), a_local, b, eps=...)`` then solves the
    problem of all ranks' sources together: ``value`` is the global value and ``g`` the full
    column potential on every rank, ``f`` this rank's shard of the row potential (in the same
    gauge on every rank), and gradients (implicit, unroll, envelope) reach ``x_local`` as the
    slice of the single-process gradient and ``y`` / ``b`` whole on every rank.

    Every rank must call the same solver with the same arguments apart from its shard (x_local,
    a_local, its rows of C): the same y, b, eps, tol and the same ``requires_grad`` flags.
    ``RowSharded.total(t, 0)`` is the differentiable all-reduce to use for a loss on the local
    potentials (``total(w * f, 0)``). ``sinkhorn`` (log-domain iterations: the scaling domain's
    local matrix products would sum over this rank's rows only), ``sinkhorn_divergence`` (point
    clouds) and ``sns`` (Hessian-free, or with the sparsified Hessian assembled from each rank's
    rows of the plan) run on it.

    Shapes: ``shape`` is this rank's (B, n_local, m); per-row tensors (a, f) are (B, n_local).

    Args:
        geom: a ``PointCloud`` of the local sources x (n_local, d) against all targets y, or a
            ``CostMatrix`` of the local rows of C (n_local, m).
        group: the ``torch.distributed`` process group the rows are spread over (None: the
            default group).

    Raises:
        ValueError, on every rank: torch.distributed not initialised or this process outside
        ``group``; ``geom`` not a ``PointCloud`` or ``CostMatrix``; geometries that differ across
        ranks in anything but the number of rows (columns m, dimension d, dtype, cost, batch
        size, backend, ``validate``). The check is one all-gather of a few integers; the values
        of y are not compared.
    """


    def __init__(self, geom: Geometry, group=None):
        if not isinstance(geom, (PointCloud, CostMatrix)) or geom.sharded:
            raise ValueError(f"geom must be a PointCloud or a CostMatrix, got {type(geom).__name__}")
        check_group(group)
        self.inner, self.group = geom, group
        self.batched, self.backend, self.validate = geom.batched, geom.backend, geom.validate
        # the replicated tensors among geom.tensors: the targets of a point cloud
        self._replicated = (1,) if isinstance(geom, PointCloud) else ()
        self._check_consistent()

    def _descriptor(self) -> list[int]:
        geom = self.inner
        B, _, m = geom.shape
        if isinstance(geom, PointCloud):
            cost = geom.cost
            if callable(cost):
                code = _CALLABLE_COST
            else:
                code = _NAMED_COSTS.index(cost) if isinstance(cost, str) else 10 + round(float(cost) * 1e6)
            kind, d = 0, geom.x.shape[-1]
        else:
            kind, d, code = 1, 0, 0
        return [kind, B, m, d, _DTYPES.index(geom.tensors[0].dtype), code, _BACKENDS.index(geom.backend),
                int(geom.validate), int(geom.batched)]

    def _check_consistent(self) -> None:
        ranks = gather_descriptors(self._descriptor(), self.device, self.group)
        for k, name in enumerate(_FIELDS):
            values = [r[k] for r in ranks]
            if len(set(values)) > 1:
                shown: list = values
                if name == "dtype":
                    shown = [str(_DTYPES[v]) for v in values]
                elif name == "geometry type":
                    shown = [("PointCloud", "CostMatrix")[v] for v in values]
                raise ValueError(f"geom: the ranks' geometries differ in their {name} (by rank: {shown}); "
                                 "RowSharded needs everything but the number of rows to be the same on every rank")

    # ----------------------------------------------------------------- this rank's geometry
    def _local(self) -> Geometry:
        """The inner geometry, with the replicated tensors marked for the backward all-reduce and
        the global ``cost_range`` (its softmin then takes the same path on every rank)."""
        inner = self.inner
        tensors = inner.tensors
        entered = tuple(cast(torch.Tensor, enter_shard(t, self.group)) if k in self._replicated else t
                        for k, t in enumerate(tensors))
        if any(e is not t for e, t in zip(entered, tensors, strict=True)):
            inner = inner.with_tensors(*entered)
        return inner._replace(_cost_range=self.cost_range()) if self.validate else inner

    def _enter(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return enter_shard(t, self.group)

    # ----------------------------------------------------------------- subclass interface (local rows)
    def cost_rows(self, rows, transpose=False):
        return self._local().cost_rows(rows, transpose)

    def fill_scores(self, rows, buf, h, inv_eps, transpose):
        return self.inner.fill_scores(rows, buf, h, inv_eps, transpose)

    def self_transport(self):
        """(x <-> x, y <-> y) of a point cloud: every rank's sources against every rank's, a
        ``BothSharded`` (its ring passes the x shards), and y against itself, replicated. None for
        a cost matrix. Each rank's ``PointCloud`` centred its points by its own mean: the sources
        are first moved into rank 0's frame, by the difference of the replicated targets' frames."""
        from otcore.distributed.both_sharded import BothSharded  # it builds on this module

        if not isinstance(self.inner, PointCloud):
            return None
        x, y = self.inner.tensors
        with torch.no_grad():
            y_rank0 = y.detach().clone()
            dist.broadcast(y_rank0, src=dist.get_global_rank(self.group, 0) if self.group is not None else 0,
                           group=self.group)
            to_rank0 = (y_rank0 - y.detach()).mean(dim=1, keepdim=True)
        x = x + to_rank0
        sources = BothSharded(x, x, self.inner.cost, self.backend, group=self.group, validate=self.validate)
        return sources, self.inner.with_tensors(y, y)

    def restricted(self, rows, transpose=False) -> RowSharded:
        return self._replace(inner=self.inner.restricted(rows, transpose))

    def kernel_operands(self, transpose):
        return self.inner.kernel_operands(transpose)

    def fused_layout(self, transpose):
        return self.inner.fused_layout(transpose)

    def to_dtype(self, dtype: torch.dtype) -> RowSharded:
        return self if self.dtype == dtype else self._replace(inner=self.inner.to_dtype(dtype))

    # ----------------------------------------------------------------- reductions across ranks
    def sum_partials(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        """As ``Geometry.sum_partials`` (hence ``total``); over the sources (``axis=0``) an
        all-reduce of the ranks' parts, differentiable (each rank's backward reaches its own t)."""
        return all_reduce_sum(t, self.group) if axis == 0 else t

    def amax(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        """As ``Geometry.amax``; over the sources (``axis=0``) an all-reduce MAX."""
        local = t.detach().amax(-1)
        return all_reduce(local, dist.ReduceOp.MAX, self.group) if axis == 0 else local


    def softmin(self, h, eps, weights=None, axis=1):
        """As ``Geometry.softmin``. ``axis=1``: h, weights (B, m) -> this rank's rows (B, n_local).
        ``axis=0``: this rank's h, weights (B, n_local) -> the softmin over every rank's rows
        (B, m), by a log-sum-exp all-reduce."""
        if axis == 1:
            return self._local().softmin(self._enter(h), eps, self._enter(weights), axis=1)
        local = self._local().softmin(h, eps, weights, axis=0)
        return -eps * logsumexp_across(local / -eps, self.group)

    def kernel_apply(self, f, g, eps, weights, v, axis=1, row_weights=None):
        """As ``Geometry.kernel_apply`` with f, row_weights (B, n_local) on this rank's rows
        (axis=1, output (B, n_local, k)); with axis=0 the product over every rank's rows (output
        (B, m, k), all-reduced), g, weights and v then on this rank's rows."""
        local = self._local()
        enter = self._enter
        if axis == 1:
            return local.kernel_apply(f, enter(g), eps, enter(weights), enter(v), axis=1, row_weights=row_weights)
        out = local.kernel_apply(enter(f), g, eps, weights, v, axis=0, row_weights=enter(row_weights))
        return all_reduce_sum(out, self.group)

    def kernel_cost(self, f, g, eps, weights, row_weights=None):
        """As ``Geometry.kernel_cost``: this rank's rows (B, n_local)."""
        return self._local().kernel_cost(f, self._enter(g), eps, self._enter(weights), row_weights)

    def materialize(self) -> torch.Tensor:
        """This rank's rows of C (B, n_local, m), differentiable."""
        return self._local().materialize()

    def max_cost(self) -> torch.Tensor:
        """Largest |C_ij| over every rank's rows (B,) (all-reduce MAX)."""
        return all_reduce(self.inner.max_cost(), dist.ReduceOp.MAX, self.group)

    def _range_bounds(self) -> torch.Tensor:
        """An upper bound of max C - min C over every rank's rows (B,). A point cloud's named
        costs are >= 0, so the largest of the ranks' bounds is one; a cost matrix and a callable
        cost (of any sign) all-reduce their exact (max, -min), as one process computes them."""
        if isinstance(self.inner, PointCloud) and not callable(self.inner.cost):
            return all_reduce(self.inner._range_bounds(), dist.ReduceOp.MAX, self.group)
        ends = torch_blocked.map_rows(self.inner, _row_ends).amax(dim=1)
        ends = all_reduce(ends, dist.ReduceOp.MAX, self.group)
        return ends[:, 0] + ends[:, 1]
