"""Balanced Sinkhorn at matrix-vector speed: scaling iterations, checked every k iterations.

With the stabilised kernel K~ = exp((f0 + g0 - C) / eps) of ``scaling.StabilisedKernel``, built
at reference potentials (f0, g0), the iterate is held as its row and column sums

    s = K~ (b / t),    t = K~^T (a / s),    f = f0 - eps log s,    g = g0 - eps log t,

so that an iteration is two matrix-vector products and two divisions (Cuturi's scaling
iteration) and nothing else. The self-transport potential of a symmetric problem (the Sinkhorn
divergence's debiasing terms), p = p0 - eps log r, takes averaged updates
r <- sqrt(r K~ (w / r)) the same way (Feydy et al. 2019, Sec. 3.1). The rest happens at checks:

* each problem's error is measured on its own schedule, every k iterations with k adapted to
  its measured contraction (the next iteration after its first error; then doubling up to
  ``MAX_INTERVAL``, and to a quarter of the iterations run, or ``YOUNG_INTERVAL``, but at
  least what a check costs in iterations of its size, ``least_interval``; shortened to land on
  its predicted convergence), so that a problem's result does not depend on the batch it is
  solved in; it stops at the first of its checks whose error is <= tol, with the iterate
  measured there (so up to k - 1 iterations after the first iterate that met tol). The error
  is the marginal error sum_i a_i |s_i / s'_i - 1| of the iterate one iteration back
  (``dual.row_error`` in scaling form; its column marginals are exact);
* absorption (Schmitzer 2019): where a scaling has left [e^-T, e^T] the iterate is absorbed into
  the reference and K~ rebuilt; checks come often enough, by the scalings' measured drift, that
  they do not get far past that range in between;
* safety: a check that finds a sum that is not finite, or so small that it may rest on subnormal
  kernel entries, rolls back to the previous check and repeats from there one iteration per
  check (a cross problem whose given start fails so restarts from its hard c-transforms, once);
  a failure there too, or absorptions on more than every other iteration (eps small
  against the costs), hands the solve back to the caller (``finished`` False), which continues
  on the per-half-step path of ``scaling`` with its log-domain fallbacks.

Over-relaxation of the cross problem is ``overrelaxation``'s Young's omega, measured at checks
of every problem at iterations ``WINDOW / 2`` and ``WINDOW``, applied to the rows in scaling
form: s <- s' (s / s')^omega. ``run_laddered_scaling_loop`` (the Sinkhorn divergence's cross
problem) sends a start still far from the optimum after a short probe through coarser eps
first (``LADDER``).

References:
    Cuturi, "Sinkhorn distances", NeurIPS 2013 (the scaling iterations).
    Schmitzer, "Stabilized sparse scaling algorithms for entropy regularized transport
    problems", SIAM J. Sci. Comput. 2019 (absorption).
    Feydy, Sejourne, Vialard, Amari, Trouve, Peyre, "Interpolating between optimal transport
    and MMD using Sinkhorn divergences", AISTATS 2019 (the symmetric updates).
    Thibault, Chizat, Dossal, Papadakis, "Overrelaxed Sinkhorn-Knopp algorithm for regularized
    optimal transport", Algorithms 2021.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from otcore._arrays import as_arrays, as_tensors, log_range
from otcore._precision import flushed_subnormals
from otcore.core.loop import LoopOutcome
from otcore.solvers.entropic.overrelaxation import WINDOW, RelaxationFactor
from otcore.solvers.entropic.scaling import StabilisedKernel, stabilised_kernel

#: Longest stretch of iterations between two checks of a problem (a check costs about one
#: iteration of a 180 x 180 problem in host reads and small operations: ``CHECK_ENTRIES``) ...
MAX_INTERVAL = 64
#: ... and the longest while the problem has run fewer than 4 MAX_INTERVAL iterations: a
#: stretch is at most a quarter of the iterations run (or this), so a check past convergence
#: costs at most a quarter more iterations (or this many).
YOUNG_INTERVAL = 16
#: A check costs about as much host work (~100 us on a CPU) as 8 iterations of a kernel of
#: ``SMALL_ENTRIES`` = 64 x 64 entries or fewer (iterations there are mostly per-operation
#: overhead), or as one of ``CHECK_ENTRIES`` (see ``least_interval``).
CHECK_ENTRIES, SMALL_ENTRIES = 2**15, 2**12


def least_interval(n: int, m: int) -> int:
    """The fewest iterations between two checks of an (n, m) problem once its contraction is
    measured, unless it is predicted to converge sooner: what a check costs in its iterations,
    CHECK_ENTRIES // max(n m, SMALL_ENTRIES) (8 at 64 x 64, 2 at 128 x 128, 1 from 129 x 129 on;
    64-bin histograms to 1e-9: 8 checks instead of 11, about 25 % less time)."""
    return max(1, CHECK_ENTRIES // max(n * m, SMALL_ENTRIES))


#: A cross problem (``run_laddered_scaling_loop``, cold or warm-started) whose error is still above
#: 10 ``LADDER_TOL`` after ``LADDER_PROBE`` iterations at eps goes on at ``LADDER`` times eps (coarse
#: to fine, each to marginal error ``LADDER_TOL``, over-relaxed with its own omega) before it
#: finishes at eps: where the start is far from the optimum against a small eps, the potentials'
#: large-scale error contracts many times faster at a coarser eps. Taken when 0 < tol <
#: ``LADDER_TOL`` and max_iter >= 4 ``LADDER_PROBE``. Measured against the direct solve (Sinkhorn
#: divergence, float32): the README's training loop (500 points, Adam, lr 0.05, tol 1e-4) takes
#: 536 iterations per warm-started step instead of 998 at eps = 0.01, 841 instead of 1 932 at
#: eps = 0.005, 344 instead of 429 at eps = 0.02 (172 both at eps = 0.05); cold 3-D clouds at
#: GeomLoss's blur 0.05 (n = 500) 998 instead of the 2 000-iteration cap; 72 cold pairs of 300
#: points (blur 0.02 to 0.2, from nearly identical clouds to shifted ones) 45 800 iterations
#: instead of 54 000, none more than 10 % + 10 above the direct solve, up to 4.7x fewer. Unlike
#: ``eps_scaling`` (annealing from max|C|), nearly identical clouds, which meet tol or come
#: close within the probe, are left alone. (Plain iterations in the stages took 634, 1 051, 383,
#: 1 295 and 48 200 of these; a third stage, (8, 4, 2), 2 % to 10 % fewer cold but up to 6 %
#: more warm, and a kernel more to build.)
LADDER_PROBE, LADDER, LADDER_TOL = 50, (4.0, 2.0), 1e-3


class _Cross:
    """A balanced problem's iterate in scaling form: sums s (B, n), t (B, m) against K~, held
    with K~ and the weights as arrays of the module ``xp`` the iterations run on
    (``StabilisedKernel.xp``)."""

    def __init__(self, kernel: StabilisedKernel, a, b, f, g, factor: RelaxationFactor | None):
        self.kernel, self.factor, self.xp = kernel, factor, kernel.xp
        self.cold = False  # whether it ever started at the hard c-transforms
        self.positive = a > 0
        self.zero_weight = not bool(self.positive.all())
        self.a_, self.b_, self.positive_ = as_arrays(self.xp, a, b, self.positive)
        self.absorb(f, g)

    def absorb(self, f: torch.Tensor | None, g: torch.Tensor | None) -> None:
        """Rebuild K~ at (f, g) (None: ``StabilisedKernel.rebuild``'s hard c-transforms): the
        checked iterate becomes s = t = 1."""
        self.K, self.f0, self.g0 = self.kernel.rebuild(f, g)
        (self.K_,) = as_arrays(self.xp, self.K)
        self.s, self.t = self.xp.ones_like(self.K_[..., 0]), self.xp.ones_like(self.K_[..., 0, :])
        self.cold = self.cold or f is None

    def restart_cold(self) -> bool:
        """Start again at the hard c-transforms (``absorb(None, None)``), once; False if done.
        (The gauge (f + c, g - c) the solve ends at then depends on the batch: every problem of
        it restarts.)"""
        if self.cold:
            return False
        self.absorb(None, None)
        return True

    def run(self, count: int) -> tuple[torch.Tensor, float, float]:
        """``count`` iterations from the checked iterate: (error (B,) of the iterate one
        iteration back, and ``log_range`` of the sums the check tests)."""
        xp, K, a, b, s, t = self.xp, self.K_, self.a_, self.b_, self.s, self.t
        (omega,) = as_arrays(xp, None if self.factor is None else self.factor.omega)
        positive = self.positive_ if self.zero_weight else None
        with np.errstate(all="ignore"):  # a sum that under- or overflows is the check's to find
            for _ in range(count):  # nothing but these four operations (five with omega)
                s_prev, t_prev = s, t
                plain = (K @ (b / t)[..., None])[..., 0]
                s = plain if omega is None else _relaxed(xp, s_prev, plain, omega, positive)
                t = ((a / s)[..., None, :] @ K)[..., 0, :]
            error = (a * abs(plain / s_prev - 1)).sum(-1)
            worst_log, smallest = log_range(xp, plain, s, t)
        self.new, self.measured, self.plain = (s, t), (s_prev, t_prev), plain
        return as_tensors(error)[0], worst_log, smallest

    def commit(self) -> None:
        self.s, self.t = self.new

    def potentials(self) -> tuple[torch.Tensor, ...]:
        """The checked iterate (f, g)."""
        return self._potentials(self.s, self.t)

    def measured_potentials(self) -> tuple[torch.Tensor, ...]:
        """The iterate the last error is of; zero-weight rows take their c-transform of its g."""
        s, t = self.measured
        if self.zero_weight:
            s = self.xp.where(self.positive_, s, self.plain)
        return self._potentials(s, t)

    def _potentials(self, s, t) -> tuple[torch.Tensor, ...]:
        eps = self.kernel.eps
        s, t = as_tensors(s, t)
        return torch.add(self.f0, s.log(), alpha=-eps), torch.add(self.g0, t.log(), alpha=-eps)


class _Symmetric:
    """A symmetric problem's potential p = p0 - eps log r (B, n) against K~ built at (p0, p0),
    r held as ``_Cross`` holds its sums."""

    factor = None

    def __init__(self, kernel: StabilisedKernel, w, p):
        self.kernel, self.xp = kernel, kernel.xp
        self.positive = w > 0
        self.zero_weight = not bool(self.positive.all())
        self.w_, self.positive_ = as_arrays(self.xp, w, self.positive)
        self.absorb(p)

    def restart_cold(self) -> bool:
        """No other start to try (see ``_Cross.restart_cold``)."""
        return False

    def absorb(self, p: torch.Tensor) -> None:
        self.K, self.p0, _ = self.kernel.rebuild(p, p)
        (self.K_,) = as_arrays(self.xp, self.K)
        self.r = self.xp.ones_like(self.K_[..., 0])

    def run(self, count: int) -> tuple[torch.Tensor, float, float]:
        xp, K, w, r, positive = self.xp, self.K_, self.w_, self.r, self.positive_
        with np.errstate(all="ignore"):  # as in ``_Cross.run``
            for _ in range(count):
                r_prev = r
                update = (K @ (w / r)[..., None])[..., 0]
                r = (r * update) ** 0.5
                if self.zero_weight:  # zero-weight points take the c-transform, not the average
                    r = xp.where(positive, r, update)
            error = 2 * (w * abs(update / r_prev - 1)).sum(-1)  # |P1 - w|_1 + |P^T 1 - w|_1
            worst_log, smallest = log_range(xp, update, r)
        self.new, self.measured, self.plain = r, r_prev, update
        return as_tensors(error)[0], worst_log, smallest

    def commit(self) -> None:
        self.r = self.new

    def potentials(self) -> tuple[torch.Tensor, ...]:
        return (self._potential(self.r),)

    def measured_potentials(self) -> tuple[torch.Tensor, ...]:
        r = self.xp.where(self.positive_, self.measured, self.plain) if self.zero_weight else self.measured
        return (self._potential(r),)

    def _potential(self, r) -> torch.Tensor:
        return torch.add(self.p0, as_tensors(r)[0].log(), alpha=-self.kernel.eps)


def run_scaling_loop(
    kernel: StabilisedKernel, a: torch.Tensor, b: torch.Tensor, f: torch.Tensor, g: torch.Tensor, *,
    max_iter: int, tol: float, factor: RelaxationFactor | None = None,
) -> tuple[LoopOutcome, bool]:
    """Balanced Sinkhorn iterations at ``kernel.eps`` from (f, g): ``(outcome, finished)``.

    Args:
        kernel: a ``StabilisedKernel`` of a geometry held by this process; K~ is rebuilt here.
        a, b: (B, n), (B, m) weights of equal masses.
        f, g: (B, n), (B, m) starting potentials (g need not be the c-transform of f: the first
            iteration's error is not measured).
        max_iter, tol: as in ``fixed_point_loop`` (tol = 0: exactly ``max_iter`` iterations).
        factor: the over-relaxation's omega (``overrelaxation.RelaxationFactor``, fed the errors
            measured here at the iterations they belong to), or None for plain iterations.

    Returns:
        The outcome as ``fixed_point_loop``'s (``state`` = (f, g); ``n_iter`` counts the
        iterations up to the iterate returned). ``finished`` False: handed back early (see the
        module docstring); the state is then the last checked iterate (converged problems
        keep theirs) and ``n_iter`` the iterations it took.
    """
    return _drive(_Cross(kernel, a, b, f, g, factor), (f, g), max_iter=max_iter, tol=tol, first_check=2)


def run_laddered_scaling_loop(
    kernel: StabilisedKernel, a: torch.Tensor, b: torch.Tensor, f: torch.Tensor, g: torch.Tensor, *,
    max_iter: int, tol: float, factor: RelaxationFactor | None = None,
) -> tuple[LoopOutcome, bool]:
    """``run_scaling_loop`` (same arguments and outcome) with the ``LADDER`` for starts far from
    the optimum, each problem of the batch on its own: ``LADDER_PROBE`` iterations at
    ``kernel.eps``; a problem that met ``tol`` there keeps that result. Those still far (error
    above 10 ``LADDER_TOL``) go on from a solve of the batch at each ``LADDER`` multiple of eps to
    ``LADDER_TOL`` (over-relaxed like the solve at eps, when ``factor`` is given, with an omega
    measured in the stage; each stage at most half the iterations left; a stage whose kernel is
    unavailable is skipped) and have their over-relaxation measured afresh
    (``RelaxationFactor.restart``); then every unfinished problem is solved at eps. ``n_iter``
    counts each problem's own stages, within ``max_iter``. Outside 0 < tol < ``LADDER_TOL`` and
    max_iter >= 4 ``LADDER_PROBE``: ``run_scaling_loop`` itself."""
    if not (0 < tol < LADDER_TOL and max_iter >= 4 * LADDER_PROBE):
        return run_scaling_loop(kernel, a, b, f, g, max_iter=max_iter, tol=tol, factor=factor)
    probe, finished = run_scaling_loop(kernel, a, b, f, g, max_iter=LADDER_PROBE, tol=tol, factor=factor)
    if not finished or bool(probe.converged.all()):
        return probe, finished
    done, far = probe.converged, ~probe.converged & (probe.error > 10 * LADDER_TOL)
    state, spent = probe.state, probe.n_iter
    if bool(far.any()):
        kernel.kernel = None  # freed while the coarse kernels are built (the stage at eps rebuilds it)
        laddered = state
        for ratio in LADDER:
            coarse = stabilised_kernel(kernel.geom, kernel.eps * ratio, "auto")
            budget = (max_iter - int(spent.max())) // 2
            if coarse is not None and budget > 0:
                stage, _ = run_scaling_loop(coarse, a, b, *laddered, max_iter=budget, tol=LADDER_TOL,
                                            factor=None if factor is None else RelaxationFactor())
                laddered, spent = stage.state, torch.where(far, spent + stage.n_iter, spent)
        state = tuple(torch.where(far.unsqueeze(-1), new, old) for new, old in zip(laddered, state, strict=True))
        if factor is not None:
            factor.restart(far)
    final, finished = run_scaling_loop(kernel, a, b, *state, max_iter=max_iter - int(spent.max()), tol=tol,
                                       factor=factor)
    keep = done.unsqueeze(-1)
    return LoopOutcome(
        state=tuple(torch.where(keep, old, new) for old, new in zip(probe.state, final.state, strict=True)),
        n_iter=torch.where(done, probe.n_iter, spent + final.n_iter), converged=done | final.converged,
        failed=final.failed & ~done, error=torch.where(done, probe.error, final.error)), finished


def run_symmetric_scaling_loop(
    kernel: StabilisedKernel, w: torch.Tensor, p: torch.Tensor, *, max_iter: int, tol: float,
) -> tuple[LoopOutcome, bool]:
    """The self-transport potential p = softmin(C, p; w) of a symmetric balanced problem
    (C = C^T, both marginals w (B, n)) by averaged updates from p (B, n): ``(outcome,
    finished)`` as ``run_scaling_loop``, ``state`` = (p,). The error is that of the plan of p,
    |P1 - w|_1 + |P^T 1 - w|_1, measured from the first iteration on."""
    return _drive(_Symmetric(kernel, w, p), (p,), max_iter=max_iter, tol=tol, first_check=1)


def _drive(problem, start: tuple[torch.Tensor, ...], *, max_iter: int, tol: float,
           first_check: int) -> tuple[LoopOutcome, bool]:
    """The iterations and checks of the module docstring for ``_Cross`` or ``_Symmetric``, with
    subnormal arithmetic flushed (``flushed_subnormals``)."""
    with flushed_subnormals():
        return _iterate(problem, start, max_iter=max_iter, tol=tol, first_check=first_check)


def _iterate(problem, start: tuple[torch.Tensor, ...], *, max_iter: int, tol: float,
             first_check: int) -> tuple[LoopOutcome, bool]:
    kernel, factor = problem.kernel, problem.factor
    ref = start[0]
    B, device = ref.shape[0], ref.device
    out = tuple(t.clone() for t in start)
    # per-problem flags, counts and errors (B,) on the host, in NumPy: a check reads the errors
    # there anyway, and a few NumPy operations on B numbers cost less than tensor operations
    active, converged = np.ones(B, dtype=bool), np.zeros(B, dtype=bool)
    n_iter, error = np.zeros(B, dtype=np.int64), np.full(B, math.inf)
    schedule = _Schedule(B, first_check, marks=(WINDOW // 2, WINDOW) if factor else (),
                         least=least_interval(*problem.K.shape[-2:]))
    at, built, careful, safe = 0, 0, False, first_check  # checked iteration, K~'s, rolling back, iterations safe ahead

    def tensor(array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.from_numpy(array).to(device=device, dtype=dtype)

    def outcome(state: tuple[torch.Tensor, ...], n_iter: np.ndarray, converged: np.ndarray) -> LoopOutcome:
        return LoopOutcome(state, tensor(n_iter), tensor(converged), torch.zeros(B, dtype=torch.bool, device=device),
                           tensor(error, ref.dtype))

    def handed_back() -> LoopOutcome:  # the running problems' last checked iterate, the others' results
        keep = tensor(active).unsqueeze(-1)
        state = tuple(torch.where(keep, t, o) for t, o in zip(problem.potentials(), out, strict=True))
        return outcome(state, np.where(active, at, n_iter), converged)

    while at < max_iter:
        stop = min(max_iter, at + safe, schedule.next_due(at, active))
        kernel.half_steps += 2 * (stop - at)
        new_error, worst_log, smallest = problem.run(stop - at)
        if not math.isfinite(worst_log) or smallest < kernel.full_precision:
            if careful and at == 0 and problem.restart_cold():  # a warm start too far off: from scratch
                continue
            if careful:  # one iteration from a checked iterate fails too: the log domain's turn
                return handed_back(), False
            careful, safe = True, 1  # repeat the stretch one iteration per check
            continue
        careful = False
        due = schedule.due(stop, active, max_iter)
        if due.any():
            error = np.where(due, _host(new_error), error)
            if factor is not None:
                # no float32 guard: these iterations round the sums (relative size 1), not potentials of
                # size |f| / eps, so relaxing does not amplify a rounding floor of u |f| / eps
                factor.observe(stop, tensor(error, ref.dtype), problem.measured_potentials, guarded=False)
            done = due & (error <= tol) if tol > 0 else np.zeros(B, dtype=bool)
            if done.any():
                keep = tensor(done).unsqueeze(-1)
                out = tuple(torch.where(keep, t, o) for t, o in zip(problem.measured_potentials(), out, strict=True))
                n_iter = np.where(done, stop - 1, n_iter)
                converged, active = converged | done, active & ~done
                if not active.any():
                    return outcome(out, n_iter, converged), True
            schedule.measured(stop, due & ~done, error, tol)
        problem.commit()
        at = stop
        drift = worst_log / max(at - built, 1)  # of the scalings' logarithms, per iteration
        room = kernel.threshold - worst_log
        if room < 0:  # absorb before the scalings leave the safe range
            problem.absorb(*problem.potentials())
            built, room = at, kernel.threshold
            if kernel.absorbing_too_often():  # eps small against the costs: the log domain's turn
                return handed_back(), False
        safe = max(1, int(room / drift)) if drift > 0 else MAX_INTERVAL
    if tol == 0:
        converged = np.ones(B, dtype=bool)
    return handed_back(), True


class _Schedule:
    """Per problem, the iterations at which its error is measured (see the module docstring).

    Kept on the host (NumPy, float64): a check reads the errors there anyway, and a handful of
    NumPy operations on B numbers costs less than the tensor operations would."""

    def __init__(self, B: int, first: int, marks: tuple[int, ...], least: int = 1):
        self.next = np.full(B, first, dtype=np.int64)
        self.interval = np.ones(B, dtype=np.int64)
        self.last_error = np.full(B, math.inf)
        self.last_check = np.zeros(B, dtype=np.int64)
        self.marks = marks  # iterations at which every problem is measured
        self.first = first  # the first iteration whose error means something
        self.least = least  # the shortest interval, unless convergence is predicted sooner

    def next_due(self, it: int, active: np.ndarray) -> int:
        """The next iteration after ``it`` at which some ``active`` ((B,) bool) problem is measured."""
        soonest = int(self.next[active].min()) if active.any() else it + 1
        return min([soonest, *(mark for mark in self.marks if mark > it)])

    def due(self, it: int, active: np.ndarray, max_iter: int) -> np.ndarray:
        """(B,) the active problems measured at iteration ``it`` (all at a mark and at the last)."""
        if (it in self.marks or it == max_iter) and it >= self.first:
            return active
        return active & (self.next == it)

    def measured(self, it: int, chosen: np.ndarray, err: np.ndarray, tol: float) -> None:
        """Plan the next checks of the problems just ``measured`` (and still running): the next
        iteration after a problem's first error (its contraction), then double the interval (up
        to ``MAX_INTERVAL``, and up to max(``YOUNG_INTERVAL``, it / 4); at least ``least``), but
        no further than the predicted convergence, from the contraction (error / last
        error)^(1 / iterations between them). ``chosen``: (B,) bool, the problems measured;
        ``err``: (B,) float64, their errors."""
        interval = np.maximum(np.minimum(2 * self.interval, min(MAX_INTERVAL, max(YOUNG_INTERVAL, it // 4))), self.least)
        if tol > 0:
            with np.errstate(all="ignore"):
                theta = (err / self.last_error) ** (1.0 / np.maximum(it - self.last_check, 1))
                remaining = np.log(tol / err) / np.log(theta)
            contracting = (theta < 1) & (err > tol) & np.isfinite(remaining)  # (nan_to_num costs 30 us)
            predicted = np.where(contracting, remaining, MAX_INTERVAL)
            interval = np.minimum(interval, np.maximum(np.ceil(predicted), 1).astype(np.int64))
        interval = np.where(self.last_check > 0, interval, 1)  # a first error: its contraction next
        self.interval = np.where(chosen, interval, self.interval)
        self.next = np.where(chosen, it + self.interval, self.next)
        self.last_error = np.where(chosen, err, self.last_error)
        self.last_check = np.where(chosen, it, self.last_check)


def _host(t: torch.Tensor) -> np.ndarray:
    """A (B,) tensor's values on the host."""
    return t.detach().cpu().numpy()


def _relaxed(xp, s_prev, s, omega, positive):
    """Over-relaxed row sums s' (s / s')^omega (f + omega (f_new - f) in potentials); rows of
    zero weight (``positive`` False) keep the plain update. Arrays of the module ``xp``."""
    relaxed = s_prev * (s / s_prev) ** omega
    return relaxed if positive is None else xp.where(positive, relaxed, s)
