"""A point-cloud geometry whose sources and targets are both spread over the processes of a group.

For problems where neither cloud fits one device: rank r holds its shard x_r of the sources and
its shard y_r of the targets, and its geometry is the block of rows x_r against every rank's
columns. Every per-row tensor (a, f) is this rank's (B, n_local) shard and every per-column
tensor (b, g) its (B, m_local) shard; the solvers run unchanged on every rank, and every
reduction over points goes through the geometry:

* ``softmin(axis=1)`` (the f-update): the column shards (y_j, g_j, b_j) pass around the ring
  (``ring``), each block's ``PointCloud`` softmin against x_r combined by a streaming
  log-sum-exp; ``softmin(axis=0)`` (the g-update) the same with the row shards (x_j, f_j, a_j);
* ``kernel_apply`` and ``kernel_cost`` (plan products, transport cost): the same ring, summed;
* ``kept_plan`` (``sns``'s sparsified Hessian): the entries of this rank's rows of the plan
  above a threshold, kept as one sparse block per column shard as the shards pass around the
  ring; its products pass the vector's shards around the ring (``sparse_plan``);
* ``total`` (masses, marginal errors, the dual value, conjugate-gradient dot products): an
  all-reduce of the local sums, over either axis;
* ``cost_range``, ``max_cost``, ``mean_cost``: all-reduces of the clouds' extent, or a ring of
  the column shards.

Memory is O((n + m)/P) per rank, gradients included (the ring's backward recomputes each
block), plus the entries ``kept_plan`` keeps; no rank ever holds the whole of x or y. Every
replicated output (the value, errors, totals) is the same on every rank, so every rank takes
the same branches and iteration count; backward on the replicated ``value`` gives each rank the
gradients of its own shards (x_r, y_r, a_r, b_r).

References:
    Liu, Zaharia, Abbeel, "Ring attention with blockwise transformers for near-infinite
    context", arXiv:2310.01889 (shards passed around a ring, overlapped with compute).
    Feydy et al., "Interpolating between OT and MMD using Sinkhorn divergences", AISTATS 2019
    (the softmin as a log-sum-exp reduction).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NoReturn, cast

import torch
import torch.distributed as dist

from otcore._precision import HALF
from otcore.core.plan import EntropicPlan, all_positive
from otcore.distributed.collectives import all_reduce, all_reduce_sum, check_group, gather_descriptors
from otcore.distributed.ring import Ring, RingOp, ring_reduce
from otcore.distributed.row_sharded import _BACKENDS, _CALLABLE_COST, _DTYPES, _NAMED_COSTS
from otcore.distributed.sharded import ShardedGeometry
from otcore.distributed.sparse_plan import RingSparsePlan, kept_entries
from otcore.geometry import Geometry, PointCloud
from otcore.geometry.backends import torch_blocked
from otcore.geometry.base import _row_ends, _row_sums
from otcore.kernels.softmin import blocked

# what every rank's point cloud must agree on, in the order of ``_descriptor`` (after the
# validity flag, and before the numbers of points n_local, m_local, which may differ)
_FIELDS = ("batch size B", "dimension d", "dtype", "cost", "backend", "validate", "batched")


def _cost_code(cost) -> int:
    """An integer that is equal on two ranks when their costs are (a callable: only "a callable")."""
    if callable(cost):
        return _CALLABLE_COST
    return _NAMED_COSTS.index(cost) if isinstance(cost, str) else 10 + round(float(cost) * 1e6)


def _descriptor(local: PointCloud | None) -> list[int]:
    """[valid, B, d, dtype, cost, backend, validate, batched, n_local, m_local] (-1s when the
    rank's points were invalid)."""
    if local is None:
        return [0] + [-1] * (len(_FIELDS) + 2)
    B, n, m = local.shape
    return [1, B, local.x.shape[-1], _DTYPES.index(local.x.dtype), _cost_code(local.cost),
            _BACKENDS.index(local.backend), int(local.validate), int(local.batched), n, m]


def _common_frame(x: torch.Tensor, y: torch.Tensor, count: int, group) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, n_local, d) and y (B, m_local, d) shifted by the same vector on every rank:
    ``PointCloud``'s centring (the joint mean, in the coordinates where every point lies within
    a factor 2 of it, same sign: an exact shift) applied to every rank's points together
    (``count`` of them). A ``PointCloud`` of one rank's shards centres them by their own mean,
    which would give the ranks different frames."""
    points = torch.cat([x, y], dim=1).detach()
    center = (all_reduce(points.double().sum(dim=1, keepdim=True), dist.ReduceOp.SUM, group) / count).to(x.dtype)
    low = all_reduce(points.amin(dim=1, keepdim=True), dist.ReduceOp.MIN, group)
    high = all_reduce(points.amax(dim=1, keepdim=True), dist.ReduceOp.MAX, group)
    positive = (low >= center / 2) & (high <= 2 * center)
    negative = (high <= center / 2) & (low >= 2 * center)
    center = torch.where(positive | negative, center, 0.0)
    return x - center, y - center


class BothSharded(ShardedGeometry):
    """This rank's shard of the sources against its shard of the targets, the other ranks'
    shards reached around a ring.

    ``otcore.sinkhorn(BothSharded(x_local, y_local), a_local, b_local, eps=...)`` then solves the
    problem of all ranks' points together: ``value`` is the global value on every rank, ``f`` and
    ``g`` this rank's shards of the potentials (in the same gauge on every rank), and gradients
    (implicit, unroll, envelope) reach ``x_local``, ``y_local``, ``a_local`` and ``b_local`` as
    the slices of the single-process gradient. ``result.apply`` multiplies by the plan (v: this
    rank's columns, output: its rows) and ``transport_cost`` / ``marginal_error`` are global.

    It takes the points rather than a ``PointCloud``: a point cloud of one rank's shards is
    centred by their own mean, and the ranks' frames would then differ (costs between shards of
    different ranks would be wrong). ``BothSharded`` centres every rank's points by their common
    mean instead (``_common_frame``), so its ``tensors`` are the given points shifted by a
    constant (as a ``PointCloud``'s are); ``with_tensors`` takes points in that frame.

    Every rank must call the same solver with the same arguments apart from its shards (eps,
    tol, the same ``requires_grad`` flags), with its shards of the weights (``a=None``: 1/n over
    every rank's points, as for one process). ``sinkhorn`` (log domain), ``sinkhorn_divergence``
    and ``sns`` (Hessian-free, or with the sparsified Hessian: each rank's kept entries of its
    rows of P, assembled block by block around the ring, ``kept_plan``) run on it; the scaling
    domain and the solvers that need whole rows of the cost refuse it; ``materialize`` and
    ``result.plan`` raise (no rank holds a whole row of C). ``BothSharded.total(t, axis)`` is the
    differentiable all-reduce to use for a loss on the local potentials.

    Shapes: ``shape`` is this rank's (B, n_local, m_local).

    Args:
        x: this rank's sources (n_local, d) or (B, n_local, d).
        y: this rank's targets (m_local, d) or (B, m_local, d).
        cost, backend, validate: as ``PointCloud``.
        group: the ``torch.distributed`` process group the points are spread over (None: the
            default group).

    Raises:
        ValueError, on every rank: torch.distributed not initialised or this process outside
        ``group``; points a ``PointCloud`` refuses on any rank (that rank raises the
        ``PointCloud``'s error, the others name it); point clouds that differ across ranks in
        anything but the numbers of points (dimension d, dtype, cost, batch size, backend,
        ``validate``). The check is one all-gather of a few integers.
    """

    inner: PointCloud  # this rank's shards, in the common frame
    holds_rows = False


    def __init__(self, x: torch.Tensor, y: torch.Tensor, cost="sqeuclidean", backend: str = "auto", *,
                 group=None, validate: bool = True):
        check_group(group)
        self.group = group
        local, ranks = self._checked(x, y, cost, backend, validate)
        self.rows = Ring(group, [r[-2] for r in ranks])
        self.columns = Ring(group, [r[-1] for r in ranks])
        self.batched, self.backend, self.validate = local.batched, local.backend, local.validate
        if local.x.dtype not in HALF and not (callable(local.cost) or local.cost == "cosine"):
            # PointCloud centred the shards by their own mean; centre the given points by everyone's
            dtype = local.x.dtype
            count = sum(self.rows.sizes) + sum(self.columns.sizes)
            local = local.with_tensors(*_common_frame(x.to(dtype).expand_as(local.x), y.to(dtype).expand_as(local.y),
                                                      count, group))
        self.inner = local

    def _checked(self, x, y, cost, backend, validate) -> tuple[PointCloud, list[list[int]]]:
        """This rank's ``PointCloud`` and every rank's descriptor, once every rank's cloud has been
        built and found consistent with the others."""
        try:
            local, error = PointCloud(x, y, cost, backend, validate=validate), None
        except ValueError as err:
            local, error = None, err
        device = next((t.device for t in (x, y) if torch.is_tensor(t)), torch.device("cpu"))
        ranks = gather_descriptors(_descriptor(local), device, self.group)
        if error is not None:
            raise error
        invalid = [r for r, d in enumerate(ranks) if d[0] == 0]
        if local is None or invalid:
            raise ValueError(f"x, y: the points of rank(s) {invalid} are invalid (see the error raised there)")
        for k, name in enumerate(_FIELDS, start=1):
            values = [r[k] for r in ranks]
            if len(set(values)) > 1:
                shown = [str(_DTYPES[v]) for v in values] if name == "dtype" else values
                raise ValueError(f"x, y: the ranks' point clouds differ in their {name} (by rank: {shown}); "
                                 "BothSharded needs everything but the numbers of points to be the same on every rank")
        return local, ranks

    # ----------------------------------------------------------------- blocks of the cost
    def _block_of(self, axis: int):
        """(this rank's points, a travelling shard) -> the ``PointCloud`` of that block, oriented
        as C (axis=1: rows here, columns travelling; axis=0: the reverse), with the global
        ``cost_range`` (its softmin then takes the same path as the whole problem's)."""
        inner, cost_range = self.inner, self.cost_range()

        def block(here: torch.Tensor, travelling: torch.Tensor) -> PointCloud:
            pair = (here, travelling) if axis == 1 else (travelling, here)
            return inner.with_tensors(*pair)._replace(_cost_range=cost_range)

        return block

    def _ring_and_points(self, axis: int) -> tuple[Ring, torch.Tensor, torch.Tensor]:
        """(the ring of the reduced side, this rank's points on the output side, on the reduced side)."""
        x, y = self.inner.tensors
        return (self.columns, x, y) if axis == 1 else (self.rows, y, x)

    def _column_blocks(self) -> Iterator[PointCloud]:
        """This rank's rows against every rank's columns, one block at a time (no grad)."""
        x, y = self.inner.tensors
        for (y_block,) in self.columns.blocks((y.detach(),)):
            yield self.inner.with_tensors(x.detach(), cast(torch.Tensor, y_block))

    # ----------------------------------------------------------------- subclass interface
    def self_transport(self) -> tuple[BothSharded, BothSharded]:
        """(x <-> x, y <-> y), both sharded as the rows (the columns) are: the ring of each side
        serves as rows and columns."""
        x, y = self.inner.tensors
        return (self._replace(inner=self.inner.with_tensors(x, x), columns=self.rows),
                self._replace(inner=self.inner.with_tensors(y, y), rows=self.columns))

    def to_dtype(self, dtype: torch.dtype) -> BothSharded:
        """As ``Geometry.to_dtype``, keeping the common frame (``PointCloud.to_dtype`` would
        centre converted half points by this rank's mean)."""
        return self if self.dtype == dtype else self._replace(inner=Geometry.to_dtype(self.inner, dtype))

    def _whole_rows(self, what: str) -> NoReturn:
        raise ValueError(f"cost: BothSharded holds no whole row of the cost matrix (its columns are spread over the "
                         f"ranks), so {what} is not available; the solvers reduce over it through softmin, "
                         "kernel_apply and total")

    def cost_rows(self, rows, transpose=False):
        self._whole_rows("cost_rows (materialize, result.plan)")

    def fill_scores(self, rows, buf, h, inv_eps, transpose):
        self._whole_rows("fill_scores")

    def restricted(self, rows, transpose=False):
        self._whole_rows("restricted")

    def kernel_operands(self, transpose):
        self._whole_rows("kernel_operands")

    # ----------------------------------------------------------------- reductions across ranks
    def sum_partials(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        """As ``Geometry.sum_partials`` (hence ``total``): an all-reduce of the ranks' parts over
        either axis, differentiable (each rank's backward reaches its own t)."""
        return all_reduce_sum(t, self.group)

    def amax(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        """As ``Geometry.amax``: an all-reduce MAX over either axis."""
        return all_reduce(t.detach().amax(-1), dist.ReduceOp.MAX, self.group)


    def softmin(self, h, eps, weights=None, axis=1):
        """As ``Geometry.softmin``, over every rank's points of the reduced axis. ``axis=1``:
        h, weights (B, m_local) -> (B, n_local); ``axis=0``: h, weights (B, n_local) -> (B, m_local)."""
        ring, here, travelling = self._ring_and_points(axis)
        block_of = self._block_of(axis)

        def block(local, shard):
            (points,), (others, potential, w) = local, shard
            return block_of(points, others).softmin(potential, eps, w, axis=axis)

        return ring_reduce(RingOp(ring, block, 1, softmin_eps=eps), (here,), (travelling, h, weights))

    def kernel_apply(self, f, g, eps, weights, v, axis=1, row_weights=None):
        """As ``Geometry.kernel_apply``, summed over every rank's points of the reduced axis: f,
        row_weights on this rank's output side, g, weights, v (B, local, k) on its reduced side."""
        ring, here, travelling = self._ring_and_points(axis)
        block_of = self._block_of(axis)

        def block(local, shard):
            (points, out_potential, out_weights), (others, potential, w, vectors) = local, shard
            return block_of(points, others).kernel_apply(out_potential, potential, eps, w, vectors, axis=axis,
                                                          row_weights=out_weights)

        return ring_reduce(RingOp(ring, block, 3), (here, f, row_weights), (travelling, g, weights, v))

    def kernel_cost(self, f, g, eps, weights, row_weights=None):
        """As ``Geometry.kernel_cost``: this rank's rows (B, n_local), summed over every rank's columns."""
        ring, here, travelling = self._ring_and_points(1)
        block_of = self._block_of(1)

        def block(local, shard):
            (points, row_potential, a), (others, potential, w) = local, shard
            return block_of(points, others).kernel_cost(row_potential, potential, eps, w, a)

        return ring_reduce(RingOp(ring, block, 3), (here, f, row_weights), (travelling, g, weights))

    def kept_plan(self, a, b, f, g, eps, drop) -> RingSparsePlan:
        """This rank's rows of the plan ``P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps)`` against every
        rank's columns, its entries below ``drop`` (B,) dropped (``sns``'s sparsified Hessian), as
        an operator whose products pass shards around the ring (``sparse_plan``). The column
        shards (y_j, g_j, b_j) pass around the ring once; each block is computed in chunks of rows
        (B, rows, m_j) and only its kept entries stay. a, f (B, n_local); b, g (B, m_local). No grad."""
        x, y = (t.detach() for t in self.inner.tensors)
        B, n, _ = self.shape
        ring = self.columns
        blocks = {}
        with torch.no_grad():
            for step, shard in enumerate(ring.blocks((y, g, b))):
                y_j, g_j, b_j = cast(list[torch.Tensor], shard)
                block = self.inner.with_tensors(x, y_j)
                positive = block.validate and all_positive(a, b_j)  # once per shard, not per chunk
                chunks = (EntropicPlan(block.restricted(rows), a[:, rows], b_j, f[:, rows], g_j, eps).dense(
                    positive=positive) for rows in blocked.row_blocks(n, y_j.shape[1], B, blocked.block_elements(x.device)))
                blocks[ring.source(step)] = kept_entries(chunks, drop)
        return RingSparsePlan(ring, [blocks[j] for j in range(ring.world)])

    def max_cost(self) -> torch.Tensor:
        """Largest |C_ij| over every pair (B,)."""
        with torch.no_grad():
            local = torch.stack([block.max_cost() for block in self._column_blocks()]).amax(0)
        return all_reduce(local, dist.ReduceOp.MAX, self.group)

    def mean_cost(self) -> torch.Tensor:
        """Mean of C_ij over every pair (B,)."""
        with torch.no_grad():
            local = torch.stack([torch_blocked.map_rows(block, _row_sums).sum(-1) for block in self._column_blocks()]).sum(0)
            total = all_reduce(local, dist.ReduceOp.SUM, self.group)
        return total / (sum(self.rows.sizes) * sum(self.columns.sizes))

    def _range_bounds(self) -> torch.Tensor:
        """An upper bound of max C - min C over every pair (B,): the ``PointCloud`` bound of the
        bounding box of every rank's points (all-reduced), exact for a callable cost (its
        blocks around the ring)."""
        if callable(self.inner.cost):
            ends = torch.stack([torch_blocked.map_rows(block, _row_ends).amax(dim=1)
                                for block in self._column_blocks()]).amax(0)
            ends = all_reduce(ends, dist.ReduceOp.MAX, self.group)
            return ends[:, 0] + ends[:, 1]
        points = torch.cat(self.inner.tensors, dim=1).detach().double()
        low = all_reduce(points.amin(dim=1, keepdim=True), dist.ReduceOp.MIN, self.group)
        high = all_reduce(points.amax(dim=1, keepdim=True), dist.ReduceOp.MAX, self.group)
        return self.inner.with_tensors(low, high)._range_bounds()
