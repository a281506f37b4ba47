"""Compute kernels behind the geometry's softmin (installed as ``otcore.kernels``).

* ``reference``: the pure-torch implementation, blocked and buffer-reusing; the CPU path and the
  oracle the Triton kernels are tested against.
* ``softmin_triton``: the Triton kernels (streaming log-sum-exp and plan products).
* ``ops``: those kernels as ``torch.library`` custom ops, with the softmin's fused backward.
* ``availability``: whether Triton can run here, answered without importing it at package import.
* ``codes``: the cost and coefficient codes the geometries pass to the kernels.

Only ``reference`` and ``availability`` are imported here; the geometry imports ``ops`` (and with
it Triton) the first time a Triton-backed softmin runs. Nothing in this package imports otcore.
"""

from . import availability, reference

__all__ = ["availability", "reference"]
