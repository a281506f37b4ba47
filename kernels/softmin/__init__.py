"""The softmin op, ``-eps log sum_j w_j exp((h_j - C_ij)/eps)``, and its plan products.

* ``naive``: a few lines on a dense cost; the oracle every other path is tested against.
* ``blocked``: the pure-torch path (blocks of rows in reused buffers); the CPU and float64 backend.
* ``triton``: the Triton kernels (streaming log-sum-exp and plan products).
* ``op``: those kernels as ``torch.library`` custom ops, with the softmin's fused backward.

Only ``naive`` and ``blocked`` are imported here: ``triton`` and ``op`` import Triton, which the
Triton backend loads on first use.
"""

from . import blocked, naive

__all__ = ["blocked", "naive"]
