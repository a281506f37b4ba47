"""Optimal transport on the line: W_p^p between weighted 1-D empirical measures by sorting.

For measures u = sum_i a_i delta_{u_i} and v = sum_j b_j delta_{v_j} of equal mass M,

    W_p^p(u, v) = int_0^M |F_u^{-1}(q) - F_v^{-1}(q)|^p dq,

where F^{-1} is the (left-continuous) quantile function. Both quantile functions are piecewise
constant on the merged grid of the two cumulative-weight sequences, so the integral is the finite
sum ``sum_k (q_k - q_{k-1}) |u_(i_k) - v_(j_k)|^p`` with i_k, j_k found by ``searchsorted``.
The merge itself is done by binary search too (no sort of the n + m grid points).
Time O((n + m) log(n + m)), memory O(n + m) per problem; every leading dimension is a batch.

The result is differentiable in the values (through the sort) and in the weights (through the
merged grid); the quantile indices are piecewise constant and carry no gradient.

References:
    [1] G. Peyré, M. Cuturi. Computational Optimal Transport, §2.6 (2019).
    [2] POT's ``ot.wasserstein_1d`` (Flamary et al., JMLR 2021), which uses the same merge.
"""

from __future__ import annotations

import math

import torch

from otcore._validation import _real, check_equal_mass, check_finite, mass_rtol


def check_p(value: float) -> float:
    """Raise unless the order ``p`` is a finite number >= 1; returns it as float."""
    v = _real("p", value, "a number >= 1")
    if not math.isfinite(v) or v < 1:
        raise ValueError(f"p must be finite and >= 1 (W_p is a distance only for p >= 1), got {value!r}")
    return v


def _pow(t: torch.Tensor, p: float) -> torch.Tensor:
    """|t|^p for t >= 0 with the cheapest op (abs / square / pow)."""
    return t if p == 1 else t.square() if p == 2 else t.pow(p)


