"""The softmin primitive written plainly on a dense cost: the oracle every faster path is tested
against (the blocked torch path, the Triton kernels). Slow and O(n m) memory by design.

Shapes: C (B, n, m) is reduced over its last axis (pass ``C.mT`` to reduce over rows), ``h``
and ``w`` (B, m) live on the reduced axis, ``f`` (B, n) on the kept one, ``v`` (B, m, k).
Zero weights are allowed (they multiply an exponential, they are never logged) as long as
one weight per row is positive; a zero-weight entry whose exponent exceeds the largest weighted
one by more than ~700 overflows, and the blocked and Triton paths clamp such exponents, so
compare gradients in weights at zero entries only where that does not happen.
"""

from __future__ import annotations

import torch


def _weighted_kernel(C, f, h, w, eps):
    """``(w_j exp((f_i + h_j - C_ij)/eps - t_i), t_i)``, t_i the row's largest weighted exponent."""
    s = (f.unsqueeze(-1) + h.unsqueeze(-2) - C) / eps
    top = torch.where(w.unsqueeze(-2) > 0, s, float("-inf")).amax(-1, keepdim=True).detach()
    return w.unsqueeze(-2) * torch.exp(s - top), top.squeeze(-1)


def softmin(C: torch.Tensor, h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``-eps log sum_j w_j exp((h_j - C_ij)/eps)``: (B, n)."""
    K, top = _weighted_kernel(C, torch.zeros_like(C[..., 0]), h, w, eps)
    return -eps * (torch.log(K.sum(-1)) + top)


def kernel_apply(C, f, h, w, v, eps: float) -> torch.Tensor:
    """``sum_j w_j exp((f_i + h_j - C_ij)/eps) v_jk``: (B, n, k)."""
    K, top = _weighted_kernel(C, f, h, w, eps)
    return torch.exp(top).unsqueeze(-1) * (K @ v)


def kernel_cost(C, f, h, w, eps: float) -> torch.Tensor:
    """``sum_j w_j exp((f_i + h_j - C_ij)/eps) C_ij``: (B, n)."""
    K, top = _weighted_kernel(C, f, h, w, eps)
    return torch.exp(top) * (K * C).sum(-1)
