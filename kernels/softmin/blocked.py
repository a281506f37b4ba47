"""The pure-torch path of the softmin primitive, blocked so that n x m is never held at once.

Notation (shapes with a leading batch ``B``): a cost block ``C`` of shape (B, r, L) holds r rows
of the cost matrix (or of its transpose), ``h`` (B, L) a potential on the reduced axis and ``w``
(B, L) non-negative weights on it. The primitive is

    softmin_eps(C, h, w)_i = -eps * log sum_j w_j exp((h_j - C_ij) / eps).

Two implementations live here:

* ``weighted_lse`` / ``block_*`` functions: plain differentiable torch on one block, used inside
  ``torch.utils.checkpoint`` by the geometry whenever gradients are needed. They never take the
  log of a weight, so zero weights give exact zeros and no NaN in the gradients.
* ``blocked_map`` with ``lse_`` / ``exp_matmul_``: the no-grad hot path of the solvers. Each
  block is written into reused ``Buffers`` (fresh n x m temporaries cost page faults on every
  iteration) and reduced in place; the max-shifted exponent is clamped at ``-EXP_FLOOR`` (float32
  ``exp`` of arguments below about -87 produces denormals and runs an order of magnitude slower;
  the clamped terms are below 1e-35 of the row's largest term).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

#: Elements of one block (B * rows * L); 2**18 float64 values = 2 MiB, which stays in L2 cache.
BLOCK_ELEMENTS = 1 << 18
#: On GPUs a block is one batch of kernel launches: larger blocks amortise the launches.
GPU_BLOCK_ELEMENTS = 1 << 24
#: Lower clamp of the max-shifted exponent: exp(-80) is still a normal float32.
EXP_FLOOR = 80.0
#: Upper clamp of an exponent that is shifted by a max taken over positive weights only; it only
#: binds on zero-weight entries (whose product with the weight is 0 either way), whose derivative
#: in the weight it bounds: exp(40) ~ 2e17 leaves float32 room for the backward's factors (1/eps,
#: cotangents) where exp(80) overflowed.
EXP_CEIL = 40.0


def block_elements(device: torch.device) -> int:
    """Elements per block on ``device``."""
    return BLOCK_ELEMENTS if device.type == "cpu" else GPU_BLOCK_ELEMENTS


def row_blocks(n_rows: int, row_len: int, batch: int, block_elements: int = BLOCK_ELEMENTS) -> Iterator[slice]:
    """Slices of ``range(n_rows)`` so that ``batch * rows * row_len`` is about ``block_elements``."""
    rows = max(1, block_elements // max(1, batch * row_len))
    for start in range(0, n_rows, rows):
        yield slice(start, min(n_rows, start + rows))


def log_weights(w: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``log w`` (``-inf`` where w = 0); zeros of ``like``'s shape and dtype when ``w`` is None."""
    if w is None:
        return torch.zeros_like(like)
    return torch.log(w.to(like.dtype))


