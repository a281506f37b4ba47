"""Closed-form ground truths between Gaussians, and the metrics that compare samples with them.

Conventions. The W2 map is the optimal map for the cost |x - y|^2 (any positive multiple). The
entropic plans and Schrodinger bridges use the cost ``1/2 |x - y|^2`` and the regularisation
``eps`` (the volatility of the Brownian prior, dX_t = sqrt(eps) dW_t):

    pi* = argmin_pi  E_pi[1/2 |x - y|^2] + eps KL(pi || P0 x P1),

so that pi(y | x) ∝ exp(<x, y> / eps) v(y) for some v. For P0 = N(m0, S0), P1 = N(m1, S1), pi*
is Gaussian with cross-covariance (Janati et al. 2020 with sigma^2 = eps)

    D = (4 S0^1/2 S1 S0^1/2 + eps^2 I)^1/2,    C = 1/2 (S0^1/2 D S0^-1/2 - eps I),

and the bridge at time t given X_0 = x is N((1-t) x + t E[y|x], t^2 Cov[y|x] + eps t (1-t) I).

Every function takes (d,) means and (d, d) covariances, or a leading batch dimension on all of
them ((B, d), (B, d, d)), and keeps their dtype and device.

References:
    Janati, Muzellec, Peyre, Cuturi, "Entropic optimal transport between unbalanced Gaussian
    measures has a closed form", NeurIPS 2020.
    Gushchin et al., "Entropic neural optimal transport via diffusion processes", NeurIPS 2023
    (BW2-UVP); "Building the bridge of Schrodinger", NeurIPS 2023 D&B (cBW2-UVP).
    Korotin et al., "Do neural optimal transport solvers work?", NeurIPS 2021 (L2-UVP).
"""

from __future__ import annotations

import torch

from otcore._validation import _real, check_finite, check_positive


