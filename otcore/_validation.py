"""Input checks shared by every solver: each raises ``ValueError`` naming the argument."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import torch

from otcore._arrays import numpy_view
from otcore._precision import upcast


def _real(name: str, value, expected: str) -> float:
    """``value`` as a float if it is a real number (not a bool, string or complex); else raise.

    A one-element tensor is read as its number, unless it requires grad: options are constants,
    and reading one as a float would silently cut its gradient.
    """
    if torch.is_tensor(value) and value.requires_grad:
        raise ValueError(f"{name} is not differentiable: got a tensor that requires grad; pass a number "
                         f"(float({name}) or {name}.detach()) to solve at that value")
    if torch.is_tensor(value) and value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")  # noqa: TRY004 (the API contract: ValueError)
    return float(value)


def check_tensor(name: str, t) -> None:
    """Raise unless ``t`` is a torch.Tensor; for a NumPy array (or a list), say how to convert it."""
    if torch.is_tensor(t):
        return
    hint = ""
    if type(t).__module__ == "numpy" or isinstance(t, (list, tuple)):
        hint = f" (otcore works on torch tensors: pass torch.as_tensor({name}), and .numpy() the results)"
    raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}{hint}")


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise if ``t`` holds NaN or infinity. A finite sum (one pass, no mask) settles the usual
    case; a sum that overflows is checked entry by entry."""
    check_tensor(name, t)
    if t.is_floating_point() and not math.isfinite(float(t.detach().sum())) and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} holds {bad} non-finite value(s) (NaN or inf)")


def check_positive(name: str, value: float) -> float:
    """Raise unless ``value`` is a finite real number > 0; returns it as float."""
    v = _real(name, value, "a positive number")
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return v


def check_tau(name: str, value: float) -> float:
    """Raise unless ``0 < value <= 1`` (1 = balanced marginal)."""
    v = _real(name, value, "a number in (0, 1] (1 = balanced)")
    if not 0.0 < v <= 1.0:
        raise ValueError(f"{name} must lie in (0, 1] (1 = balanced), got {value!r}")
    return v


def check_rho(name: str, value: float | None, tau: float, tau_name: str) -> float | None:
    """A KL marginal penalty rho > 0 (inf: balanced), or None when not given; refuses a rho given
    beside a relaxed ``tau`` (the same knob twice)."""
    if value is None:
        return None
    v = _real(name, value, "a number > 0 (inf: a hard constraint)")
    if not v > 0:
        raise ValueError(f"{name} must be > 0 (inf: a hard constraint), got {value!r}")
    if tau != 1.0:
        raise ValueError(f"give {tau_name} or {name}, not both (tau = rho / (rho + eps))")
    return v


@functools.cache
def mass_rtol(*dtypes: torch.dtype) -> float:
    """Relative tolerance for 'equal masses' of weights given in ``dtypes``: 1e3 machine epsilons
    of the coarsest, at most 1 % (float64: 2.2e-13, float32: 1.2e-4, float16/bfloat16: 1e-2).

    Weights rounded to a dtype carry that dtype's relative error in their total, whatever the
    precision they are later computed in.
    """
    return min(1e-2, max(1e3 * torch.finfo(d).eps for d in dtypes))


def prepare_weights(
    name: str, w: torch.Tensor | None, *, batch: int, n: int, dtype: torch.dtype, device: torch.device,
    shard: bool = False,
) -> torch.Tensor:
    """Weights of a problem of ``batch`` x ``n`` points as (batch, n) in ``dtype``; checks shapes
    (``check_weight_values`` reads the values).

    None means uniform ``1/n``. Accepts (n,) (shared by the batch) or (batch, n). ``shard``: the n
    points are this process's part of a sharded side, whose mass only the whole can tell: None
    then gives ones (to be divided by the total over every process).
    """
    if w is None:
        if n == 0:
            raise ValueError(f"{name}: the problem has no points")
        return torch.full((batch, n), 1.0 if shard else 1.0 / n, dtype=dtype, device=device)
    if not torch.is_tensor(w):
        raise ValueError(f"{name} must be a torch.Tensor or None, got {type(w).__name__}")
    if not w.is_floating_point():
        raise ValueError(f"{name} must be a real floating-point tensor, got {w.dtype}")
    given = tuple(w.shape)  # reported as the user passed it
    if w.dim() == 1:
        w = w.unsqueeze(0)
    if w.dim() != 2 or w.shape[-1] != n or w.shape[0] not in (1, batch):
        raise ValueError(f"{name} has shape {given}, expected ({n},) or ({batch}, {n}) to match the cost")
    return upcast(w.expand(batch, n).to(device=device), dtype)


