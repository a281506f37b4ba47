"""Adaptive over-relaxation of the Sinkhorn row update, with exact column updates.

One iteration becomes

    f <- f + omega (tau_a softmin(g) - f)        (omega = 1: plain Sinkhorn)
    g <- tau_b softmin(f)

Where Sinkhorn converges slowly (small eps against the costs, measures that nearly coincide),
its error contracts linearly by a factor theta close to 1 per iteration; over-relaxing with
omega = 2 / (1 + sqrt(1 - theta)) (Young's optimal successive over-relaxation factor) shortens
that tail several times. theta is measured on the first ``WINDOW`` iterations at the target eps,
which run plain, per problem of the batch and without host reads; omega is capped at ``CAP``,
and halved back towards 1 for a problem whose error climbs beyond ``BLOWUP`` times its best.
Over-relaxation also amplifies rounding noise near the fixed point (by up to 1 / (2 - omega)):
a problem whose plan exponents are rounded by more than ``QUIET`` times the tolerance (float32
potentials large against eps) stays plain.

Balanced problems only (the solvers decide): near balance an unbalanced problem's residual
bounds its value less tightly along the translation (f + c, g - c), and relaxed iterates would
stop at another point of that direction than plain ones. Only the rows are relaxed: g stays the exact c-transform of f, so the column marginals stay exact
and the row error that the loop tests is still the iterate's whole marginal error. Stopping,
certification and the fixed point are those of plain Sinkhorn; only the path to them changes.

References:
    Thibault, Chizat, Dossal, Papadakis, "Overrelaxed Sinkhorn-Knopp algorithm for regularized
    optimal transport", Algorithms 2021.
    Lehmann, von Renesse, Sambale, Uschmajew, "A note on overrelaxation in the Sinkhorn
    algorithm", Optimization Letters 2022 (omega from the contraction factor).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: Plain iterations at the target eps before omega is set; theta is measured on the second half.
WINDOW = 20
#: Largest omega (2 is the edge of convergence).
CAP = 1.9
#: An error this many times a problem's best so far halves omega - 1 for that problem.
BLOWUP = 100.0
#: Relax only problems whose rounding floor u (|f| + |g|) / eps is below this fraction of tol.
QUIET = 1e-2


class RelaxationFactor:
    """Young's omega for a batch of B problems, from the marginal errors observed at the eps of
    the iterations it relaxes (the target eps; a stage of ``scaling_loop``'s coarse-eps ladder has
    one of its own): plain (None) until iteration ``WINDOW``, then per problem, backed off on a
    blow-up."""

    def __init__(self, rounding: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 tol: float = 0.0):
        """``rounding``: (f, g) -> (B,) rounding floor of the marginal error
        (``dual.rounding_error``), compared with ``tol`` (0: no limit)."""
        self.rounding, self.tol = rounding, tol
        self.early: torch.Tensor | None = None  # (B,) error at WINDOW / 2
        self.best: torch.Tensor | None = None  # (B,) smallest error since omega was set
        self.omega: torch.Tensor | None = None  # (B, 1) once measured
        self.pending: torch.Tensor | None = None  # (B,) problems measured at the next marks (None: all)

    def restart(self, mask: torch.Tensor) -> None:
        """The (B,) ``mask``ed problems start again from other iterates: they run plain and have
        omega measured afresh at the next ``WINDOW // 2`` and ``WINDOW`` iterations (counted
        from their new start); the others keep theirs. Nothing to do before the first measure."""
        if self.pending is None:
            return
        if self.omega is not None:
            self.omega = torch.where(mask.unsqueeze(-1), 1.0, self.omega)
        self.pending = mask.clone()

    def observe(self, iteration: int, error: torch.Tensor,
                potentials: Callable[[], tuple[torch.Tensor, torch.Tensor]], *, guarded: bool = True) -> None:
        """Record the (B,) error of the iterate reached after ``iteration - 1`` iterations at the
        target eps (the errors at iterations ``WINDOW // 2`` and ``WINDOW`` set omega; later ones
        back it off). ``potentials``: that iterate's (f, g), asked for once (the float32 guard).
        ``guarded=False``: no guard, for iterations whose rounding does not grow with |f| / eps
        (``scaling_loop``'s, on sums of relative size 1)."""
        error = error.detach()
        with torch.no_grad():
            # at the two marks only (a host read): whether any problem is measured there
            measuring = iteration in (WINDOW // 2, WINDOW) and (self.pending is None or bool(self.pending.any()))
            if measuring and iteration == WINDOW // 2:
                self.early = error.clone()
            elif measuring and self.early is not None:
                theta = torch.nan_to_num((error / self.early) ** (1.0 / (WINDOW - WINDOW // 2)), nan=0.0)
                theta = torch.where(theta < 1, theta, 0.0)  # not contracting yet: stay plain
                if guarded and self.rounding is not None and self.tol > 0:
                    theta = torch.where(self.rounding(*potentials()) <= QUIET * self.tol, theta, 0.0)
                omega = (2 / (1 + torch.sqrt(1 - theta))).clamp(max=CAP).unsqueeze(-1)
                if self.pending is None:
                    self.omega, self.best = omega, error.clone()
                else:  # restarted problems only (``restart``)
                    kept = torch.ones_like(omega) if self.omega is None else self.omega
                    self.omega = torch.where(self.pending.unsqueeze(-1), omega, kept)
                    self.best = error.clone() if self.best is None else torch.where(self.pending, error, self.best)
                self.pending = torch.zeros_like(error, dtype=torch.bool)
                if error.device.type == "cpu" and bool((self.omega == 1).all()):
                    self.omega = None  # nothing to relax: plain updates, without the relaxation's operations
            elif iteration > WINDOW and self.omega is not None and self.best is not None:
                self.best = torch.minimum(self.best, error)
                climbing = (error > BLOWUP * self.best).unsqueeze(-1)
                self.omega = torch.where(climbing, 1 + (self.omega - 1) / 2, self.omega)


class Overrelaxation:
    """The relaxation of one solve's row updates in log potentials (a batch of B problems)."""

    def __init__(self, positive: torch.Tensor | None = None,
                 rounding: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, tol: float = 0.0):
        """``positive``: (B, n) mask of the rows of positive weight, when some are 0; the rows of
        zero weight, which no other point sees, then take the plain update (their exact
        c-transform, as the solvers return them). ``rounding``, ``tol``: as in
        ``RelaxationFactor``."""
        self.positive = positive
        self.factor = RelaxationFactor(rounding, tol)
        self.observed = 0

    def relax(self, f: torch.Tensor, f_new: torch.Tensor) -> torch.Tensor:
        """The next row potential (B, n): ``f_new`` (a plain update) until omega is set."""
        omega = self.factor.omega
        if omega is None:
            return f_new
        relaxed = torch.addcmul(f, omega, f_new - f)
        return relaxed if self.positive is None else torch.where(self.positive, relaxed, f_new)

    def observe(self, error: torch.Tensor, f: torch.Tensor, g: torch.Tensor) -> None:
        """Record the (B,) marginal error of the iterate (f, g) at the target eps (one per
        iteration)."""
        self.observed += 1
        self.factor.observe(self.observed, error, lambda: (f, g))