def sqrtm(S: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite (..., d, d) matrix (eigh)."""
    w, V = torch.linalg.eigh(S)
    return (V * w.clamp_min(0).sqrt().unsqueeze(-2)) @ V.mT


def _inv_sqrtm(S: torch.Tensor) -> torch.Tensor:
    w, V = torch.linalg.eigh(S)
    return (V * w.rsqrt().unsqueeze(-2)) @ V.mT


def _check_gaussian(mean_name: str, mean: torch.Tensor, cov_name: str, cov: torch.Tensor) -> None:
    """Raise unless ``mean`` is (..., d) and ``cov`` (..., d, d) symmetric positive definite."""
    for name, t in ((mean_name, mean), (cov_name, cov)):
        check_finite(name, t)
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    if mean.dim() < 1 or cov.dim() != mean.dim() + 1 or cov.shape[-2:] != (mean.shape[-1],) * 2:
        raise ValueError(f"{cov_name} has shape {tuple(cov.shape)}, expected (..., d, d) with d = {mean.shape[-1:]} "
                         f"to match {mean_name} of shape {tuple(mean.shape)}")
    tol = 100 * torch.finfo(cov.dtype).eps * cov.abs().amax().clamp_min(1)
    if bool(((cov - cov.mT).abs() > tol).any()):
        raise ValueError(f"{cov_name} must be symmetric")
    if bool((torch.linalg.cholesky_ex(cov).info != 0).any()):
        raise ValueError(f"{cov_name} must be positive definite")


def _check_pair(mean0, cov0, mean1, cov1) -> None:
    _check_gaussian("mean0", mean0, "cov0", cov0)
    _check_gaussian("mean1", mean1, "cov1", cov1)
    if mean0.shape != mean1.shape:
        raise ValueError(f"mean0 and mean1 must have the same shape, got {tuple(mean0.shape)} and {tuple(mean1.shape)}")


def w2_map(
    mean0: torch.Tensor, cov0: torch.Tensor, mean1: torch.Tensor, cov1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The W2-optimal (Brenier) map T(x) = A x + b from N(mean0, cov0) to N(mean1, cov1).

    ``A = S0^-1/2 (S0^1/2 S1 S0^1/2)^1/2 S0^-1/2`` (symmetric positive definite), b = m1 - A m0.

    Args:
        mean0: (d,) / (B, d) mean of the source.
        cov0: (d, d) / (B, d, d) SPD covariance of the source.
        mean1: (d,) / (B, d) mean of the target.
        cov1: (d, d) / (B, d, d) SPD covariance of the target.

    Returns:
        ``(A, b)``: (d, d) and (d,) (batched alike); apply as ``x @ A.mT + b``.
    """
    _check_pair(mean0, cov0, mean1, cov1)
    r0, ir0 = sqrtm(cov0), _inv_sqrtm(cov0)
    A = ir0 @ sqrtm(r0 @ cov1 @ r0) @ ir0
    A = 0.5 * (A + A.mT)
    return A, mean1 - (A @ mean0.unsqueeze(-1)).squeeze(-1)


def bures_wasserstein(
    mean0: torch.Tensor, cov0: torch.Tensor, mean1: torch.Tensor, cov1: torch.Tensor
) -> torch.Tensor:
    """Squared W2 distance (cost |x - y|^2) between N(mean0, cov0) and N(mean1, cov1):

    ``|m0 - m1|^2 + tr S0 + tr S1 - 2 tr (S0^1/2 S1 S0^1/2)^1/2``; () or (B,). Covariances may be
    semi-definite (empirical ones of few samples)."""
    r0 = sqrtm(cov0)
    cross = torch.linalg.eigvalsh(r0 @ cov1 @ r0).clamp_min(0).sqrt().sum(-1)
    value = (mean0 - mean1).pow(2).sum(-1) + _trace(cov0) + _trace(cov1) - 2 * cross
    return value.clamp_min(0)


def eot_plan(
    mean0: torch.Tensor, cov0: torch.Tensor, mean1: torch.Tensor, cov1: torch.Tensor, *, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The entropic OT plan pi* between Gaussians (cost 1/2 |x - y|^2, regularisation eps; see the
    module docstring): pi* = N([m0; m1], [[S0, C], [C^T, S1]]).

    Args:
        mean0: (d,) / (B, d).
        cov0: (d, d) / (B, d, d) SPD.
        mean1: (d,) / (B, d).
        cov1: (d, d) / (B, d, d) SPD.
        eps: > 0.

    Returns:
        ``(mean, cov)``: (2d,) and (2d, 2d) (batched alike), x first then y.
    """
    cross = eot_cross_covariance(mean0, cov0, mean1, cov1, eps=eps)
    top = torch.cat([cov0, cross], dim=-1)
    bottom = torch.cat([cross.mT, cov1], dim=-1)
    return torch.cat([mean0, mean1], dim=-1), torch.cat([top, bottom], dim=-2)


def eot_cross_covariance(
    mean0: torch.Tensor, cov0: torch.Tensor, mean1: torch.Tensor, cov1: torch.Tensor, *, eps: float
) -> torch.Tensor:
    """Cov(x, y) under the entropic plan: ``C = 1/2 (S0^1/2 D S0^-1/2 - eps I)``, (d, d) / (B, d, d).

    It satisfies ``eps C^T S0^-1 = S1 - C^T S0^-1 C`` (the conditional y | x has cross term
    <x, y> / eps) and tends to ``S0 A`` (A of ``w2_map``) as eps -> 0."""
    _check_pair(mean0, cov0, mean1, cov1)
    eps = check_positive("eps", eps)
    r0, ir0 = sqrtm(cov0), _inv_sqrtm(cov0)
    eye = torch.eye(cov0.shape[-1], dtype=cov0.dtype, device=cov0.device)
    D = sqrtm(4 * r0 @ cov1 @ r0 + eps**2 * eye)
    return 0.5 * (r0 @ D @ ir0 - eps * eye)


def eot_conditional(
    x: torch.Tensor, mean0: torch.Tensor, cov0: torch.Tensor, mean1: torch.Tensor, cov1: torch.Tensor, *,
    eps: float, t: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Law of the Schrodinger bridge X_t given X_0 = x (t = 1: the plan's conditional y | x).

    ``E[X_t | x] = (1-t) x + t (m1 + C^T S0^-1 (x - m0))``,
    ``Cov[X_t | x] = t^2 (S1 - C^T S0^-1 C) + eps t (1-t) I`` (cost 1/2 |x - y|^2, volatility eps).

    Args:
        x: (n, d) / (B, n, d) starting points.
        mean0: as in ``eot_plan``.
        cov0: as in ``eot_plan``.
        mean1: as in ``eot_plan``.
        cov1: as in ``eot_plan``.
        eps: > 0.
        t: time in [0, 1].

    Returns:
        ``(mean, cov)``: (n, d) conditional means and the (d, d) covariance (the same for every x).
    """
    t = _check_time(t)
    check_finite("x", x)
    if x.dim() != mean0.dim() + 1 or x.shape[-1] != mean0.shape[-1]:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected (n, {mean0.shape[-1]}) (batched as mean0)")
    cross = eot_cross_covariance(mean0, cov0, mean1, cov1, eps=eps)
    gain = torch.linalg.solve(cov0, cross).mT  # C^T S0^-1
    y_mean = mean1.unsqueeze(-2) + (x - mean0.unsqueeze(-2)) @ gain.mT
    eye = torch.eye(cov0.shape[-1], dtype=cov0.dtype, device=cov0.device)
    y_cov = cov1 - gain @ cross
    y_cov = 0.5 * (y_cov + y_cov.mT)
    return (1 - t) * x + t * y_mean, t**2 * y_cov + eps * t * (1 - t) * eye


def bridge_marginal(
    mean0: torch.Tensor, cov0: torch.Tensor, mean1: torch.Tensor, cov1: torch.Tensor, *, eps: float, t: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Marginal of the Schrodinger bridge at time t: mean (1-t) m0 + t m1, covariance
    ``(1-t)^2 S0 + t^2 S1 + t(1-t)(C + C^T) + eps t (1-t) I``; returns (d,), (d, d) (batched alike)."""
    t = _check_time(t)
    cross = eot_cross_covariance(mean0, cov0, mean1, cov1, eps=eps)
    eye = torch.eye(cov0.shape[-1], dtype=cov0.dtype, device=cov0.device)
    cov = (1 - t) ** 2 * cov0 + t**2 * cov1 + t * (1 - t) * (cross + cross.mT + eps * eye)
    return (1 - t) * mean0 + t * mean1, cov


def bw2_uvp(samples: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """BW2-UVP (%): ``100 BW2(N(m^, S^), N(m, S)) / (1/2 tr S)`` with ``BW2 = 1/2 W2^2`` between
    the Gaussian fitted to ``samples`` (empirical mean and covariance) and the true N(mean, cov).

    Args:
        samples: (n, d) / (B, n, d), n >= 2.
        mean: (d,) / (B, d).
        cov: (d, d) / (B, d, d).

    Returns:
        () / (B,).
    """
    _check_gaussian("mean", mean, "cov", cov)
    m_hat, c_hat = _moments("samples", samples, mean.shape[-1])
    return 100 * bures_wasserstein(m_hat, c_hat, mean, cov) / _trace(cov)


def cbw2_uvp(
    x: torch.Tensor, samples: torch.Tensor, mean0: torch.Tensor, cov0: torch.Tensor, mean1: torch.Tensor,
    cov1: torch.Tensor, *, eps: float,
) -> torch.Tensor:
    """Conditional BW2-UVP (%): the average over inputs x_i of BW2(samples of y | x_i, true
    conditional of ``eot_conditional``), normalised by 1/2 tr S1 (the target's variance) and x 100.

    Args:
        x: (n, d) inputs.
        samples: (n, k, d), k >= 2 draws of y | x_i per input.
        mean0: as in ``eot_plan`` (unbatched).
        cov0: as in ``eot_plan`` (unbatched).
        mean1: as in ``eot_plan`` (unbatched).
        cov1: as in ``eot_plan`` (unbatched).
        eps: as in ``eot_plan``.

    Returns:
        ().
    """
    if samples.dim() != 3 or samples.shape[0] != x.shape[0]:
        raise ValueError(f"samples has shape {tuple(samples.shape)}, expected (n, k, d) with n = {x.shape[0]}")
    mean, cov = eot_conditional(x, mean0, cov0, mean1, cov1, eps=eps)
    m_hat, c_hat = _moments("samples", samples, mean0.shape[-1])
    return 100 * bures_wasserstein(m_hat, c_hat, mean, cov.expand_as(c_hat)).mean() / _trace(cov1)


def l2_uvp(mapped: torch.Tensor, reference: torch.Tensor, cov1: torch.Tensor) -> torch.Tensor:
    """L2-UVP (%): ``100 E|T^(x) - T*(x)|^2 / Var(P1)`` with Var(P1) = tr ``cov1``.

    Args:
        mapped: (n, d) / (B, n, d) images of a fitted map.
        reference: same shape, images of the true map at the same x.
        cov1: (d, d) / (B, d, d) covariance of the target.

    Returns:
        () / (B,).
    """
    check_finite("mapped", mapped)
    check_finite("reference", reference)
    if mapped.shape != reference.shape:
        raise ValueError(f"mapped and reference must have the same shape, got {tuple(mapped.shape)} "
                         f"and {tuple(reference.shape)}")
    return 100 * (mapped - reference).pow(2).sum(-1).mean(-1) / _trace(cov1)


def _moments(name: str, samples: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Empirical mean (..., d) and unbiased covariance (..., d, d) of (..., n, d) samples."""
    check_finite(name, samples)
    if samples.dim() < 2 or samples.shape[-1] != d or samples.shape[-2] < 2:
        raise ValueError(f"{name} has shape {tuple(samples.shape)}, expected (..., n, {d}) with n >= 2")
    m = samples.mean(-2)
    centred = samples - m.unsqueeze(-2)
    return m, centred.mT @ centred / (samples.shape[-2] - 1)


def _trace(S: torch.Tensor) -> torch.Tensor:
    return S.diagonal(dim1=-2, dim2=-1).sum(-1)


def _check_time(t: float) -> float:
    value = _real("t", t, "a number in [0, 1]")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"t must lie in [0, 1], got {t!r}")
    return value
