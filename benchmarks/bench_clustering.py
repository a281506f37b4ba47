"""Balanced codes: otcore.nn.sinkhorn_codes vs SwAV's kernel-domain Sinkhorn-Knopp in plain torch.

SwAV (Caron et al., 2020, ``distributed_sinkhorn`` in main_swav.py) exponentiates scores / eps
once and alternates row and column normalisations; otcore normalises in the log domain, which
never overflows. Both run 3 iterations on the same (4096, 3000) float32 scores (unit-norm
features and prototypes, SwAV's setting, eps = 0.05). ``CodesOverflow`` tracks the fraction of
non-finite codes at eps = 0.002, where exp(scores / eps) overflows float32.
"""

from __future__ import annotations

from typing import ClassVar

import torch

import otcore.nn

from . import problems

B, K, EPS, N_ITER = 4096, 3000, 0.05, 3


def swav_scores(device: torch.device, b: int = B, k: int = K) -> torch.Tensor:
    """(b, k) float32 cosine similarities of random unit features to random unit prototypes."""
    gen = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(b, 128, generator=gen), dim=1)
    c = torch.nn.functional.normalize(torch.randn(k, 128, generator=gen), dim=1)
    return (z @ c.T).to(device)


@torch.no_grad()
def swav_kernel_codes(scores: torch.Tensor, eps: float = EPS, n_iter: int = N_ITER) -> torch.Tensor:
    """SwAV's recipe, single process: Q = exp(S / eps)^T, then row/column normalisations."""
    Q = torch.exp(scores / eps).t()
    Q /= Q.sum()
    k, b = Q.shape
    for _ in range(n_iter):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= k
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= b
    Q *= b
    return Q.t()


def otcore_codes(scores: torch.Tensor, eps: float = EPS, n_iter: int = N_ITER) -> torch.Tensor:
    return otcore.nn.sinkhorn_codes(scores, eps=eps, n_iter=n_iter)


IMPLS = {"otcore": otcore_codes, "swav_kernel": swav_kernel_codes}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Codes:
    """(4096, 3000) float32 scores, eps 0.05, 3 iterations."""

    params = (list(IMPLS), problems.DEVICES)
    param_names: ClassVar[list[str]] = ["impl", "device"]
    timeout = 300

    def setup(self, impl, device):
        self.device = problems.device_or_skip(device)
        self.scores = swav_scores(self.device)
        self.fn = IMPLS[impl]
        self.fn(self.scores)  # warm-up
        _sync(self.device)

    def time_codes(self, impl, device):
        self.fn(self.scores)
        _sync(self.device)


class CodesOverflow:
    """Fraction of non-finite codes at eps = 0.002 (random cosines reach ~0.4: exp(0.4 / 0.002)
    = e^200 overflows float32)."""

    params = (list(IMPLS),)
    param_names: ClassVar[list[str]] = ["impl"]

    def track_nonfinite(self, impl):
        codes = IMPLS[impl](swav_scores(torch.device("cpu"), 512, 300), eps=0.002)
        return float((~torch.isfinite(codes)).float().mean())

    track_nonfinite.unit = "fraction"
