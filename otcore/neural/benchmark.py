"""Entropic OT problems with a known solution between non-Gaussian measures: the Gaussian-mixture
construction of "Building the bridge of Schrödinger" (Gushchin et al., NeurIPS 2023 D&B).

Conventions as in ``otcore.neural.gaussian``: cost ``1/2 |x - y|^2``, regularisation ``eps``
(the Brownian volatility). Any positive function psi on the target side defines the plan

    pi(y | x) ∝ N(y | x, eps I) psi(y)   (∝ exp(<x, y> / eps) v(y) with v = psi exp(-|y|^2 / (2 eps)))

which is, by that form, the entropic OT plan between P0 and its second marginal P1 = ∫ pi(. | x)
dP0(x). With a Gaussian-mixture psi(y) = sum_k p_k N(y | mu_k, Sigma_k) it is a mixture in
closed form:

    pi(y | x) = sum_k w_k(x) N(y | T_k (x / eps + Sigma_k^-1 mu_k), T_k),
    T_k = (I / eps + Sigma_k^-1)^-1,      w_k(x) ∝ p_k N(x | mu_k, Sigma_k + eps I).

``MixtureBridge`` holds P0 (a Gaussian mixture) and psi, samples x, y and (x, y), gives the
conditional moments, and scores a solver by the conditional BW2-UVP (cBW2-UVP): the average over
inputs x_i of BW2 between the Gaussian fitted to the solver's samples of y | x_i and the Gaussian
with the true conditional mean and covariance, over 1/2 tr Cov(Y), in %.

The published benchmark ships its parameters as downloaded files; ``MixtureBridge.random`` draws
its own (seeded), with the same structure.
"""

from __future__ import annotations

import math

import torch

from otcore._validation import check_finite, check_max_iter, check_positive
from otcore.neural.gaussian import _check_gaussian, _moments, _trace, bures_wasserstein


