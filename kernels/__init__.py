"""Compute kernels behind the geometry's softmin (installed as ``otcore.kernels``).

Only torch is imported here: ``reference`` holds the pure-torch implementation, which is the CPU
path and the oracle the Triton kernels are tested against. Nothing in this package imports otcore.
"""

from . import reference

__all__ = ["reference"]
