"""Newton steps on the entropic OT dual with the exact Hessian, solved directly (small problems).

In units of eps (phi = f / eps, psi = g / eps, K_ij = log a_i + log b_j - C_ij / eps), the dual
D(phi, psi) / eps = <a, phi> + <b, psi> - sum_ij exp(K_ij + phi_i + psi_j) has gradient
(a - r, b - c) (r, c: the plan's row and column sums) and negative Hessian

    H = [[diag(r), P], [P^T, diag(c)]]      (PSD, null vector (1, -1)).

A step solves (H + lam I) d = grad: eliminating the first block (the larger side: the problem is
transposed when n < m) leaves the Schur complement S = diag(c + lam) - P^T diag(r + lam)^-1 P,
(m, m), factored by Cholesky. The gauge (S 1 = 0 at lam = 0) is fixed by adding b b^T / |b|_1,
which leaves the solution of S x = rhs unchanged when rhs is orthogonal to 1 (it is at lam = 0)
and picks <b, x> = 0. The shift lam = mu |grad|_2 starts tiny (a plain Newton step) and mu
adapts to the ratio of actual to predicted increase as in ``sns``; a failed factorisation (S
singular to working precision: a near-permutation plan) counts as a rejected step. The step
length is the first of t, t/2, ..., t/128 that increases D, from t = min(1, twice the last step). Problems of a batch are solved one
after the other, their scalars (step, shift, ratio) on the host: an iteration is about thirty
kernels on (n, m) tensors and no bookkeeping; O(n m min(n, m)) work, so ``sns`` uses it for
small problems only.

References:
    Tang, Qiu, "Safe and sparse Newton method for entropic-regularized optimal transport",
    NeurIPS 2024 (shift and its adaptation).
    Brauer, Clason, Lorenz, Wirth, "A Sinkhorn-Newton method for entropic optimal transport",
    arXiv:1710.06635, 2017 (Newton on the dual, Schur complement).
"""

from __future__ import annotations

import math

import torch

HALVINGS = 8
RHO_LOW, RHO_HIGH, MU_UP, MU_DOWN, MU_MIN = 0.25, 0.75, 4.0, 0.5, 1e-6


def direct_newton(C, a, b, f, g, eps, *, tol, max_iter):
    """Maximise the balanced entropic dual from (f, g) by direct Newton steps, problem by problem.

    Args:
        C: (B, n, m) cost matrix (no gradient needed).
        a: (B, n) weights, >= 0.
        b: (B, m) weights, >= 0, the masses of ``a`` per problem.
        f: (B, n) starting potential (a Sinkhorn warm start).
        g: (B, m) starting potential (a Sinkhorn warm start).
        eps: entropic regularisation.
        tol: stop a problem when |P1 - a|_1 + |P^T 1 - b|_1 <= tol (0: never).
        max_iter: Newton iterations at most.

    Returns:
        (f, g, error (B,), iterations per problem (B,) int64), in the dtype and device of C.
    """
    transpose = a.shape[-1] < b.shape[-1]
    if transpose:  # eliminate the larger block: the Schur complement is min(n, m) square
        C, a, b, f, g = C.mT, b, a, g, f
    out = [_solve(C[k], a[k], b[k], f[k], g[k], eps, tol, max_iter) for k in range(C.shape[0])]
    f, g = torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])
    error = torch.tensor([o[2] for o in out], dtype=C.dtype, device=C.device)
    n_iter = torch.tensor([o[3] for o in out], dtype=torch.int64, device=C.device)
    return (g, f, error, n_iter) if transpose else (f, g, error, n_iter)


class _Point:
    """Scaled potentials (phi, psi) with the plan, its marginals' residuals, the dual value / eps
    and the L1 marginal error (host floats)."""

    def __init__(self, logK, a, b, phi, psi):
        self.phi, self.psi = phi, psi
        self.P = torch.add(logK, phi.unsqueeze(-1)).add_(psi).exp_()
        self.r = self.P.sum(-1)
        self.ga, self.gb = a - self.r, b - self.P.sum(-2)
        self.value = float(a.dot(phi) + b.dot(psi) - self.r.sum())
        self.error = float(self.ga.abs().sum() + self.gb.abs().sum())


def _solve(C, a, b, f, g, eps, tol, max_iter):
    """One problem, (n, m) with n >= m: (f, g, error, iterations)."""
    logK = torch.add(a.log().unsqueeze(-1), b.log()).sub_(C, alpha=1 / eps)
    mass = b.sum()
    gauge = torch.outer(b, b / mass).diagonal_scatter(b * b / mass + (b == 0).to(b.dtype))
    point = _Point(logK, a, b, f / eps, g / eps)
    mu, ulp, n_iter, last = MU_MIN, torch.finfo(C.dtype).eps, 0, 1.0
    while n_iter < max_iter and point.error > tol and math.isfinite(point.error):
        n_iter += 1
        P, ga, gb = point.P, point.ga, point.gb
        lam = mu * float(ga.dot(ga) + gb.dot(gb)) ** 0.5
        D = point.r + lam
        D = torch.where(D > 0, D, 1.0)  # an empty row (zero weight, or underflow at lam = 0)
        W = P / D.unsqueeze(-1)
        S = torch.addmm(gauge, W.mT, P, alpha=-1)
        S.diagonal().add_(b - gb + lam)  # diag(c + lam)
        L, info = torch.linalg.cholesky_ex(S)
        if int(info):  # S singular to working precision: shift more
            mu *= MU_UP
            continue
        x = torch.cholesky_solve(torch.addmv(gb, W.mT, ga, alpha=-1).unsqueeze(-1), L).squeeze(-1)
        y = torch.addmv(ga, P, x, alpha=-1).div_(D)
        slope = float(ga.dot(y) + gb.dot(x))
        # d^T (H + lam I) d: the system solved adds the gauge term (b^T x)^2 / |b|_1
        curvature = slope - float(b.dot(x)) ** 2 / float(mass)
        noise = 64 * ulp * (abs(point.value) + 1)
        step, trial = min(1.0, 2 * last), None
        for _ in range(HALVINGS):
            trial = _Point(logK, a, b, point.phi + step * y, point.psi + step * x)
            # near the optimum D changes below its rounding noise: then the marginal error decides
            if math.isfinite(trial.value) and (trial.value > point.value + noise or (
                    trial.value >= point.value - noise and trial.error < point.error)):
                break
            step /= 2
        else:
            mu *= MU_UP
            continue
        predicted = step * slope - 0.5 * step**2 * curvature
        ratio = (trial.value - point.value) / predicted if predicted > noise else 1.0
        mu = mu * MU_UP if ratio < RHO_LOW else max(mu * MU_DOWN, MU_MIN) if ratio > RHO_HIGH else mu
        point, last = trial, step
    return point.phi * eps, point.psi * eps, point.error, n_iter
