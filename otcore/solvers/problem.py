"""Turning user inputs (cost or geometry, optional weights) into one validated batched problem."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from otcore._validation import check_equal_mass, prepare_weights
from otcore.geometry import Geometry, as_geometry
from otcore.warnings import ConvergenceWarning


@dataclass(frozen=True)
class Problem:
    """A batch of B problems: geometry (B, n, m), weights a (B, n) and b (B, m)."""

    geom: Geometry
    a: torch.Tensor
    b: torch.Tensor
    batched: bool
    out_dtype: torch.dtype


def prepare_problem(cost, a, b, *, balanced: bool) -> Problem:
    """Validate and broadcast; half-precision inputs are computed in float32.

    Raises:
        ValueError: bad shapes, negative or non-finite weights or costs, and (when ``balanced``)
            unequal total masses.
    """
    geom = as_geometry(cost)
    out_dtype = geom.dtype
    compute = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    geom = geom.to_dtype(compute)
    Bg, n, m = geom.shape
    batch = Bg
    batched = geom.batched
    for name, w in (("a", a), ("b", b)):
        if torch.is_tensor(w) and w.dim() == 2:
            batched = True
            if Bg != 1 and w.shape[0] not in (1, Bg):
                raise ValueError(f"{name} has batch size {w.shape[0]} but the cost has {Bg}")
            batch = max(batch, w.shape[0])
    geom = geom.broadcast_to(batch)
    a = prepare_weights("a", a, batch, n, compute, geom.device)
    b = prepare_weights("b", b, batch, m, compute, geom.device)
    if balanced:
        check_equal_mass(a, b)
    return Problem(geom, a, b, batched, out_dtype)


def warn_not_converged(solver: str, converged: torch.Tensor, failed: torch.Tensor, max_iter: int, warn: bool) -> None:
    """One ``ConvergenceWarning`` per call when any problem did not converge."""
    if not warn or bool(converged.all()):
        return
    n_bad, n_nan = int((~converged).sum()), int(failed.sum())
    reason = f"{n_nan} stopped on a non-finite iterate, " if n_nan else ""
    warnings.warn(
        f"{solver}: {n_bad} of {converged.numel()} problem(s) did not converge ({reason}max_iter={max_iter}); "
        "result.converged is False for them. Raise max_iter, loosen tol or increase eps.",
        ConvergenceWarning,
        stacklevel=3,
    )