def _take(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``src[..., idx]`` along the last dimension, leading dimensions broadcast (a plain gather:
    ``take_along_dim`` also wraps negative indices, which costs a pass here)."""
    lead = torch.broadcast_shapes(src.shape[:-1], idx.shape[:-1])
    return torch.gather(src.expand(*lead, src.shape[-1]), -1, idx.expand(*lead, idx.shape[-1]))


def quantile_cost(us: torch.Tensor, vs: torch.Tensor, cu: torch.Tensor, cv: torch.Tensor, p: float) -> torch.Tensor:
    """``int |F_u^{-1} - F_v^{-1}|^p`` from sorted values and their cumulative weights.

    The merged grid is never sorted: each point of one grid is placed among the other's by a
    binary search, which gives both its quantile indices and its predecessor on the merged grid
    (ties put u's point first). Each grid point q closes the interval (previous point, q], on which
    the quantile functions take the values at index ``first cumulative weight >= q``.

    Args:
        us: (..., n) values sorted ascending.
        vs: (..., m) values sorted ascending.
        cu: (..., n) cumulative weights aligned with ``us`` (leading dims broadcastable to those
            of ``us``, e.g. (1, n) for weights that do not depend on the order).
        cv: (..., m) cumulative weights aligned with ``vs``, as ``cu``.
        p: the order, >= 1.

    Returns:
        (...,) the integral over [0, max(cu[-1], cv[-1])].
    """
    n, m = us.shape[-1], vs.shape[-1]
    lead = torch.broadcast_shapes(cu.shape[:-1], cv.shape[:-1])
    cu, cv = cu.expand(*lead, n).contiguous(), cv.expand(*lead, m).contiguous()
    below_u = torch.searchsorted(cv.detach(), cu.detach())                   # (..., n) #{j: cv_j < cu_i}
    upto_v = torch.searchsorted(cu.detach(), cv.detach(), right=True)        # (..., m) #{i: cu_i <= cv_j}
    cu0, cv0 = (torch.nn.functional.pad(c, (1, 0)) for c in (cu, cv))      # a 0 in front
    # a grid point's predecessor: the larger of its own grid's previous point and the other's last below
    delta_u = cu - torch.maximum(cu0[..., :-1], _take(cv0, below_u))
    delta_v = cv - torch.maximum(cv0[..., :-1], _take(cu0, upto_v))
    # the quantile of v at cu_i is vs[below_u_i]; that of u at cv_j is us[upto_v_j] (when
    # cu[upto_v - 1] = cv_j, delta_v_j = 0 and the index does not matter); clamped at the end
    gap_u = us - _take(vs, below_u.clamp(max=m - 1))
    gap_v = _take(us, upto_v.clamp(max=n - 1)) - vs
    return (delta_u * _pow(gap_u.abs(), p)).sum(-1) + (delta_v * _pow(gap_v.abs(), p)).sum(-1)


def sorted_cumulative(w: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Cumulative weights in sorted order: (..., n) from weights (..., n) and the sort permutation.

    ``order=None`` means the weights do not depend on the order (uniform weights): the cumulative
    sum is then taken once, not per sorted row.
    """
    return (w if order is None else _take(w, order)).cumsum(-1)


def ot1d_cost(u: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor, p: float, *,
              uniform: tuple[bool, bool] = (False, False)) -> torch.Tensor:
    """W_p^p between already validated measures (no checks); the kernel of ``wasserstein_1d``.

    Args:
        u: (..., n) values.
        v: (..., m) values.
        a: (..., n) weights broadcastable against ``u`` (e.g. (B, 1, n) for values (B, L, n)).
        b: (..., m) weights of ``v``, as ``a``. Equal total masses.
        p: the order, >= 1.
        uniform: whether a / b are constant along their last dimension; the cumulative grid is
            then shared by all rows (no per-row gather, and for n = m a plain sorted difference).

    Returns:
        (...,) W_p^p (times the common mass when it is not 1).
    """
    us, iu = torch.sort(u, dim=-1)
    vs, iv = torch.sort(v, dim=-1)
    if all(uniform) and u.shape[-1] == v.shape[-1]:
        return (_pow((us - vs).abs(), p) * a).sum(-1)
    cu = sorted_cumulative(a, None if uniform[0] else iu)
    cv = sorted_cumulative(b, None if uniform[1] else iv)
    return quantile_cost(us, vs, cu, cv, p)


def _weights(name: str, w: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
    """Weights (..., n) for ``values`` (..., n): None means uniform 1/n; else validated."""
    n = values.shape[-1]
    if w is None:
        return torch.full((1,) * (values.dim() - 1) + (n,), 1.0 / n, dtype=values.dtype, device=values.device)
    if not torch.is_tensor(w) or not w.is_floating_point():
        raise ValueError(f"{name} must be a floating-point torch.Tensor or None, got {type(w).__name__}")
    try:
        torch.broadcast_shapes(w.shape, values.shape)
    except RuntimeError as err:
        raise ValueError(f"{name} has shape {tuple(w.shape)}, which does not broadcast with the values' "
                         f"{tuple(values.shape)}") from err
    if w.shape[-1] != n:
        raise ValueError(f"{name} has {w.shape[-1]} entries in its last dimension, the values have {n}")
    check_finite(name, w)
    if bool((w < 0).any()):
        raise ValueError(f"{name} has negative entries (min {float(w.min()):.3g}); weights must be >= 0")
    if bool((w.sum(-1) <= 0).any()):
        raise ValueError(f"{name} has zero total mass; at least one weight must be > 0")
    return w.to(values.dtype)


def wasserstein_1d(u: torch.Tensor, v: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None,
                   *, p: float = 1.0) -> torch.Tensor:
    """W_p^p between weighted 1-D empirical measures, batched over leading dimensions.

    Returns the p-th power (no root), as POT's ``ot.wasserstein_1d``: for measures of total
    mass M it is ``int_0^M |F_u^{-1} - F_v^{-1}|^p dq`` (M times W_p^p of the normalised measures).

    Args:
        u: (..., n) support of the first measure (any order).
        v: (..., m) support of the second, with leading dimensions that broadcast against u's.
        a: (..., n) non-negative weights of u broadcastable against u, or None (uniform 1/n).
        b: (..., m) weights of v, or None (uniform 1/m). Masses of a and b must agree.
        p: the order, >= 1.

    Returns:
        (...,) tensor, in the promoted dtype of u and v, differentiable in u, v, a and b.

    Raises:
        ValueError: non-tensor or empty values, non-finite values or weights, negative weights,
            weights whose shape does not match, unequal masses, p < 1.
    """
    p = check_p(p)
    for name, t in (("u", u), ("v", v)):
        if not torch.is_tensor(t) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point torch.Tensor, got {type(t).__name__}")
        if t.dim() == 0 or t.shape[-1] == 0:
            raise ValueError(f"{name} must have shape (..., n) with n >= 1, got {tuple(t.shape)}")
        check_finite(name, t)
    dtype = torch.promote_types(u.dtype, v.dtype)
    u, v = u.to(dtype), v.to(dtype)
    try:
        lead = torch.broadcast_shapes(u.shape[:-1], v.shape[:-1])
    except RuntimeError as err:
        raise ValueError(f"u and v have leading dimensions {tuple(u.shape[:-1])} and {tuple(v.shape[:-1])}, "
                         "which do not broadcast") from err
    u, v = u.expand(*lead, u.shape[-1]), v.expand(*lead, v.shape[-1])
    rtol = mass_rtol(dtype, *(w.dtype for w in (a, b) if torch.is_tensor(w) and w.is_floating_point()))
    wa, wb = _weights("a", a, u), _weights("b", b, v)
    masses_a, masses_b = (m.reshape(-1).tolist() for m in torch.broadcast_tensors(wa.sum(-1), wb.sum(-1)))
    check_equal_mass(masses_a, masses_b, rtol)
    return ot1d_cost(u, v, wa, wb, p, uniform=(a is None, b is None))