def check_weight_values(
    weights: Sequence[tuple[str, torch.Tensor, torch.Tensor]], *, shard: bool = False,
    equal_mass_rtol: float | None = None,
) -> None:
    """Value checks of weights as they are computed, given as (name, w (B, n), row masses (B,)),
    read back in one host transfer: each one's smallest entry and its masses (finite unless an
    entry is not).

    Weights must be finite, non-negative and (unless ``shard``: one process's part of a side,
    possibly empty) of positive mass; zeros are allowed. ``equal_mass_rtol``: the first two must
    also have equal masses (a balanced problem's a and b), to that relative tolerance.
    """
    for name, w, _ in weights:
        if w.numel() == 0 and not shard:
            raise ValueError(f"{name} has zero total mass; at least one weight must be > 0")
    present = [entry for entry in weights if entry[1].numel()]
    if not present:
        return
    smallest, masses = _minima_and_masses(present)
    for (name, w, _), low, mass in zip(present, smallest, masses, strict=True):
        if not all(map(math.isfinite, mass)) and not bool(torch.isfinite(w).all()):
            raise ValueError(f"{name} holds {int((~torch.isfinite(w)).sum())} non-finite value(s) (NaN or inf) "
                             f"in {w.dtype}, the dtype it is computed in")
        if low < 0:
            raise ValueError(f"{name} has negative entries (min {low:.3g}); weights must be >= 0")
        if not shard and not min(mass) > 0:
            raise ValueError(f"{name} has zero total mass; at least one weight must be > 0")
    if equal_mass_rtol is not None:
        check_equal_mass(masses[0], masses[1], equal_mass_rtol)


def _minima_and_masses(weights: Sequence[tuple[str, torch.Tensor, torch.Tensor]]) -> tuple[list[float], list[list[float]]]:
    """Each weight's smallest entry, and its row masses, as floats: by NumPy where ``numpy_view``
    allows, else in one host transfer."""
    views = [(numpy_view(w), numpy_view(mass)) for _, w, mass in weights]
    host = [(w, mass) for w, mass in views if w is not None and mass is not None]
    if len(host) == len(weights):
        return [float(w.min()) for w, _ in host], [mass.reshape(-1).tolist() for _, mass in host]
    with torch.no_grad():
        minima = torch.stack([w.amin() for _, w, _ in weights])
        stats = torch.cat([minima, *(mass.reshape(-1) for _, _, mass in weights)]).tolist()
    smallest, masses, at = stats[:len(weights)], [], len(weights)
    for _, _, row_masses in weights:
        masses.append(stats[at:at + row_masses.numel()])
        at += row_masses.numel()
    return smallest, masses


def check_equal_mass(masses_a: Sequence[float], masses_b: Sequence[float], rtol: float) -> None:
    """Raise if a balanced problem's total masses (one per problem) differ by more than ``rtol``
    relatively."""
    if any(abs(x - y) > rtol * max(x, y) for x, y in zip(masses_a, masses_b, strict=True)):
        raise ValueError(
            f"a and b must have equal total mass in a balanced problem (tau_a = tau_b = 1); "
            f"got sum(a) = {list(masses_a)} and sum(b) = {list(masses_b)}. Normalise them or use tau < 1."
        )


def check_tol(value: float) -> float:
    """Raise unless ``value`` is a finite number >= 0 (0: no stopping test); returns it as float."""
    v = _real("tol", value, "a number >= 0")
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"tol must be finite and >= 0 (0: run exactly max_iter iterations), got {value!r}")
    return v


def check_max_iter(name: str, value: int, minimum: int = 1) -> int:
    """Raise unless ``value`` is an integer >= ``minimum``; returns it as int."""
    try:
        ok = _real(name, value, "an integer").is_integer() and int(value) >= minimum
    except (ValueError, OverflowError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_ratio(name: str, value: float | None) -> float | None:
    """Raise unless ``value`` is None or a number in (0, 1); returns it as float (or None)."""
    if value is None:
        return None
    v = _real(name, value, "a number in (0, 1)")
    if not 0.0 < v < 1.0:
        raise ValueError(f"{name} must lie in (0, 1), got {value!r}")
    return v
