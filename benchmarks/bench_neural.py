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
simulating 20 Euler-Maruyama steps of a 3 x 128 MLP on 128 points); no packaged peer exists.
All on one CPU thread; multiply by 1 000 for the time per 1 000 steps.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from otcore.neural import ENOT, LightSB, fit_monge_map, monge_gap

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
