"""Sinkhorn-Newton on the entropic OT dual with the exact Hessian, solved directly (small problems).

In units of eps (phi = f / eps, psi = g / eps, K_ij = log a_i + log b_j - C_ij / eps), the dual
D(phi, psi) / eps = <a, phi> + <b, psi> - sum_ij exp(K_ij + phi_i + psi_j) has gradient
(a - r, b - c) (r, c: the plan's row and column sums) and negative Hessian

    H = [[diag(r), P], [P^T, diag(c)]]      (PSD, null vector (1, -1)).

A Newton step solves (H + lam I) d = grad: eliminating the block of the larger side (the rows
when n >= m) leaves the Schur complement S = diag(c + lam) - P^T diag(r + lam)^-1 P, (m, m)
(rows and columns swap roles when n < m), factored by Cholesky. The gauge (S 1 = 0 at lam = 0)
is fixed by adding b b^T / |b|_1, which leaves the solution of S x = rhs unchanged when rhs is
orthogonal to 1 (it is at lam = 0) and picks <b, x> = 0. The shift lam = mu |grad|_2 starts
tiny (a plain Newton step) and mu adapts to the ratio of actual to predicted increase as in
``sns``; a failed factorisation (S singular to working precision: a near-permutation plan)
counts as a rejected step. The step length is the first of t, t/2, ..., t/2^9 that increases D,
from the t <= 1 that changes no entry of log P by more than ``STEP_REACH``.

Sinkhorn iterations (exact maximisation over phi, then over psi) do the rest: ``sinkhorn_iter``
of them warm-start the solve, and every Newton iteration ends with
ceil(min(n, m) / ``SWEEP_COLUMNS``) more, which cost O(n m) against the step's O(n m min(n, m))
and save Newton iterations where the plan spans a wide range (small eps: up to three times
fewer on the benchmark suite). Between exponentials, P moves by scalings: a Sinkhorn iteration
is two matrix-vector products (u = a / (P v), v = b / (P^T u)), a trial step d = (y, x)
multiplies P_ij by exp(t y_i + t x_j). The scalings applied since P was computed (its drift)
stay below ``THRESHOLDS`` (Schmitzer's absorption: an entry lost to underflow weighs nothing
until then): a trial step beyond it computes its plan, a Sinkhorn iteration beyond it is redone
in the log domain, and convergence is judged on a computed plan. Exponentials are taken of
arguments clamped at 1 + log(tiny) (tiny: the dtype's smallest normal number): a result at or
below tiny takes a slow path of the exponential, 5 to 35 times slower (float64, float32) on a
CPU.

Problems of a batch are solved one after the other, their scalars (step, shift, ratio, value,
error) on the host: a Newton iteration is about thirty kernels, a trial step and a Sinkhorn
iteration about twelve each; O(n m min(n, m)) work, so ``sns`` uses it for small problems only.
On a CPU, problems within ``NUMPY_MAX_WORK`` run on NumPy arrays (``otcore._arrays``): their
operations are overhead-bound, and NumPy's dispatch costs a fraction of torch's (64-bin
histograms: 1.1 to 1.6 times faster).

References:
    Tang, Qiu, "Safe and sparse Newton method for entropic-regularized optimal transport",
    NeurIPS 2024 (shift and its adaptation).
    Brauer, Clason, Lorenz, Wirth, "A Sinkhorn-Newton method for entropic optimal transport",
    arXiv:1710.06635, 2017 (Newton on the dual, Schur complement).
    Schmitzer, "Stabilized sparse scaling algorithms for entropy regularized transport
    problems", SIAM J. Sci. Comput. 2019 (scalings absorbed into the potentials).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import torch

from otcore._arrays import as_arrays, as_tensors, host_floats, log_range
from otcore._precision import exp_above_tiny_, flushed_subnormals
from otcore.solvers.entropic.scaling import THRESHOLDS

HALVINGS = 10
#: The first trial step t has t |d_i + d_j| <= STEP_REACH for all i, j (tuned on the benchmark suite).
STEP_REACH = 48.0
RHO_LOW, RHO_HIGH, MU_UP, MU_DOWN, MU_MIN = 0.25, 0.75, 4.0, 0.5, 1e-6
#: Every Newton iteration ends with ceil(min(n, m) / SWEEP_COLUMNS) Sinkhorn iterations.
SWEEP_COLUMNS = 64
#: Largest Schur complement product, k^2 n_e multiply-adds (k = min(n, m), n_e = max(n, m)), of a
#: CPU problem solved on NumPy, its Schur complement factored through SciPy's LAPACK (larger
#: ones: torch). Beyond about 100^3 OpenBLAS runs the product on several threads, which keep
#: spinning after it and slow torch's own (measured: a 128 x 128 solve 2-4 ms with torch alone,
#: 24-43 ms with both; 500 x 64, 8.4 ms against 4.3 ms).
NUMPY_MAX_WORK = 2**19


def direct_newton(C, a, b, eps, *, tol, max_iter, sinkhorn_iter):
    """Maximise the balanced entropic dual by Sinkhorn warm-up then Sinkhorn-Newton iterations,
    problem by problem.

    Args:
        C: (B, n, m) cost matrix (no gradient needed).
        a: (B, n) weights, >= 0.
        b: (B, m) weights, >= 0, the masses of ``a`` per problem.
        eps: entropic regularisation.
        tol: stop a problem when |P1 - a|_1 + |P^T 1 - b|_1 <= tol (0: never).
        max_iter: warm-up Sinkhorn and Newton iterations together, at most.
        sinkhorn_iter: warm-up Sinkhorn iterations (1 to ``max_iter``), fewer if tol is met.

    Returns:
        (f (B, n), g (B, m), error (B,), warm-up iterations (B,) int64, Newton iterations (B,)
        int64), in the dtype and device of C.
    """
    B, n, m = C.shape
    eps = float(eps)
    xp = np if C.device.type == "cpu" and min(n, m) ** 2 * max(n, m) <= NUMPY_MAX_WORK else torch
    threshold = THRESHOLDS.get(C.dtype, THRESHOLDS[torch.float32])
    # inference mode: less dispatch work per kernel (the outputs are rebuilt outside it); products of
    # plan entries near tiny are flushed (``flushed_subnormals``); sums that under- or overflow are
    # the solver's to find
    with torch.inference_mode(), flushed_subnormals(), np.errstate(all="ignore"):
        out = [_Solver(xp, *as_arrays(xp, C[k], a[k], b[k]), eps, threshold).solve(tol, max_iter, sinkhorn_iter)
               for k in range(B)]
    z = torch.stack(as_tensors(*(o[0] for o in out))) * eps
    offset = torch.tensor([o[4] for o in out], dtype=C.dtype, device=C.device).unsqueeze(-1)
    error = torch.tensor([o[1] for o in out], dtype=C.dtype, device=C.device)
    n_sinkhorn, n_newton = (torch.tensor([o[k] for o in out], dtype=torch.int64, device=C.device) for k in (2, 3))
    return z[:, :n] + offset, z[:, n:], error, n_sinkhorn, n_newton


class _Point:
    """Scaled potentials z = (phi, psi) (n + m,) with the plan P (n, m), its marginals
    rc = (P1, P^T 1), the gradient ab - rc, and as host floats (one read) the dual value / eps
    (up to a constant), the L1 marginal error and the gradient's 2-norm. ``drift``: the
    scalings applied to P since it was computed from z (0: computed, which ``P=None`` asks for)."""

    __slots__ = ("P", "drift", "error", "grad", "grad_norm", "rc", "value", "z")

    def __init__(self, solver, z, P=None, drift=0.0):
        if P is None:
            P, drift = solver.plan(z), 0.0
        self.z, self.P, self.drift = z, P, drift
        rows = P.sum(-1)
        self.rc = solver.xp.concatenate((rows, P.sum(-2)))
        self.grad = solver.ab - self.rc
        self.value, self.error, self.grad_norm = host_floats(
            solver.ab @ z - rows.sum(), abs(self.grad).sum(), solver.xp.sqrt(self.grad @ self.grad))


class _Trial:
    """A trial point of the line search: z, its plan P (``drift`` as in ``_Point``), the row sums
    P1 and the dual value / eps (a host float); its marginal error on demand."""

    __slots__ = ("P", "drift", "rows", "value", "z")

    def __init__(self, solver, z, P, drift):
        self.z, self.P, self.drift = z, P, drift
        self.rows = P.sum(-1)
        self.value = float(solver.ab @ z - self.rows.sum())

    def error(self, solver):
        """|P1 - a|_1 + |P^T 1 - b|_1."""
        return float(abs(self.rows - solver.a).sum() + abs(self.P.sum(-2) - solver.b).sum())


class _Solver:
    """One problem, (n, m), in units of eps: ``cost`` = -(C - min C) / eps; C, a, b and all
    state are arrays of the module ``xp`` (``otcore._arrays``); ``threshold``: the drift allowed
    (``THRESHOLDS``)."""

    def __init__(self, xp, C, a, b, eps, threshold):
        self.xp, self.threshold = xp, threshold
        self.n = n = a.shape[-1]
        self.a, self.b = a, b
        # the plan does not see a constant in C: taking min C out keeps -C / eps small (float32)
        self.offset = float(C.min())
        self.cost = (C - self.offset) / -eps
        self.ab = xp.concatenate((a, b))
        self.log_ab = xp.log(self.ab)
        self.log_a, self.log_b = self.log_ab[:n], self.log_ab[n:]
        self.zero_weight = bool((self.ab == 0).any())
        self.zero_a, self.zero_b = a == 0, b == 0
        # the Newton step eliminates the larger side and keeps the other: its weights w fix the gauge
        # (w w^T / |w|_1, a 1 for a zero weight: an empty row and column of S)
        self.rows_out = n >= b.shape[-1]
        self.kept = b if self.rows_out else a
        self.mass = float(self.kept.sum())
        self.gauge = xp.outer(self.kept, self.kept / self.mass)
        if self.zero_weight:
            self.gauge += xp.diag(self.kept == 0)
        self.sweep = -(-min(n, b.shape[-1]) // SWEEP_COLUMNS)
        self.tiny = float(xp.finfo(C.dtype).tiny)

    def plan(self, z):
        """P = exp(K + phi 1^T + 1 psi^T), (n, m), its entries at least e times the dtype's ``tiny``."""
        shifted = z + self.log_ab
        exponent = self.cost + shifted[: self.n, None]
        exponent += shifted[self.n:]
        return exp_above_tiny_(exponent)

    def transform(self, potential, rows):
        """Log-domain update: the row potential making P1 = a from psi (``rows``), or the column
        potential making P^T 1 = b from phi, a logsumexp over the other side."""
        if rows:
            x, axis = self.cost + (potential + self.log_b), -1
        else:
            x, axis = self.cost + (potential + self.log_a)[:, None], -2
        top = self.xp.amax(x, axis)
        x -= top[:, None] if rows else top
        return -(self.xp.log(exp_above_tiny_(x).sum(axis)) + top)

    def solve(self, tol, max_iter, sinkhorn_iter):
        """(z (n + m,), error, warm-up iterations, Newton iterations, the offset f carries: min C)."""
        z, P, drift, n_sinkhorn = self.sinkhorn(self.xp.zeros_like(self.ab), None, 0.0, tol, sinkhorn_iter)
        point, n_newton = self.newton(_Point(self, z, P, drift), tol, max_iter - n_sinkhorn)
        return point.z, point.error, n_sinkhorn, n_newton, self.offset

    def sinkhorn(self, z, P, drift, tol, max_iter, rows=None):
        """Sinkhorn iterations (a row, then a column update) from z and its plan P (None: not
        held; ``rows``: P1 if known): (z, P or None, drift, iterations done).

        With a held plan the iterate is u_i P_ij v_j: the row update sets u = a / (P v), the
        column update v = b / (P^T u) (matrix-vector products), and the scalings are absorbed
        into z and P at the end. A row update without a held plan is a log-domain c-transform
        (any cost offset), whose plan is then held. An iteration whose scalings would take the
        drift past ``threshold`` (its sums may rest on entries lost to the floor of ``plan``)
        or are not finite is redone in the log domain from the last held iterate, and the plan
        dropped until the next row update computes it. As in ``sinkhorn``, an iterate's error
        (its row error: its columns are exact) is known at the next row update, from the second
        iteration on, and the loop stops before updating an iterate that meets ``tol`` (or
        whose error is not finite).
        """
        xp, a, b, n = self.xp, self.a, self.b, self.n
        u = v = None  # the held plan's row and column scalings (None: 1); its iterate is u_i P_ij v_j
        done, reach = 0, 0.0
        for it in range(1, max_iter + 1):
            check, log_row = it > 1 and tol > 0, P is None
            if log_row:  # log-domain row update; its plan is held, its columns then scaled
                phi = self.transform(z[n:], rows=True)
                if check and not float(abs(xp.expm1(z[:n] - phi) * a).sum()) > tol:
                    break
                z = xp.concatenate((phi, z[n:]))
                P, drift, new_u = self.plan(z), 0.0, xp.ones_like(a)
                new_v = self._ratio(b, P.sum(-2), self.zero_b)
            else:
                Pv = (P.sum(-1) if rows is None else rows) if v is None else P @ v
                if check and not float(abs(Pv * u - a).sum()) > tol:
                    break
                new_u = self._ratio(a, Pv, self.zero_a)
                new_v = self._ratio(b, P.T @ new_u, self.zero_b)
            rows, new_reach = None, log_range(xp, new_u, new_v)[0]
            if drift + 2 * new_reach <= self.threshold:
                u, v, reach = new_u, new_v, new_reach
            else:
                if u is not None:
                    z = z + xp.log(xp.concatenate((u, v)))
                phi = z[:n] if log_row else self.transform(z[n:], rows=True)
                z = xp.concatenate((phi, self.transform(phi, rows=False)))
                P = u = v = None
            done += 1
        if u is not None:
            P *= u[:, None]
            P *= v
            z, drift = z + xp.log(xp.concatenate((u, v))), drift + 2 * reach
        return z, P, drift, done

    def _ratio(self, weights, sums, zero):
        """weights / sums, 1 at zero weights (``zero``)."""
        ratio = weights / sums
        return self.xp.where(zero, 1.0, ratio) if self.zero_weight else ratio

    def direction(self, point, mu):
        """The Newton direction d (n + m,) of ``point`` at shift mu |grad|_2 and its model terms
        (slope <grad, d>, curvature d^T (H + lam I) d, a bound on |d_i + d_j|), or None when S is
        not positive definite."""
        xp, n, P, grad = self.xp, self.n, point.P, point.grad
        lam = mu * point.grad_norm
        shifted = point.rc + lam  # (r + lam, c + lam)
        if self.rows_out:  # eliminated side e, kept side k
            Pe, ge, gk, De, Dk = P, grad[:n], grad[n:], shifted[:n], shifted[n:]
        else:
            Pe, ge, gk, De, Dk = P.T, grad[n:], grad[:n], shifted[n:], shifted[:n]
        if not lam > 0:  # an empty row (zero weight, or underflow) stays 0 in W
            De = xp.clip(De, self.tiny, None)
        # entries below sqrt(tiny) weigh nothing in S (their products are below tiny), and products
        # that round to subnormals make the matrix product many times slower: they are dropped
        Pe = xp.where(Pe > 2.0 * math.sqrt(self.tiny), Pe, 0.0)
        W = Pe / De[:, None]  # diag(r + lam)^-1 P when the rows are eliminated
        solved = _schur_solve(self.gauge, W, Pe, Dk, gk - W.T @ ge)
        if solved is None:
            return None
        xk, info = solved
        xe = (ge - Pe @ xk) / De
        d = xp.concatenate((xe, xk) if self.rows_out else (xk, xe))
        terms = [grad @ d, self.kept @ xk, abs(d).max()]
        if info is not None:  # the factorisation's status, read with the model terms
            terms.append(info.to(d.dtype))
        slope, wx, top, *failed = host_floats(*terms)
        if any(failed):
            return None
        # d^T (H + lam I) d: the system solved adds the gauge term (w^T x_k)^2 / |w|_1
        return d, slope, slope - wx**2 / self.mass, 2 * top

    def move(self, point, d, step, reach):
        """The trial point at z + step d, its plan rescaled from ``point``'s while the drift allows."""
        z = point.z + step * d
        drift = point.drift + step * reach
        if not drift <= self.threshold:
            return _Trial(self, z, self.plan(z), 0.0)
        scale = self.xp.exp(step * d)
        P = point.P * scale[: self.n, None]
        P *= scale[self.n:]
        return _Trial(self, z, P, drift)

    def newton(self, point, tol, max_iter):
        """Sinkhorn-Newton iterations from ``point``: (the last point, iterations)."""
        mu, ulp, n_iter = MU_MIN, float(self.xp.finfo(point.P.dtype).eps), 0
        while math.isfinite(point.error):
            if point.error <= tol and point.drift:  # judge convergence on the plan computed from z
                point = _Point(self, point.z)
                continue
            if point.error <= tol or n_iter >= max_iter:
                break
            n_iter += 1
            found = self.direction(point, mu)
            if found is None:  # S singular to working precision: shift more
                mu *= MU_UP
                continue
            d, slope, curvature, reach = found
            noise = 64 * ulp * (abs(point.value) + 1)
            step = STEP_REACH / reach if reach > STEP_REACH else 1.0
            for _ in range(HALVINGS):
                trial = self.move(point, d, step, reach)
                # near the optimum D changes below its rounding noise: then the marginal error decides
                if math.isfinite(trial.value) and (trial.value > point.value + noise or (
                        trial.value >= point.value - noise and trial.error(self) < point.error)):
                    break
                step /= 2
            else:
                mu *= MU_UP
                continue
            predicted = step * slope - 0.5 * step**2 * curvature
            ratio = (trial.value - point.value) / predicted if predicted > noise else 1.0
            mu = mu * MU_UP if ratio < RHO_LOW else max(mu * MU_DOWN, MU_MIN) if ratio > RHO_HIGH else mu
            z, P, drift, _ = self.sinkhorn(trial.z, trial.P, trial.drift, tol, self.sweep, trial.rows)
            point = _Point(self, z, P, drift)
        if point.drift:
            point = _Point(self, point.z)
        return point, n_iter


