"""Neural OT: the Monge gap against POT, and the cost of training a map with it.

``MongeGap`` times the entropic Monge gap of a batch of 256 points (x -> x A, A SPD, float32)
at eps = 0.1 x the mean cost (otcore's default): otcore's ``monge_gap`` forward and backward
(gradient w.r.t. T(x)) against the same quantity computed from POT's kernel-domain
``ot.sinkhorn`` plan on float64 numpy arrays (``ot.sinkhorn2`` returns only <P, C>, so the gap
adds eps KL(P || a x b) to it), forward only (POT's numpy backend has no gradient), to the same
marginal tolerance. ``track_gap`` reports both values, which agree to that tolerance.
``FitMongeMap`` times 100 steps of ``fit_monge_map`` with its defaults on a d = 2 Gaussian pair;
multiply by 10 for the time per 1 000 steps.

``LightSBStep`` times one Adam step of ``LightSB`` (batch 256, its defaults: 10 full-covariance
components) against the same loss written with ``torch.distributions`` (``MixtureSameFamily`` of
``MultivariateNormal`` for log v, dense S_k for log c), the formulation of the paper's official
code, on the same parameters; ``track_loss`` reports both losses, which agree. ``ENOTStep`` times
one outer step of ``ENOT.fit`` at its defaults (10 drift steps and one potential step, each
simulating 20 Euler-Maruyama steps of a 3 x 128 MLP on 128 points). No LightSB or ENOT
implementation is installed (nor packaged on PyPI) to compare against; both step timings are
otcore's alone. All on one CPU thread; multiply by 1 000 for the time per 1 000 steps.

``GaussianEOT`` is the comparison a user makes without a Schrödinger-bridge solver: the entropic
plan (cost 1/2 |x - y|^2, eps = 1) between N(0, S0) and N(1, S1) from 2 000 samples per side,
either by LightSB (``fit`` at its defaults, then 20 000 out-of-sample pairs) or as the discrete
plan between the samples, by ``otcore.sinkhorn`` (float64 torch: in float32 the marginal error
stalls near 1.4e-6 and the run goes to its iteration cap) or POT's ``ot.sinkhorn`` (float64
numpy, the peer a user would pick), both to the marginal tolerance 1e-6 (each by its own
criterion: otcore's L1 error of both marginals, POT's L2 error of one).
``track_bw2_uvp`` scores each against the closed form (``otcore.neural.gaussian``): BW2-UVP (%)
of the joint, from the pairs (LightSB) or the plan-weighted moments (discrete plans).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

import otcore
from otcore.neural import ENOT, LightSB, fit_monge_map, gaussian, monge_gap

from . import peers

N, TOL = 256, 1e-4


def batch(d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, d) float32 standard normal and its image under a random SPD linear map."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=gen, dtype=torch.float64)
    M = torch.randn(d, d, generator=gen, dtype=torch.float64)
    A = M @ M.T / d + 0.5 * torch.eye(d, dtype=torch.float64)
    return x.float(), (x @ A).float()


def gap_eps(x: torch.Tensor, Tx: torch.Tensor) -> float:
    """0.1 x the mean squared distance over all pairs (monge_gap's default eps)."""
    return 0.1 * float(((x[:, None] - Tx[None]) ** 2).sum(-1).mean())


def otcore_gap(x: torch.Tensor, Tx: torch.Tensor, eps: float) -> float:
    Tx = Tx.detach().requires_grad_()
    value = monge_gap(x, Tx, eps=eps, tol=TOL)
    value.backward()
    return float(value.detach())


def pot_gap(x: np.ndarray, Tx: np.ndarray, eps: float) -> float:
    """mean c(x_i, Tx_i) - (<P, C> + eps KL(P || a x b)) with POT's plan."""
    ot = peers.require("ot")
    C = peers.sqdist_np(x, Tx)
    n = len(x)
    w = np.full(n, 1.0 / n)
    P = ot.sinkhorn(w, w, C, eps, stopThr=TOL, numItermax=2000)
    positive = P > 0
    kl = float((P[positive] * np.log(P[positive] * n * n)).sum())
    return float(np.diag(C).mean() - (P * C).sum() - eps * kl)


class MongeGap:
    """Monge gap of 256 points, eps = 0.1 x mean cost: otcore (forward + backward) vs POT (forward)."""

    params = (["otcore", "pot"], [2, 16])
    param_names: ClassVar[list[str]] = ["impl", "d"]

    def setup(self, impl, d):
        x, Tx = batch(d)
        self.eps = gap_eps(x, Tx)
        if impl == "pot":
            peers.require("ot")
            self.args = (x.double().numpy(), Tx.double().numpy())
            self.fn = pot_gap
        else:
            self.args = (x, Tx)
            self.fn = otcore_gap
        self.fn(*self.args, self.eps)  # warm-up

    def time_gap(self, impl, d):
        self.fn(*self.args, self.eps)

    def track_gap(self, impl, d):
        return self.fn(*self.args, self.eps)


class FitMongeMap:
    """100 steps of fit_monge_map (defaults: batch 128, residual MLP 64-64-64), d = 2, CPU, one thread."""

    timeout = 300

    def setup(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small batches: threads only add overhead (and oversubscribe)
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(4096, 2, generator=gen)
        self.y = torch.randn(4096, 2, generator=gen) @ torch.tensor([[1.2, 0.3], [0.0, 0.6]]) + 1.0

    def teardown(self):
        torch.set_num_threads(self.threads)

    def time_fit_100_steps(self):
        fit_monge_map(self.x, self.y, n_steps=100, seed=0)


class _OneThread:
    def setup_threads(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def teardown(self, *args):
        torch.set_num_threads(self.threads)


def gaussian_samples(d: int, n: int = 4096, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(d, d, generator=gen) / d**0.5
    return torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen) @ M + 1.0


def distributions_loss(model: LightSB, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The LightSB loss as the official code writes it: torch.distributions for log v, dense S_k."""
    L = model.lower.tril(-1) + torch.diag_embed((0.5 * model.log_diag).exp())
    S = L @ L.mT
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=model.log_alpha),
        torch.distributions.MultivariateNormal(model.r, covariance_matrix=model.eps * S))
    log_v = mixture.log_prob(y) + torch.logsumexp(model.log_alpha, 0)
    quad = (x[:, None, None, :] @ S[None] @ x[:, None, :, None])[..., 0, 0] + 2 * x @ model.r.T
    log_c = torch.logsumexp(model.log_alpha + quad / (2 * model.eps), dim=-1)
    return log_c.mean() - log_v.mean()


class LightSBStep(_OneThread):
    """One Adam step of LightSB, batch 256, K = 10 full covariances: otcore vs torch.distributions."""

    params = (["otcore", "torch.distributions"], [2, 16, 64])
    param_names: ClassVar[list[str]] = ["impl", "d"]

    def setup(self, impl, d):
        self.setup_threads()
        x, y = gaussian_samples(d)
        self.model = LightSB(d, eps=1.0).fit(x, y, n_steps=20, seed=0, progress=False)
        self.x, self.y = x[:256], y[:256]
        self.loss_fn = self.model.loss if impl == "otcore" else lambda a, b: distributions_loss(self.model, a, b)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.time_step(impl, d)  # warm-up

    def time_step(self, impl, d):
        loss = self.loss_fn(self.x, self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def track_loss(self, impl, d):
        with torch.no_grad():
            return float(self.loss_fn(self.x, self.y))


class ENOTStep(_OneThread):
    """One outer step of ENOT.fit at its defaults (10 drift steps + 1 potential step)."""

    params = ([2, 16],)
    param_names: ClassVar[list[str]] = ["d"]
    timeout = 300

    def setup(self, d):
        self.setup_threads()
        self.x, self.y = gaussian_samples(d)
        self.model = ENOT(d, eps=1.0)

    def time_outer_step(self, d):
        self.model.fit(self.x, self.y, n_steps=1, seed=0, progress=False)


def gaussian_problem(d: int, seed: int = 0):
    """N(0, S0), N(1, S1) with S = R diag(log-spaced in [0.5, 2]) R^T (the ENOT benchmark's recipe), float64."""
    gen = torch.Generator().manual_seed(seed)

    def cov():
        Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
        return Q @ torch.diag(torch.logspace(np.log10(0.5), np.log10(2.0), d, dtype=torch.float64)) @ Q.T

    return torch.zeros(d, dtype=torch.float64), cov(), torch.ones(d, dtype=torch.float64), cov()


def plan_bw2_uvp(P, x, y, mean, cov) -> float:
    """BW2-UVP (%) of the Gaussian fitted to a discrete plan P (n, m) between x (n, d) and y (m, d)."""
    P, x, y = (torch.as_tensor(t, dtype=torch.float64) for t in (P, x, y))
    a, b = P.sum(1), P.sum(0)
    mx, my = a @ x, b @ y
    xc, yc = x - mx, y - my
    cross = xc.T @ P @ yc
    top = torch.cat([(xc * a[:, None]).T @ xc, cross], 1)
    joint = torch.cat([top, torch.cat([cross.T, (yc * b[:, None]).T @ yc], 1)], 0)
    value = gaussian.bures_wasserstein(torch.cat([mx, my]), joint, mean, cov)
    return float(100 * value / cov.diagonal().sum())


class GaussianEOT(_OneThread):
    """EOT plan between Gaussians from 2 000 samples per side, eps = 1: LightSB vs discrete plans."""

    params = (["LightSB", "otcore.sinkhorn", "pot.sinkhorn"], [2, 16])
    param_names: ClassVar[list[str]] = ["impl", "d"]
    timeout = 300
    eps, n, tol = 1.0, 2000, 1e-6

    def setup(self, impl, d):
        self.setup_threads()
        m0, S0, m1, S1 = gaussian_problem(d)
        self.truth = gaussian.eot_plan(m0, S0, m1, S1, eps=self.eps)
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(self.n, d, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(S0).T + m0
        self.y = torch.randn(self.n, d, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(S1).T + m1
        self.test_x = torch.randn(20000, d, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(S0).T + m0
        if impl == "pot.sinkhorn":
            peers.require("ot")
            self.args = (self.x.numpy(), self.y.numpy())
        elif impl == "otcore.sinkhorn":
            self.args = (self.x, self.y)
        else:
            self.args = (self.x.float(), self.y.float())
        self.solve = {"LightSB": self._lightsb, "otcore.sinkhorn": self._otcore, "pot.sinkhorn": self._pot}[impl]

    def _lightsb(self, x, y):
        return LightSB(x.shape[1], eps=self.eps).fit(x, y, seed=0, progress=False)

    def _otcore(self, x, y):
        return otcore.sinkhorn(0.5 * torch.cdist(x, y) ** 2, eps=self.eps, tol=self.tol, warn=False).plan

    def _pot(self, x, y):
        ot = peers.require("ot")
        w = np.full(self.n, 1.0 / self.n)
        return ot.sinkhorn(w, w, 0.5 * peers.sqdist_np(x, y), self.eps, stopThr=self.tol, numItermax=100_000)

    def time_solve(self, impl, d):
        self.solve(*self.args)

    def track_bw2_uvp(self, impl, d):
        out = self.solve(*self.args)
        if isinstance(out, LightSB):
            pairs = torch.cat([self.test_x, out.sample(self.test_x.float(), seed=0).double()], 1)
            return float(gaussian.bw2_uvp(pairs, *self.truth))
        return plan_bw2_uvp(out, self.x, self.y, *self.truth)
