"""Sharded solves with torch.distributed: geometries whose points are spread over processes.

``RowSharded`` spreads the sources (rows) over the ranks of a process group, with the targets
replicated; every solver that reduces over points through the geometry (``Geometry.softmin``,
``Geometry.total``, ``Geometry.kernel_apply``) runs on it unchanged. Works with gloo (CPU) and
NCCL (GPU) process groups.
"""

from otcore.distributed.row_sharded import RowSharded, shard

__all__ = ["RowSharded", "shard"]
