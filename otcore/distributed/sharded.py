"""What every geometry sharded across the processes of a group shares: it wraps this rank's
local geometry (``inner``), tells the solvers it is sharded, never offers a dense plan, and
takes host decisions together (``all_true``)."""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.distributed as dist
from typing_extensions import Self

from otcore.distributed.collectives import all_reduce
from otcore.geometry import Geometry

S = TypeVar("S", bound="ShardedGeometry")


class ShardedGeometry(Geometry):
    """Base of ``RowSharded`` and ``BothSharded``: ``inner`` is this rank's geometry, ``group``
    the process group (None: the default one)."""

    sharded = True
    #: never a dense plan: no rank holds all of a reduced axis, so its products would be partial
    holds_costs = False
    inner: Geometry
    group: dist.ProcessGroup | None

    @property
    def shape(self):
        return self.inner.shape

    @property
    def tensors(self):
        return self.inner.tensors

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    def with_tensors(self, *tensors: torch.Tensor) -> Self:
        return self._replace(inner=self.inner.with_tensors(*tensors))

    def all_true(self, flags: torch.Tensor) -> torch.Tensor:
        """As ``Geometry.all_true``: an all-reduce MIN of the ranks' flags."""
        return all_reduce(flags.to(torch.uint8), dist.ReduceOp.MIN, self.group).bool()