def _schur_solve(gauge, W, Pe, Dk, rhs):
    """(x, info) with x (k,) solving S x = rhs for S = gauge - W^T Pe + diag(Dk) (k, k), W and Pe
    (n_e, k), by Cholesky.

    NumPy arrays: S is factored by SciPy's LAPACK (at k = n_e = 64 in a third of the time of
    torch's product, ``cholesky_ex`` and ``cholesky_solve``: ~70 us against ~190 us, mostly
    per-call overhead); info is None, and the result None when S is not positive definite to
    working precision. Tensors: torch's, and info is ``cholesky_ex``'s status (nonzero when S did
    not factor), for the caller to read with its own host read."""
    k = Dk.shape[-1]
    if isinstance(Dk, np.ndarray):
        S = gauge - W.T @ Pe
        S.flat[:: k + 1] += Dk
        potrf, potrs = scipy.linalg.get_lapack_funcs(("potrf", "potrs"), (S,))
        L, info = potrf(S, lower=1, clean=0, overwrite_a=1)
        if info != 0:
            return None
        x, _ = potrs(L, rhs, lower=1)
        return x, None
    S = torch.sub(gauge, torch.mm(W.mT, Pe))
    S.diagonal().add_(Dk)
    L, info = torch.linalg.cholesky_ex(S)
    return torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1), info
