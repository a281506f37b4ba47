"""The fixed-point loop every Sinkhorn-type solver runs: stopping, freezing, progress.

A solver supplies ``step(state, eps) -> (new_state, error, kept)``: one iteration from a tuple
of (B, ...) tensors, with ``error`` (B,) the residual of the *old* state and ``kept`` the old
state as it is kept once accepted (the old state itself, or with entries that ``error`` does
not see, such as potentials of zero-weight points, refreshed from this iteration). The loop
freezes each problem of the batch as soon as its error reaches ``tol``, stops a problem whose
new state is not finite, and counts iterations per problem.

Host synchronisation happens only at checks (every ``check_every`` iterations), and only to
decide whether to stop: with ``tol=0`` the loop runs exactly ``max_iter`` iterations and reads
nothing on the host. One problem on the CPU, where reading a number costs no synchronisation,
is decided on the host at every iteration instead (where the caller allows host reads), with the same outcome and none of the
per-iteration tensor bookkeeping a batch needs (which would cost as much as a small problem's
iteration).
"""

from __future__ import annotations

import functools
import math
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
    host_reads: bool = False,
    agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
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
        host_reads: whether the caller allows reading the host at every iteration (a solve
            that validates its inputs); a batch of one on the CPU is then decided there.
        agree: for a state sharded across processes, ``Geometry.all_true`` of its geometry:
            an iterate is finite only where it is on every process, so that all stop together
            (the errors, reduced through the geometry, already agree).
    """
    schedule = schedule[: max(0, max_iter - 1)]
    ref = state[0]
    batch, device = ref.shape[0], ref.device
    if host_reads and batch == 1 and device.type == "cpu" and not torch.compiler.is_compiling():
        return _one_problem_loop(step, state, eps=eps, max_iter=max_iter, tol=tol, schedule=schedule,
                                 measured_from=len(schedule) + first_check, check_every=check_every,
                                 callbacks=callbacks, agree=agree)
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
            finite = _all_finite(new_state) if agree is None else agree(_all_finite(new_state))
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


def _one_problem_loop(
    step: Callable[[State, float], tuple[State, torch.Tensor, State]],
    state: State,
    *,
    eps: float,
    max_iter: int,
    tol: float,
    schedule: Sequence[float],
    measured_from: int,
    check_every: int,
    callbacks: Sequence[Callable[[SinkhornProgress], None]],
    agree: Callable[[torch.Tensor], torch.Tensor] | None,
) -> LoopOutcome:
    """``fixed_point_loop`` for a batch of one on the CPU, decided on the host: the outcome is
    the batched loop's (the problem's state freezes, and the loop ends, at the first error <=
    tol or the first non-finite iterate), and so are the callbacks' reports."""
    ref = state[0]
    error, n_iter, converged, failed = math.inf, 0, False, False
    for it in range(1, max_iter + 1):
        e = schedule[it - 1] if it <= len(schedule) else eps
        new_state, new_error, kept = step(state, e)
        if it >= measured_from:
            error = float(new_error)
            converged = tol > 0 and error <= tol
        if not converged:
            failed = not _finite(new_state)
            if agree is not None:
                failed = not bool(agree(torch.tensor([not failed], device=ref.device)))
        stop = converged or failed
        state = kept if stop else new_state
        n_iter += not stop
        if callbacks and (stop or it % check_every == 0 or it == max_iter):
            # a stop is reported at the check the batched loop would reach with the state frozen
            check = min(max_iter, -(-it // check_every) * check_every)
            progress = SinkhornProgress(iteration=check, error=ref.new_full((1,), error),
                                        active=torch.tensor([not stop]), eps=e)
            for callback in callbacks:
                callback(progress)
        if stop:
            break
    if tol == 0:
        converged = not failed
    flag = functools.partial(torch.tensor, dtype=torch.bool)
    return LoopOutcome(state=state, n_iter=torch.tensor([n_iter]), converged=flag([converged]),
                       failed=flag([failed]), error=ref.new_full((1,), error))


def _finite(state: State) -> bool:
    """Whether every entry of a one-problem state is finite (a sum first: one pass in the usual case)."""
    return math.isfinite(sum(float(t.detach().sum()) for t in state)) or bool(_all_finite(state).all())


def select(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per problem (leading dim), ``new`` where ``mask`` (B,) else ``old``."""
    return torch.where(mask.view(-1, *([1] * (new.dim() - 1))), new, old)


def _all_finite(state: State) -> torch.Tensor:
    """(B,) whether every entry of every tensor of a problem is finite."""
    finite = torch.isfinite(state[0]).flatten(1).all(-1)
    for t in state[1:]:
        finite &= torch.isfinite(t).flatten(1).all(-1)
    return finite
