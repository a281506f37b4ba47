"""Compute kernels behind the geometry's softmin (installed as ``otcore.kernels``).

One folder per op (``softmin/``: naive oracle, blocked torch path, Triton kernels, custom op),
plus ``availability`` (whether Triton can run here, answered without importing it at package
import) and ``codes`` (the cost and coefficient codes the geometries pass to the kernels).
Nothing in this package imports otcore.
"""

from . import availability, codes, softmin

__all__ = ["availability", "codes", "softmin"]
