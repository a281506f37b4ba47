"""The fixed-point loop every Sinkhorn-type solver runs: stopping, freezing, progress.

A solver supplies ``step(state, eps) -> (new_state, error, kept)``: one iteration from a tuple
of (B, ...) tensors, with ``error`` (B,) the residual of the *old* state and ``kept`` the old
state as it is kept once accepted (the old state itself, or with entries that ``error`` does
not see, such as potentials of zero-weight points, refreshed from this iteration). The loop
freezes each problem of the batch as soon as its error reaches ``tol``, stops a problem whose
new state is not finite, and counts iterations per problem.

Host synchronisation happens only at checks (every ``check_every`` iterations), and only to
decide whether to stop: with ``tol=0`` the loop runs exactly ``max_iter`` iterations and reads
nothing on the host.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from otcore._validation import check_max_iter

State = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class SinkhornProgress:
    """What ``callback`` receives at each check.

    Attributes:
        iteration: iterations done so far.
        error: (B,) residual of the current iterate (for Sinkhorn, the marginal error
            |P1 - a|_1 + |P^T 1 - b|_1 when balanced; the fixed-point residual when unbalanced).
        active: (B,) problems still iterating.
        eps: the regularisation used at this iteration (differs from the target while annealing).
    """

    iteration: int
    error: torch.Tensor
    active: torch.Tensor
    eps: float


@dataclass(frozen=True)
class LoopOutcome:
    """The final state and, per problem (B,), iterations run, convergence, failure and error."""

    state: State
    n_iter: torch.Tensor
    converged: torch.Tensor
    failed: torch.Tensor
    error: torch.Tensor


def print_progress(solver: str, p: SinkhornProgress) -> None:
    """The ``verbose`` callback (bind ``solver``): one line every 100 iterations and at the end."""
    if p.iteration % 100 == 0 or not bool(p.active.any()):
        print(f"{solver} it {p.iteration:6d}  eps {p.eps:.3g}  max error {float(p.error.max()):.3e}  "
              f"active {int(p.active.sum())}/{p.active.numel()}")


def resolve_check_every(check_every: int | None, device: torch.device) -> int:
    """Iterations between host checks: as given (an integer >= 1), else 10 on GPUs and 1 on CPUs."""
    if check_every is None:
        return 10 if device.type == "cuda" else 1
    return check_max_iter("check_every", check_every)


def progress_callbacks(
    solver: str, callback: Callable[[SinkhornProgress], None] | None, verbose: bool,
) -> list[Callable[[SinkhornProgress], None]]:
    """The user's ``callback`` and, with ``verbose``, the printer: both run when both are given."""
    callbacks = [] if callback is None else [callback]
    if verbose:
        callbacks.append(functools.partial(print_progress, solver))
    return callbacks


def fixed_point_loop(
    step: Callable[[State, float], tuple[State, torch.Tensor, State]],
    state: State,
    *,
    eps: float,
    max_iter: int,
    tol: float,
    schedule: Sequence[float] = (),
    first_check: int = 1,
    check_every: int = 1,
    callbacks: Sequence[Callable[[SinkhornProgress], None]] = (),
) -> LoopOutcome:
    """Iterate ``step`` until every problem's error is <= ``tol`` or ``max_iter`` iterations.

    Args:
        step: one iteration (module docstring); it runs without gradients unless the caller
            enables them (unrolling).
        state: initial tensors, each (B, ...).
        eps: the target regularisation, passed to ``step`` after the annealing ``schedule``.
        max_iter: iteration cap (annealing iterations included).
        tol: stopping tolerance on ``error``; 0 runs exactly ``max_iter`` iterations, and
            ``converged`` then only says that the iterates stayed finite.
        schedule: eps values of the first iterations (eps-scaling); errors are not tested there.
            It never takes the last iteration: the returned state is at least one step at ``eps``
            (potentials of a larger eps may overflow every plan entry at the target one).
        first_check: the first iteration (after the schedule) whose error is meaningful.
        check_every: iterations between host checks (loop exit, callbacks).
        callbacks: called with a ``SinkhornProgress`` at every check.
    """
    schedule = schedule[: max(0, max_iter - 1)]
    ref = state[0]
    batch, device = ref.shape[0], ref.device
    active = torch.ones(batch, dtype=torch.bool, device=device)
    converged = torch.zeros_like(active)
    failed = torch.zeros_like(active)
    n_iter = torch.zeros(batch, dtype=torch.int64, device=device)
    error = torch.full((batch,), float("inf"), dtype=ref.dtype, device=device)
    measured_from = len(schedule) + first_check
    for it in range(1, max_iter + 1):
        e = schedule[it - 1] if it <= len(schedule) else eps
        new_state, new_error, kept = step(state, e)
        with torch.no_grad():
            if it >= measured_from:
                error = torch.where(active, new_error, error)
                if tol > 0:
                    done = active & (error <= tol)
                    converged = converged | done
                    active = active & ~done
            finite = _all_finite(new_state)
            failed = failed | (active & ~finite)
            active = active & finite
            n_iter = n_iter + active.long()
        state = tuple(select(active, new, old) for new, old in zip(new_state, kept, strict=True))
        if it % check_every == 0 or it == max_iter:
            for callback in callbacks:
                callback(SinkhornProgress(iteration=it, error=error, active=active, eps=e))
            if tol > 0 and not bool(active.any()):
                break
    if tol == 0:
        converged = ~failed
    return LoopOutcome(state=state, n_iter=n_iter, converged=converged, failed=failed, error=error)


def select(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per problem (leading dim), ``new`` where ``mask`` (B,) else ``old``."""
    return torch.where(mask.view(-1, *([1] * (new.dim() - 1))), new, old)


def _all_finite(state: State) -> torch.Tensor:
    """(B,) whether every entry of every tensor of a problem is finite."""
    finite = torch.isfinite(state[0]).flatten(1).all(-1)
    for t in state[1:]:
        finite &= torch.isfinite(t).flatten(1).all(-1)
    return finite
