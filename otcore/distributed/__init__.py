"""Sharded solves with torch.distributed: geometries whose points are spread over processes.

``RowSharded`` spreads the sources (rows) over the ranks of a process group, with the targets
replicated; ``BothSharded`` spreads both point clouds, for when neither fits one device (the
column shards pass around a ring of the ranks, O((n + m)/P) memory per rank). Every solver that
reduces over points through the geometry (``Geometry.softmin``, ``Geometry.total``,
``Geometry.kernel_apply``) runs on them unchanged. Works with gloo (CPU) and NCCL (GPU) process
groups.
"""

from otcore.distributed.both_sharded import BothSharded
from otcore.distributed.row_sharded import RowSharded, shard

__all__ = ["BothSharded", "RowSharded", "shard"]
