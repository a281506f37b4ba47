"""This rank's rows of a sparsified plan against every rank's columns, multiplied around a ring:
``sns``'s sparsified Hessian on a geometry sharded by rows and columns (``BothSharded``).

Rank r keeps K_rj, the entries of its rows of the plan P against rank j's columns that are at
least a drop threshold, as one sparse matrix per column shard j, assembled from dense chunks of
rows as the column shards pass around the ring (``BothSharded.kept_plan``). Products:

* ``P x`` (x: the column shards): rank r needs sum_j K_rj x_j; the x shards pass around the
  ring (``Ring.blocks``) and each rank multiplies the one it holds;
* ``P^T y`` (y: the row shards): rank j needs sum_r K_rj^T y_r; accumulators travel around the
  ring, each rank adding its part, and reach their owner (``Ring.reduce_scatter``).

Memory is O(nnz_local + (n + m)/P) per rank: the kept entries (twice: K_rj in CSR and its
transpose, so that both products read rows) and one shard in flight. Each K_rj holds the batch
as a block-diagonal (B n_local, B m_j) matrix, so a product is one sparse kernel per shard.

References:
    Tang, Shavlovsky, Rahmanian, Tardini, Thekumparampil, Xiao, Ying, "Accelerating Sinkhorn
    algorithm with sparse Newton iterations", ICLR 2024 (the sparsified Hessian).
    Patarasuk, Yuan, "Bandwidth optimal all-reduce algorithms for clusters of workstations",
    J. Parallel Distrib. Comput. 2009 (the ring reduce-scatter).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import cast

import torch

from otcore.distributed.ring import Ring


def kept_entries(chunks: Iterable[torch.Tensor], drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, K^T) as CSR matrices: K (B n, B k) block-diagonal over the batch, holding the entries of
    a (B, n, k) block that are >= ``drop`` (B,), given as its consecutive chunks of rows (B, r, k)
    (the block itself is never held)."""
    batches, rows, cols, values = [], [], [], []
    n = 0  # the rows so far
    for chunk in chunks:
        kept = chunk >= drop[:, None, None]
        batch, i, j = kept.nonzero().unbind(1)
        batches.append(batch)
        rows.append(i + n)
        cols.append(j)
        values.append(chunk[kept])
        n += chunk.shape[1]
    B, _, k = chunk.shape
    batch = torch.cat(batches)
    row, col, value = batch * n + torch.cat(rows), batch * k + torch.cat(cols), torch.cat(values)
    return _csr(row, col, value, (B * n, B * k)), _csr(col, row, value, (B * k, B * n))


def _csr(row: torch.Tensor, col: torch.Tensor, value: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The CSR matrix of the entries (row, col, value) (in any order, no duplicates)."""
    coo = torch.sparse_coo_tensor(torch.stack([row, col]), value, shape, check_invariants=False).coalesce()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return coo.to_sparse_csr()


class RingSparsePlan:
    """This rank's kept blocks K_rj of the plan against every rank j's columns, as an operator.

    Args:
        ring: the ring of the column shards (``sizes[j]``: rank j's number of columns m_j).
        blocks: by rank j, (K_rj, K_rj^T) as ``kept_entries`` returns them.
    """

    def __init__(self, ring: Ring, blocks: Sequence[tuple[torch.Tensor, torch.Tensor]]):
        self.ring, self.blocks = ring, blocks

    def matmul(self, v: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``P v``: v (B, m_local) -> (B, n_local), summed over every rank's columns; or
        ``P^T v`` (``transpose``): v (B, n_local) -> (B, m_local), summed over every rank's rows."""
        if transpose:
            return self.ring.reduce_scatter(lambda j: _apply(self.blocks[j][1], v))
        out = None
        for step, (shard,) in enumerate(self.ring.blocks((v,))):
            part = _apply(self.blocks[self.ring.source(step)][0], cast(torch.Tensor, shard))
            out = part if out is None else out + part
        return cast(torch.Tensor, out)


def _apply(K: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A block-diagonal K (B k, B l) times v (B, l): (B, k)."""
    return (K @ v.reshape(-1)).view(v.shape[0], -1)
