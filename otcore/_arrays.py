"""Solver state held as NumPy arrays on a CPU and as tensors elsewhere, with the few operations
whose spelling differs between the two modules.

Small CPU problems are overhead-bound: a NumPy operation on a few thousand entries costs about a
microsecond of dispatch against several for torch's, and NumPy's BLAS computes a matrix-vector
product faster than torch's. The solvers that exploit this write their loops once, with the
operations NumPy and torch share (operators, ``xp.exp``, ``xp.concatenate``, ``xp.where``,
``xp.log``, ...), on arrays of a module ``xp`` that is ``numpy`` or ``torch``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: Largest CPU tensor (entries) that host-read reductions (validation) run on NumPy (``numpy_view``).
NUMPY_REDUCTION_ENTRIES = 2**20
#: Torch runs an element-wise operation on fewer entries than this on one thread (its grain size).
TORCH_GRAIN = 2**15


def numpy_view(t: torch.Tensor) -> np.ndarray | None:
    """A NumPy view of ``t`` for a reduction read on the host, where NumPy is the faster module:
    a CPU tensor of at most ``NUMPY_REDUCTION_ENTRIES`` entries (not bfloat16, which NumPy lacks);
    None otherwise (reduce with torch).

    NumPy reduces on one thread with little dispatch. Torch's reductions wake its thread pool,
    which a caller may have left asleep, and touch more code: 200 x 200 costs right after a 6 ms
    network simplex took 170-260 us through torch against 22-27 us through NumPy; the checks of a
    balanced problem's two weights (two minima, two sums), 70 us against 32 us (best of 100).
    """
    if t.device.type == "cpu" and t.dtype != torch.bfloat16 and t.numel() <= NUMPY_REDUCTION_ENTRIES:
        return t.detach().numpy()
    return None


def as_arrays(xp, *tensors: torch.Tensor | None) -> tuple:
    """``tensors`` as arrays of the module ``xp``: NumPy views (no copies, so CPU tensors only),
    or the tensors themselves; None stays None."""
    if xp is np:
        return tuple(None if t is None else t.detach().numpy() for t in tensors)
    return tensors


def as_tensors(*arrays) -> tuple[torch.Tensor, ...]:
    """Arrays of either module as tensors (views of NumPy arrays, no copies)."""
    return tuple(torch.from_numpy(x) if isinstance(x, np.ndarray) else x for x in arrays)


def host_floats(*scalars) -> list[float]:
    """0-d arrays of one module (same dtype) as Python floats, in one host read for tensors."""
    if isinstance(scalars[0], torch.Tensor):
        return torch.stack(scalars).tolist()
    return [float(s) for s in scalars]


def log_range(xp, *arrays) -> tuple[float, float]:
    """(largest |log x|, smallest x) over the entries of ``arrays`` (of the module ``xp``), from the
    largest and smallest entries alone (one host read): largest |log x| is inf where an entry is
    0, inf or NaN."""
    joined = xp.concatenate(arrays, -1)
    largest, smallest = host_floats(joined.max(), joined.min())
    if 0 < smallest and largest < math.inf:  # (nan fails both)
        return max(math.log(largest), -math.log(smallest)), smallest
    return math.inf, smallest
