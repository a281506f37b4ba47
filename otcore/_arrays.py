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
