"""Point clouds: costs recomputed block by block, or, for small clouds, computed once and kept."""

from __future__ import annotations

import torch

from otcore._precision import HALF
from otcore._validation import check_finite, check_tensor
from otcore.geometry.backends import resolve_backend
from otcore.geometry.base import Geometry
from otcore.geometry.cost_matrix import CostMatrix
from otcore.geometry.costs import pairwise_cost, parse_cost
from otcore.kernels.codes import POINT_COSTS

#: Most memory (bytes) that a ``PointCloud`` on the torch backend spends on keeping its costs C
#: and C^T (2 B n m entries of the compute dtype), computed once, for its passes without
#: gradients; larger clouds recompute their costs block by block in every pass. Set it in your
#: program to change it (0: always recompute).
DENSE_COSTS_BYTES = 2**26


def _centred(x: torch.Tensor, y: torch.Tensor, grid: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x and y shifted by their joint mean (B, 1, d), which no supported cost sees (no gradient),
    in the coordinates where the shift is exact: the points then have exactly the costs of the
    points as given (what a float64 check of the solve must see).

    The mean is rounded to ``grid`` (the dtype the points were given in; default theirs), and a
    coordinate is shifted only where every point lies within a factor 2 of it, same sign
    (Sterbenz's lemma: the difference is then exact). Those are the coordinates where centring
    matters, far from the origin against the spread; elsewhere the shift is 0.
    """
    points = torch.cat([x, y], dim=1).detach()
    center = points.mean(dim=1, keepdim=True).to(grid or x.dtype).to(x.dtype)
    low, high = points.amin(dim=1, keepdim=True), points.amax(dim=1, keepdim=True)
    positive = (low >= center / 2) & (high <= 2 * center)
    negative = (high <= center / 2) & (low >= 2 * center)
    center = torch.where(positive | negative, center, 0.0)
    return x - center, y - center


class PointCloud(Geometry):
    """Costs ``c(x_i, y_j)`` between x (n, d) / (B, n, d) and y (m, d) / (B, m, d).

    Memory is O((n + m) d + block * m): the softmin and plan products recompute the costs of one
    block of rows at a time (and again in the backward pass). Below ``DENSE_COSTS_BYTES``
    (64 MiB for C and C^T) the torch backend computes the n x m costs once instead (at its
    second pass over them, or when a solver materialises them; C^T at its first use) and reads
    them in every pass without gradients (a softmin over a stored matrix takes about half the
    time of one that recomputes the costs); gradients still reach the points through the costs'
    formula.

    Args:
        x: source points.
        y: target points (same d; same batch size, or one of the two unbatched).
        cost: ``"sqeuclidean"`` (|x - y|^2, no 1/2; default), ``"euclidean"``, ``"l1"``, a
            number p >= 1 for the p-norm |x - y|_p, ``"cosine"`` (1 - cos(x, y)), or a callable
            ``c(x, y)``: (B, r, d), (B, L, d) -> (B, r, L), differentiable by autograd and called
            on blocks of rows (the torch backend; its values are not checked with
            ``validate=False``).
        backend: ``"auto"`` (Triton for CUDA float32/float16/bfloat16 tensors when it imports,
            torch otherwise), ``"torch"`` or ``"triton"`` (the kernels cover the sqeuclidean and
            euclidean costs; on CPU tensors they need ``TRITON_INTERPRET=1``).
        validate: check that the points are finite (a host synchronisation); ``False`` skips it.

    Clouds of different sizes share a batch by padding: give the padded points weight 0 (in
    ``a`` / ``b``); they then take no part in any reduction.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, cost="sqeuclidean", backend: str = "auto", *,
                 validate: bool = True):
        for name, t in (("x", x), ("y", y)):
            check_tensor(name, t)
            if t.dim() not in (2, 3):
                raise ValueError(f"{name} must have shape (n, d) or (B, n, d), got {tuple(t.shape)}")
            if 0 in t.shape[-2:]:
                raise ValueError(f"{name} is empty: shape {tuple(t.shape)} (points need n >= 1 and d >= 1)")
            if not t.is_floating_point():
                raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
            if validate:
                check_finite(name, t)
        if x.shape[-1] != y.shape[-1]:
            raise ValueError(f"x and y must have the same dimension d, got x: {tuple(x.shape)}, y: {tuple(y.shape)}")
        self.validate = validate
        self.batched = x.dim() == 3 or y.dim() == 3
        xb, yb = (x if x.dim() == 3 else x.unsqueeze(0)), (y if y.dim() == 3 else y.unsqueeze(0))
        if xb.shape[0] != yb.shape[0] and 1 not in (xb.shape[0], yb.shape[0]):
            raise ValueError(f"x and y have different batch sizes: {xb.shape[0]} and {yb.shape[0]}")
        batch = max(xb.shape[0], yb.shape[0])
        xb, yb = xb.expand(batch, -1, -1), yb.expand(batch, -1, -1)
        dtype = torch.promote_types(xb.dtype, yb.dtype)
        xb, yb = xb.to(dtype), yb.to(dtype)
        # Every supported cost is translation invariant: centring cuts the cancellation of the
        # |x|^2 + |y|^2 - 2 x.y expansion (and changes no cost or gradient). Half-precision points
        # are kept exactly as given (centring would round them again); the expansion of exact
        # half values is then accumulated in float32.
        self.cost = parse_cost(cost)
        if dtype not in HALF and not (callable(self.cost) or self.cost == "cosine"):  # not translation invariant
            xb, yb = _centred(xb, yb)
        self.x, self.y = xb, yb
        if callable(self.cost):
            unsupported: str | None = "no Triton kernel for a callable cost"
        elif self.cost in POINT_COSTS:
            unsupported = None
        elif self.cost == "cosine":
            unsupported = "no Triton kernel for the cosine cost"
        else:
            unsupported = f"no Triton kernel for the p-norm cost p={self.cost}"
        self.backend = resolve_backend(backend, xb.device, dtype, unsupported)

    @property
    def shape(self):
        return (self.x.shape[0], self.x.shape[1], self.y.shape[1])

    @property
    def tensors(self):
        return (self.x, self.y)

    def _range_bounds(self) -> torch.Tensor:
        """An upper bound of max C - min C (B,): the cost of the diagonal of the two clouds' joint
        bounding box (translation-invariant costs), 2 (cosine), the exact range block by block
        (a callable cost)."""
        if callable(self.cost):
            return super()._range_bounds()
        if self.cost == "cosine":
            return torch.full((self.x.shape[0],), 2.0, dtype=torch.float64, device=self.x.device)
        points = torch.cat([self.x, self.y], dim=1).double()
        diagonal = points.amax(dim=1) - points.amin(dim=1)
        if self.cost == "sqeuclidean":
            return diagonal.pow(2).sum(-1)
        return torch.linalg.vector_norm(diagonal, ord=2.0 if self.cost == "euclidean" else self.cost, dim=-1)

    def to_dtype(self, dtype: torch.dtype) -> PointCloud:
        """As ``Geometry.to_dtype``; half points converted for the torch path are centred then."""
        converted = super().to_dtype(dtype)
        if self.x.dtype in HALF and converted.x.dtype not in HALF:
            return converted.with_tensors(*_centred(converted.x, converted.y, grid=self.x.dtype))
        return converted

    def with_tensors(self, *tensors: torch.Tensor) -> PointCloud:
        x, y = tensors
        return self._replace(x=x, y=y)

    def self_transport(self) -> tuple[PointCloud, PointCloud]:
        """(x <-> x, y <-> y) with this cloud's cost and backend."""
        return self.with_tensors(self.x, self.x), self.with_tensors(self.y, self.y)

    def cost_rows(self, rows, transpose=False):
        src, dst = (self.y, self.x) if transpose else (self.x, self.y)
        return pairwise_cost(src[:, rows].to(self.dtype), dst.to(self.dtype), self.cost)

    def _stored(self, transpose: bool = False, rows: slice | None = None, *,
                now: bool = False) -> CostMatrix | None:
        """The costs C (``transpose``: C^T, contiguous: reductions run along memory) as a
        ``CostMatrix`` without gradient, kept while the points are unchanged (their version
        counters); None when not on the torch backend, when C and C^T would take more than
        ``DENSE_COSTS_BYTES``, or before the second pass over the costs (a call with ``rows``
        from 0, or None) unless ``now``. C^T is made at its first use. (``_replace`` drops them:
        other points.)"""
        B, n, m = self.shape
        if self.backend != "torch" or 2 * B * n * m * self.dtype.itemsize > DENSE_COSTS_BYTES:
            return None
        versions = (self.x._version, self.y._version)
        stored = self.__dict__.get("_dense")
        if stored is None or stored[0] != versions:
            # kept from the second pass on (a pass starts at row 0): a cloud used for one pass (a
            # block of a sharded geometry's ring, built afresh each time) recomputes its costs
            if rows is None or not rows.start:
                self._passes = self.__dict__.get("_passes", 0) + 1
            if not now and self.__dict__.get("_passes", 0) < 2:
                return None
            with torch.no_grad():  # in one piece: no block's temporary to copy from (C is at most DENSE_COSTS_BYTES / 2)
                C = self.cost_rows(slice(0, n)).contiguous()
            later: list[CostMatrix] = []  # C^T, once made
            stored = self._dense = (versions, CostMatrix(C, backend="torch", validate=False), later)
        _, costs, later = stored
        if not transpose:
            return costs
        if not later:
            symmetric = self.x is self.y  # a self-transport cloud (costs of a measure with itself)
            later.append(costs if symmetric else CostMatrix(costs.C.mT.contiguous(), backend="torch", validate=False))
        return later[0]

    def _replace(self, **fields):
        """As ``Geometry._replace``, without the stored costs of these points (``_stored``)."""
        new = super()._replace(**fields)
        new.__dict__.pop("_dense", None)
        new.__dict__.pop("_passes", None)
        return new

    def cost_block(self, rows, transpose=False):
        stored = self._stored(transpose, rows)
        return super().cost_block(rows, transpose) if stored is None else stored.C[:, rows]

    def cost_vjp(self, G, transpose, wanted):
        """As ``Geometry.cost_vjp``; in closed form for the squared-Euclidean cost of points held
        in the compute dtype: with C_ij = |x_i - y_j|^2, d/dx_i = 2 (x_i sum_j G_ij - sum_j G_ij y_j)
        and d/dy_j = 2 (y_j sum_i G_ij - sum_i G_ij x_i) (two small matrix products, no autograd
        graph over the block)."""
        if self.cost != "sqeuclidean" or self.x.dtype != self.dtype:
            return super().cost_vjp(G, transpose, wanted)
        src, dst = (self.y, self.x) if transpose else (self.x, self.y)
        G = G.to(self.dtype)
        grad_src = (src * G.sum(-1, keepdim=True) - torch.bmm(G, dst)).mul_(2.0)
        grad_dst = (dst * G.sum(-2).unsqueeze(-1) - torch.bmm(G.mT, src)).mul_(2.0)
        grads = (grad_dst, grad_src) if transpose else (grad_src, grad_dst)
        return tuple(grad if need else None for grad, need in zip(grads, wanted, strict=True))

    def materialize(self):
        """As ``Geometry.materialize``; without gradients, the stored costs (``DENSE_COSTS_BYTES``),
        kept from this call on (the whole matrix is computed anyway)."""
        stored = None if self.needs_grad() else self._stored(now=True)
        return super().materialize() if stored is None else stored.C

    def restricted(self, rows, transpose=False):
        return self.with_tensors(self.x, self.y[:, rows]) if transpose else self.with_tensors(self.x[:, rows], self.y)

    def kernel_operands(self, transpose):
        src, dst = (self.y, self.x) if transpose else (self.x, self.y)
        return src, dst, POINT_COSTS[self.cost]

    def fill_scores(self, rows, buf, h, inv_eps, transpose):
        stored = self._stored(transpose, rows)
        if stored is not None:  # rows of C or of C^T
            return stored.fill_scores(rows, buf, h, inv_eps, False)
        src, dst = (self.y, self.x) if transpose else (self.x, self.y)
        xs = src[:, rows]
        if self.cost == "sqeuclidean":
            # h_j - |x_i - y_j|^2/eps = (h_j - |y_j|^2/eps) + 2 x_i.y_j/eps  - |x_i|^2/eps
            col = h - dst.pow(2).sum(-1) * inv_eps
            torch.baddbmm(col.unsqueeze(-2), xs, dst.mT, alpha=2.0 * inv_eps, out=buf)
            return xs.pow(2).sum(-1).mul_(-inv_eps)
        torch.add(h.unsqueeze(-2), pairwise_cost(xs, dst, self.cost), alpha=-inv_eps, out=buf)
        return None