class MixtureBridge:
    """An EOT problem P0 -> P1 with a Gaussian-mixture Schrödinger potential (module docstring).

    Args:
        input_weights: (K0,) positive weights of P0's components (normalised here).
        input_means: (K0, d) means m_j of P0's components: P0 = sum_j q_j N(m_j, C_j).
        input_covs: (K0, d, d) SPD covariances C_j of P0's components.
        weights: (K,) positive weights p_k of psi = sum_k p_k N(mu_k, Sigma_k).
        means: (K, d) means mu_k of psi's components.
        covs: (K, d, d) SPD covariances Sigma_k of psi's components.
        eps: > 0.

    All tensors share one floating dtype and device, which every output keeps.
    """

    def __init__(self, input_weights, input_means, input_covs, weights, means, covs, *, eps: float):
        self.eps = check_positive("eps", eps)
        for w_name, w, m_name, m, c_name, c in (
            ("input_weights", input_weights, "input_means", input_means, "input_covs", input_covs),
            ("weights", weights, "means", means, "covs", covs),
        ):
            _check_gaussian(m_name, m, c_name, c)
            check_finite(w_name, w)
            if m.dim() != 2 or w.shape != m.shape[:1]:
                raise ValueError(f"{w_name} has shape {tuple(w.shape)} and {m_name} {tuple(m.shape)}; "
                                 f"expected (K,) and (K, d)")
            if bool((w <= 0).any()):
                raise ValueError(f"{w_name} must be > 0")
        if input_means.shape[-1] != means.shape[-1]:
            raise ValueError(f"means has dimension {means.shape[-1]}, input_means {input_means.shape[-1]}")
        self.dim = means.shape[-1]
        self.input_weights = input_weights / input_weights.sum()
        self.input_means, self.input_covs = input_means, input_covs
        self.weights = weights / weights.sum()
        self.means, self.covs = means, covs
        eye = torch.eye(self.dim, dtype=covs.dtype, device=covs.device)
        prec = torch.linalg.inv(covs)
        #: T_k, the covariance of component k of pi(. | x): (K, d, d)
        self.plan_covs = torch.linalg.inv(eye / self.eps + prec)
        self.plan_covs = 0.5 * (self.plan_covs + self.plan_covs.mT)
        #: T_k Sigma_k^-1 mu_k: (K, d); the mean of component k is this + T_k x / eps
        self.plan_shifts = (self.plan_covs @ (prec @ means[..., None])).squeeze(-1)
        self._gate = torch.distributions.MultivariateNormal(means, covs + self.eps * eye)
        self._target_moments: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def random(cls, dim: int, *, eps: float, n_input_components: int = 3, n_components: int = 5,
               seed: int = 0, dtype: torch.dtype = torch.float64, device=None) -> MixtureBridge:
        """A seeded random instance: component means ~ N(0, 4 I), covariances R diag(log-spaced
        in [0.1, 0.4]) R^T with random rotations R (P0 and psi alike), weights uniform in [0.5, 1]."""
        dim = check_max_iter("dim", dim)
        gen = torch.Generator().manual_seed(int(seed))

        def mixture(k: int):
            k = check_max_iter("n_components", k)
            Q, _ = torch.linalg.qr(torch.randn(k, dim, dim, generator=gen, dtype=torch.float64))
            scales = torch.logspace(math.log10(0.1), math.log10(0.4), dim, dtype=torch.float64)
            covs = (Q * scales) @ Q.mT
            means = 2 * torch.randn(k, dim, generator=gen, dtype=torch.float64)
            weights = 0.5 + 0.5 * torch.rand(k, generator=gen, dtype=torch.float64)
            return (t.to(dtype=dtype, device=device) for t in (weights, means, 0.5 * (covs + covs.mT)))

        return cls(*mixture(n_input_components), *mixture(n_components), eps=eps)

    # ------------------------------------------------------------------ sampling

    def sample_x(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples of P0: (n, d)."""
        return _sample_mixture(self.input_weights.log().expand(n, -1), self.input_means.expand(n, -1, -1),
                               self.input_covs, generator)

    def conditional(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pi(. | x) for x (n, d): log weights (n, K), component means (n, K, d), covariances (K, d, d)."""
        check_finite("x", x)
        if x.dim() != 2 or x.shape[-1] != self.dim:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected (n, {self.dim})")
        logits = self.weights.log() + self._gate.log_prob(x[:, None])
        means = self.plan_shifts + torch.einsum("kij,nj->nki", self.plan_covs, x) / self.eps
        return torch.log_softmax(logits, dim=-1), means, self.plan_covs

    def sample_y_given_x(self, x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """One y ~ pi(. | x_i) per row of x: (n, d)."""
        return _sample_mixture(*self.conditional(x), generator)

    def sample_plan(self, n: int, *, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n pairs (x, y) ~ pi: two (n, d) tensors."""
        x = self.sample_x(n, generator=generator)
        return x, self.sample_y_given_x(x, generator=generator)

    def sample_y(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples of P1: (n, d)."""
        return self.sample_plan(n, generator=generator)[1]

    # ------------------------------------------------------------------ moments and metric

    def conditional_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (n, d) and covariance (n, d, d) of pi(. | x_i)."""
        log_w, means, covs = self.conditional(x)
        w = log_w.exp()
        mean = (w[..., None] * means).sum(1)
        centred = means - mean[:, None]
        cov = torch.einsum("nk,kij->nij", w, covs) + torch.einsum("nk,nki,nkj->nij", w, centred, centred)
        return mean, cov

    def target_moments(self, n: int = 100_000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (d,) and covariance (d, d) of P1, by the law of total variance over n seeded
        samples of x (exact in the conditionals; cached for the default arguments)."""
        default = (n, seed) == (100_000, 0)
        if default and self._target_moments is not None:
            return self._target_moments
        gen = torch.Generator(device=self.means.device).manual_seed(int(seed))
        total_mean = torch.zeros(self.dim, dtype=self.means.dtype, device=self.means.device)
        second = torch.zeros(self.dim, self.dim, dtype=self.means.dtype, device=self.means.device)
        chunk = 10_000
        for start in range(0, n, chunk):
            x = self.sample_x(min(chunk, n - start), generator=gen)
            mean, cov = self.conditional_moments(x)
            total_mean += mean.sum(0)
            second += cov.sum(0) + mean.T @ mean
        total_mean /= n
        cov = second / n - torch.outer(total_mean, total_mean)
        result = total_mean, 0.5 * (cov + cov.mT)
        if default:
            self._target_moments = result
        return result

    def cbw2_uvp(self, x: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
        """cBW2-UVP (%): ``100 mean_i 1/2 W2^2(N(m^_i, S^_i), N(m_i, S_i)) / (1/2 tr Cov(Y))`` with
        (m^_i, S^_i) the moments of ``samples[i]`` and (m_i, S_i) those of pi(. | x_i).

        Args:
            x: (n, d) inputs.
            samples: (n, k, d), k >= 2 draws of y | x_i.

        Returns:
            ().
        """
        if samples.dim() != 3 or samples.shape[0] != x.shape[0]:
            raise ValueError(f"samples has shape {tuple(samples.shape)}, expected (n, k, d) with n = {x.shape[0]}")
        mean, cov = self.conditional_moments(x)
        m_hat, c_hat = _moments("samples", samples.to(mean.dtype), self.dim)
        return 100 * bures_wasserstein(m_hat, c_hat, mean, cov).mean() / _trace(self.target_moments()[1])


def _sample_mixture(log_weights: torch.Tensor, means: torch.Tensor, covs: torch.Tensor,
                    generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row from sum_k w_nk N(means_nk, covs_k): log_weights (n, K), means (n, K, d),
    covs (K, d, d); returns (n, d)."""
    k = torch.multinomial(log_weights.exp(), 1, generator=generator).squeeze(-1)
    rows = torch.arange(means.shape[0], device=means.device)
    noise = torch.randn(means.shape[0], means.shape[-1], generator=generator, dtype=means.dtype,
                        device=means.device)
    L = torch.linalg.cholesky(covs)[k]
    return means[rows, k] + (L @ noise[..., None]).squeeze(-1)
