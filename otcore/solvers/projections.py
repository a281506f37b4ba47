"""Sparse projections on the last axis, vectorised over every leading axis (columns, batches).

* ``top_k(v, k)``: the k largest entries, with a deterministic tie rule.
* ``sparse_simplex_projection(v, k, mass)``: the Euclidean projection of v onto
  ``{p >= 0, sum p = mass, |p|_0 <= k}``: keep the top k entries, then project them onto the
  simplex by the sort-based algorithm (Kyrillidis et al. 2013, Prop. 1).
* ``top_k_relu(v, k)``: ``[v]_+`` on the top k entries, 0 elsewhere (the gradient of the
  sparsity-constrained conjugate ``delta*`` up to its 1/gamma factor).

Ties: among entries tied at the k-th largest value, those of lower index are kept (the same rule
as a stable descending sort; tied entries that are kept get equal shares). Every function is
differentiable almost everywhere by autograd (the selection is held fixed).

References:
    Kyrillidis, Becker, Cevher, Koch, "Sparse projections onto the simplex", ICML 2013.
    Duchi, Shalev-Shwartz, Singer, Chandra, "Efficient projections onto the l1-ball", ICML 2008.
    Liu, Puigcerver, Blondel, "Sparsity-constrained optimal transport", ICLR 2023.
"""

from __future__ import annotations

import math

import torch


def top_k(v: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``min(k, n)`` largest entries of ``v`` (..., n) in descending order, and their indices.

    Among entries tied at the k-th value, the lower indices are kept. Two ``torch.topk`` passes
    (O(n) selection, no full sort) for k < n; a sort for k >= n. Returns values and int64
    indices, (..., min(k, n)).
    """
    if k >= v.shape[-1]:
        return torch.sort(v, dim=-1, descending=True)
    kth = torch.topk(v, k, dim=-1).values[..., -1:]
    above, tied = v > kth, v == kth
    keep = above | (tied & (tied.cumsum(-1) <= k - above.sum(-1, keepdim=True)))
    return torch.topk(torch.where(keep, v, -math.inf), k, dim=-1)


def sparse_simplex_projection(
    v: torch.Tensor, k: int, mass: torch.Tensor | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Project ``v`` (..., n) onto ``{p >= 0, sum p = mass, |p|_0 <= k}`` along the last axis.

    Args:
        v: (..., n) real tensor.
        k: at most k nonzeros (k >= n: the plain simplex projection).
        mass: (...) or a float, >= 0; mass 0 projects to 0.

    Returns:
        ``(p, theta)``: the projection (..., n), and the threshold theta (...) with
        ``p_i = max(v_i - theta, 0)`` on the top-k support (0 off it).
    """
    values, index = top_k(v, k)
    mass = torch.as_tensor(mass, dtype=v.dtype, device=v.device).expand(v.shape[:-1])
    excess = values.cumsum(-1) - mass.unsqueeze(-1)
    ranks = torch.arange(1, values.shape[-1] + 1, dtype=v.dtype, device=v.device)
    # the support is a prefix of the sorted values: rho = #{i : u_i > (sum_{l<=i} u_l - mass) / i}
    rho = (values * ranks > excess).sum(-1, keepdim=True).clamp(min=1)
    theta = excess.gather(-1, rho - 1) / rho.to(v.dtype)
    p = torch.zeros_like(v).scatter(-1, index, (values - theta).clamp(min=0))
    return p, theta.squeeze(-1)


def top_k_relu(v: torch.Tensor, k: int) -> torch.Tensor:
    """``[v]_+`` on the k largest entries of ``v`` (..., n) along the last axis, 0 elsewhere."""
    values, index = top_k(v, k)
    return torch.zeros_like(v).scatter(-1, index, values.clamp(min=0))