def weighted_lse(s: torch.Tensor, w: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """``log sum_j w_j exp(s_j)`` along ``dim``, stable and differentiable in ``s`` and ``w``.

    Args:
        s: scores, any shape.
        w: non-negative weights broadcastable to ``s`` (None = all ones).
        dim: reduced dimension.
    """
    w = None if w is None else w.to(s.dtype)
    with torch.no_grad():
        shift = (s if w is None else torch.where(w > 0, s, float("-inf"))).amax(dim=dim, keepdim=True)
        shift = torch.nan_to_num(shift, neginf=0.0)
    # exponents below -EXP_FLOOR give exact zeros (lost next to the row's largest term, 1): an
    # exponential that underflows takes a slow path, 10 to 40 times slower on a CPU
    x = s - shift
    e = torch.exp(x.clamp(min=-EXP_FLOOR, max=EXP_CEIL)) * (x > -EXP_FLOOR)
    return torch.log((e if w is None else e * w).sum(dim=dim)) + shift.squeeze(dim)


def centred_lse(s: torch.Tensor, w: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """``log sum_j w_j exp(s_j)`` accurate to the last bits of the scores' spread.

    When the scores of a row lie within a few units of each other (eps far above the costs'
    range), ``exp(s_j - top)`` is 1 minus a small number that rounding erases: ``weighted_lse``
    then loses the potentials' variation (its absolute error u, the unit roundoff, is eps * u in
    the softmin). Here ``log sum_j w_j exp(s_j) = top + log W + log1p(sum_j w_j expm1(s_j - top) / W)``
    with ``W = sum_j w_j`` keeps it: every term is computed relative to its own size. Rows whose
    terms fall far below the top (weighted mean of exp(s_j - top) under 1/8) take
    ``weighted_lse``, which is exact for them. Same arguments as ``weighted_lse``.
    """
    ones = w is None
    w = torch.ones((), dtype=s.dtype, device=s.device) if ones else w.to(s.dtype)
    with torch.no_grad():
        top = torch.nan_to_num(torch.where(w > 0, s, float("-inf")).amax(dim=dim, keepdim=True), neginf=0.0)
    mass = torch.full_like(top.squeeze(dim), s.shape[dim]) if ones else w.sum(dim=dim)
    ratio = (torch.expm1((s - top).clamp(max=EXP_CEIL)) * w).sum(dim=dim) / mass
    far = ratio < -7 / 8
    lse = top.squeeze(dim) + torch.log(mass) + torch.log1p(ratio.clamp(min=-7 / 8))
    if bool(far.any()):
        lse = torch.where(far, weighted_lse(s, None if ones else w, dim), lse)
    return lse


def block_softmin(
    cost: torch.Tensor, h: torch.Tensor, w: torch.Tensor | None, eps: float, centred: bool = False
) -> torch.Tensor:
    """Differentiable softmin of one block: (B, r, L), (B, L), (B, L) -> (B, r).

    ``centred`` computes the log-sum-exp with ``centred_lse`` (for eps above the costs' range).
    """
    lse = centred_lse if centred else weighted_lse
    return -eps * lse((h.unsqueeze(-2) - cost) / eps, None if w is None else w.unsqueeze(-2))


def block_softmin_grad(
    cost: torch.Tensor, h: torch.Tensor, w: torch.Tensor | None, grad_out: torch.Tensor, eps: float,
    wanted: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The vector-Jacobian product of ``block_softmin`` in closed form: (grad h, grad w, grad cost).

    With e_ij = exp(s_ij - t_i), s = (h_j - C_ij)/eps, t_i the row's largest s over positive
    weights, Z_i = sum_j w_j e_ij and pi_ij = w_j e_ij / Z_i (each row sums to 1), the softmin
    out_i = -eps (t_i + log Z_i) has d out_i / d h_j = -pi_ij, d out_i / d C_ij = pi_ij and
    d out_i / d w_j = -eps e_ij / Z_i. The exponent is clamped and its underflowing terms zeroed
    exactly as in ``weighted_lse``, so the result is the autograd gradient of ``block_softmin``
    (non-centred) at a third of its passes over the block.

    Args:
        cost: (B, r, L) block of costs; h (B, L); w (B, L) or None; grad_out (B, r).
        wanted: whether the gradients in (h, w, cost) are needed (None where not).
    """
    need_h, need_w, need_cost = wanted
    s = torch.add(h.unsqueeze(-2) / eps, cost, alpha=-1.0 / eps)
    ww = None if w is None else w.to(s.dtype).unsqueeze(-2)
    top = (s if ww is None else torch.where(ww > 0, s, float("-inf"))).amax(dim=-1, keepdim=True)
    s.sub_(torch.nan_to_num(top, neginf=0.0))
    kept = s > -EXP_FLOOR
    e = s.clamp_(min=-EXP_FLOOR, max=EXP_CEIL).exp_().mul_(kept)
    pe = e if ww is None else e * ww
    coef = (grad_out / pe.sum(dim=-1)).unsqueeze(-2)  # (B, 1, r): G_i / Z_i
    grad_h = -torch.matmul(coef, pe).squeeze(-2) if need_h else None
    grad_w = -eps * torch.matmul(coef, e).squeeze(-2) if need_w else None
    grad_cost = pe.mul_(coef.mT) if need_cost else None
    return grad_h, grad_w, grad_cost


def weighted_exp(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``w * exp(t)`` (broadcast), with the weight joined into the exponent where it is positive
    (exp(t) alone may overflow where the product does not) and exact zeros where it is 0, whose
    derivative in the weight, exp(t), is kept finite by clamping t at ``EXP_CEIL``."""
    positive = w > 0
    inside = torch.where(positive, t + torch.log(torch.where(positive, w, 1.0)), float("-inf")).exp()
    return torch.where(positive, inside, w * torch.exp(t.clamp(max=EXP_CEIL)))


def _shifted_kernel(cost, f, g, w, eps):
    """``(w_j exp(s_ij - t_i), t_i)`` with s = (f_i + g_j - C_ij)/eps and t_i the row's largest s
    over positive weights (zero-weight exponents clamped at ``EXP_CEIL``): (B, r, L), (B, r)."""
    s = (f.unsqueeze(-1) + g.unsqueeze(-2) - cost) / eps
    ww = torch.ones_like(g) if w is None else w.to(s.dtype)
    with torch.no_grad():
        shift = torch.where(ww.unsqueeze(-2) > 0, s, float("-inf")).amax(dim=-1, keepdim=True)
        shift = torch.nan_to_num(shift, neginf=0.0)
    return torch.exp((s - shift).clamp(max=EXP_CEIL)) * ww.unsqueeze(-2), shift.squeeze(-1)


def _row_factor(shift: torch.Tensor, a: torch.Tensor | None) -> torch.Tensor:
    return torch.exp(shift) if a is None else weighted_exp(shift, a.to(shift.dtype))


def block_kernel_apply(
    cost: torch.Tensor, f: torch.Tensor, a: torch.Tensor | None, g: torch.Tensor, w: torch.Tensor | None,
    v: torch.Tensor, eps: float,
) -> torch.Tensor:
    """``a_i sum_j w_j exp((f_i + g_j - C_ij)/eps) v_jk`` for one block (``a`` None: no a_i).

    Shapes: cost (B, r, L), f (B, r), a (B, r), g (B, L), w (B, L), v (B, L, k) -> (B, r, k).
    Zero row weights give exact zeros (``weighted_exp``), however large the row's exponents.
    """
    e, shift = _shifted_kernel(cost, f, g, w, eps)
    return _row_factor(shift, a).unsqueeze(-1) * torch.matmul(e, v.to(e.dtype))


def block_kernel_cost(
    cost: torch.Tensor, f: torch.Tensor, a: torch.Tensor | None, g: torch.Tensor, w: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """``a_i sum_j w_j exp((f_i + g_j - C_ij)/eps) C_ij`` for one block: (B, r, L) -> (B, r)."""
    e, shift = _shifted_kernel(cost, f, g, w, eps)
    return _row_factor(shift, a) * (e * cost).sum(-1)


class Buffers:
    """Reusable scratch storage for block computations (fresh n x m temporaries page-fault)."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self._store: list[torch.Tensor] = []

    def get(self, index: int, shape: tuple[int, ...]) -> torch.Tensor:
        numel = 1
        for size in shape:
            numel *= size
        while len(self._store) <= index:
            self._store.append(torch.empty(0, dtype=self.dtype, device=self.device))
        if self._store[index].numel() < numel:
            self._store[index] = torch.empty(numel, dtype=self.dtype, device=self.device)
        return self._store[index][:numel].view(shape)


def blocked_map(
    block_fn: Callable[[slice, Buffers], torch.Tensor], n_out: int, n_red: int, batch: int,
    dtype: torch.dtype, device: torch.device,
) -> torch.Tensor:
    """Concatenate ``block_fn(rows, buffers)`` (B, r, ...) over row blocks (no grad)."""
    buffers = Buffers(dtype, device)
    blocks = row_blocks(n_out, n_red, batch, block_elements(device))
    return torch.cat([block_fn(sl, buffers) for sl in blocks], dim=1)


def lse_(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """log-sum-exp of ``scores`` along ``dim``, destroying ``scores`` (shifted, clamped, exp'd)."""
    top = torch.nan_to_num(scores.amax(dim=dim, keepdim=True), neginf=0.0)
    scores.sub_(top).clamp_min_(-EXP_FLOOR).exp_()
    return scores.sum(dim=dim).log_().add_(top.squeeze(dim))


def exp_matmul_(scores: torch.Tensor, v: torch.Tensor, dim: int, row: torch.Tensor) -> torch.Tensor:
    """``sum_j exp(row_i + s_ij) v_jk`` along ``dim`` (-1: s is (B, r, L); -2: (B, L, r)), destroying s.

    ``row`` (B, r) joins the exponent before anything is exponentiated: exp(row) and the row's
    largest exp(s) may each overflow or underflow where their product does not.
    """
    top = torch.nan_to_num(scores.amax(dim=dim, keepdim=True), neginf=0.0)
    e = scores.sub_(top).clamp_min_(-EXP_FLOOR).exp_()
    e = e if dim == -1 else e.mT
    return torch.matmul(e, v.to(e.dtype)) * torch.exp(top.squeeze(dim) + row).unsqueeze(-1)


def column_lse(C: torch.Tensor, h: torch.Tensor, inv_eps: float, buffers: Buffers) -> torch.Tensor:
    """``log sum_i exp(h_i - C_ij * inv_eps)`` for every column j of a dense C (B, n, m) -> (B, m).

    Streams over contiguous blocks of rows with a running (max, sum) per column, so the reduction
    runs along C's memory order (a strided column reduction is several times slower).
    """
    B, n, m = C.shape
    top = torch.full((B, 1, m), float("-inf"), dtype=buffers.dtype, device=buffers.device)
    total = torch.zeros(B, 1, m, dtype=buffers.dtype, device=buffers.device)
    for rows in row_blocks(n, m, B, block_elements(buffers.device)):
        buf = buffers.get(0, (B, rows.stop - rows.start, m))
        torch.add(h[:, rows].unsqueeze(-1), C[:, rows], alpha=-inv_eps, out=buf)
        new_top = torch.maximum(top, buf.amax(dim=1, keepdim=True))
        safe = torch.nan_to_num(new_top, neginf=0.0)
        total.mul_(torch.exp(top - safe).nan_to_num_(nan=0.0))
        buf.sub_(safe).clamp_min_(-EXP_FLOOR).exp_()
        total.add_(buf.sum(dim=1, keepdim=True))
        top = new_top
    return total.log_().add_(torch.nan_to_num(top, neginf=0.0)).squeeze(1)
