"""Sparse projections, vectorised over every leading axis (columns, batches).

* ``top_k(v, k)``: the k largest entries on the last axis, with a deterministic tie rule.
* ``top_k_by_max(v, k, dim)``: the same selection by k passes of a maximum, for small k on a
  short axis (no sort, no host synchronisation).
* ``simplex_projection_sorted(values, mass)``: the sort-based Euclidean projection onto the
  simplex of values already sorted in descending order (Duchi et al. 2008).
* ``sparse_simplex_projection(v, k, mass)``: the Euclidean projection of v onto
  ``{p >= 0, sum p = mass, |p|_0 <= k}``: keep the top k entries, then project them onto the
  simplex (Kyrillidis et al. 2013, Prop. 1).

Ties: among entries tied at the k-th largest value, those of lower index are kept (the same rule
as a stable descending sort; tied entries that are kept get equal shares). Every function is
differentiable almost everywhere by autograd (the selection is held fixed).

References:
    Kyrillidis, Becker, Cevher, Koch, "Sparse projections onto the simplex", ICML 2013.
    Duchi, Shalev-Shwartz, Singer, Chandra, "Efficient projections onto the l1-ball", ICML 2008.
    Condat, "Fast projection onto the simplex and the l1 ball", Math. Programming 2016.
    Liu, Puigcerver, Blondel, "Sparsity-constrained optimal transport", ICLR 2023.
"""

from __future__ import annotations

import math

import torch


def top_k(v: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``min(k, n)`` largest entries of ``v`` (..., n) in descending order, and their indices.

    Among entries tied at the k-th value, the lower indices are kept. A (stable) sort for k >= n.
    For k < n on the CPU, one ``torch.topk`` of k + 1 entries: when the k-th and (k + 1)-th
    differ in every row (the usual case), its top k are the answer. Otherwise, and always on
    other devices (where reading that flag would synchronise with the host), the tie rule is
    applied exactly by a second ``torch.topk`` over the entries above the k-th value and the
    first tied ones (a cumulative count over each row). Equal values within the top k come in
    ``torch.topk``'s order.
    Returns values and int64 indices, (..., min(k, n)).
    """
    n = v.shape[-1]
    if k >= n:
        return torch.sort(v, dim=-1, descending=True, stable=True)
    if v.device.type == "cpu":
        values, index = torch.topk(v, k + 1, dim=-1)
        if bool((values[..., k - 1] > values[..., k]).all()):  # no tie across the k-th place
            return values[..., :k], index[..., :k]
        kth = values[..., k - 1:k]
    else:
        kth = torch.topk(v, k, dim=-1).values[..., -1:]
    above, tied = v > kth, v == kth
    keep = above | (tied & (tied.cumsum(-1) <= k - above.sum(-1, keepdim=True)))
    return torch.topk(torch.where(keep, v, -math.inf), k, dim=-1)


def top_k_by_max(
    v: torch.Tensor, k: int, *, dim: int = -1, scratch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``top_k`` along ``dim`` by k passes of a maximum: values and indices with ``dim`` of size k.

    Each pass takes the largest remaining entry of lowest index (the tie rule of ``top_k``), then
    masks it. A pass is four vectorised elementwise operations and reductions (maximum,
    comparison, key, minimum), no index-returning reduction: on a short axis (the experts of a
    router) and for small k, several times faster than ``torch.topk`` or ``torch.max``. No host
    synchronisation, no data-dependent control flow. ``v`` must be finite (the masked entries are set to -inf); k <= v.shape[dim].

    ``scratch``: for calls in a loop, a tensor of v's shape (float32 at least, not v) reused for
    the keys, and v itself is then masked in place (overwritten with -inf at the first k - 1
    maximisers; v must not require grad): fresh memory at every pass costs page faults that
    take longer than the passes. Without it, v is left as it is.
    """
    dim = dim % v.dim()
    n = v.shape[dim]
    # keys in float32 at least: position + n is exact there for n < 2**23
    position = torch.arange(n, dtype=torch.promote_types(v.dtype, torch.float32), device=v.device)
    position = position.view((n,) + (1,) * (v.dim() - dim - 1))
    work = v.detach() if scratch is not None or k == 1 else v.detach().clone()
    key = torch.empty_like(work, dtype=position.dtype) if scratch is None else scratch
    values, index = [], []
    for i in range(k):
        best = work.amax(dim, keepdim=True)
        # key: the position where the entry is the maximum, position + n below it; its minimum is
        # the first maximiser
        torch.gt(best, work, out=key)
        first = torch.add(position, key, alpha=n, out=key).amin(dim, keepdim=True).long()
        values.append(v.gather(dim, first) if v.requires_grad else best)
        index.append(first)
        if i < k - 1:
            work.scatter_(dim, first, -math.inf)
    if k == 1:
        return values[0], index[0]
    return torch.cat(values, dim), torch.cat(index, dim)


def simplex_projection_sorted(
    values: torch.Tensor, mass: torch.Tensor | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Project ``values`` (..., k), sorted in descending order on the last axis, onto the simplex
    ``{p >= 0, sum p = mass}``: ``p = max(values - theta, 0)``.

    Args:
        values: (..., k) real tensor, non-increasing along the last axis.
        mass: (...) or a float, >= 0; mass 0 projects to 0.

    Returns:
        ``(p, theta)``: (..., k) and (...).
    """
    mass = mass.unsqueeze(-1) if torch.is_tensor(mass) else mass
    if values.shape[-1] == 1:  # one entry: all the mass
        p = mass.expand(values.shape) if torch.is_tensor(mass) else torch.full_like(values, mass)
        return p, (values - mass).squeeze(-1)
    ranks = torch.arange(1, values.shape[-1] + 1, dtype=values.dtype, device=values.device)
    # the support is a prefix of the sorted values, and theta the largest of the thresholds
    # (sum_{l<=i} u_l - mass) / i of the prefixes (Condat 2016, Sec. 2)
    theta = ((values.cumsum(-1) - mass) / ranks).amax(-1, keepdim=True)
    return (values - theta).clamp(min=0), theta.squeeze(-1)


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
    p, theta = simplex_projection_sorted(values, mass)
    return torch.zeros_like(v).scatter(-1, index, p), theta

