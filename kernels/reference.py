"""Pure-torch reference of the softmin primitive, blocked so that n x m is never held at once.

Notation (shapes with a leading batch ``B``): a cost block ``C`` of shape (B, r, L) holds r rows
of the cost matrix (or of its transpose), ``h`` (B, L) a potential on the reduced axis and ``w``
(B, L) non-negative weights on it. The primitive is

    softmin_eps(C, h, w)_i = -eps * log sum_j w_j exp((h_j - C_ij) / eps).

Two implementations live here:

* ``weighted_lse`` / ``block_*`` functions: plain differentiable torch on one block, used inside
  ``torch.utils.checkpoint`` by the geometry whenever gradients are needed. They never take the
  log of a weight, so zero weights give exact zeros and no NaN in the gradients.
* ``softmin_fused``: the no-grad hot path of the solvers. It writes each block into one reused
  buffer (fresh n x m temporaries cost page faults on every iteration) and clamps the shifted
  exponent at ``-EXP_FLOOR`` (float32 ``exp`` of arguments below about -87 produces denormals and
  runs an order of magnitude slower; the clamped terms are below 1e-35 of the row's largest term).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

#: Elements of one block (B * rows * L); 2**18 float64 values = 2 MiB, which stays in L2 cache.
BLOCK_ELEMENTS = 1 << 18
#: Lower clamp of the max-shifted exponent: exp(-80) is still a normal float32.
EXP_FLOOR = 80.0
#: Upper clamp of an exponent that is shifted by a max taken over positive weights only; it only
#: binds on zero-weight entries (whose product with the weight is 0 either way).
EXP_CEIL = 80.0


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
    if w is None:
        return torch.logsumexp(s, dim=dim)
    w = w.to(s.dtype)
    with torch.no_grad():
        shift = torch.where(w > 0, s, float("-inf")).amax(dim=dim, keepdim=True)
        shift = torch.nan_to_num(shift, neginf=0.0)
    e = torch.exp((s - shift).clamp(max=EXP_CEIL))
    return torch.log((e * w).sum(dim=dim)) + shift.squeeze(dim)


def block_softmin(cost: torch.Tensor, h: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Differentiable softmin of one block: (B, r, L), (B, L), (B, L) -> (B, r)."""
    return -eps * weighted_lse((h.unsqueeze(-2) - cost) / eps, None if w is None else w.unsqueeze(-2))


def block_kernel_apply(
    cost: torch.Tensor, f: torch.Tensor, g: torch.Tensor, w: torch.Tensor | None, v: torch.Tensor, eps: float
) -> torch.Tensor:
    """``sum_j w_j exp((f_i + g_j - C_ij)/eps) v_jk`` for one block.

    Shapes: cost (B, r, L), f (B, r), g (B, L), w (B, L), v (B, L, k) -> (B, r, k).
    """
    s = (f.unsqueeze(-1) + g.unsqueeze(-2) - cost) / eps
    ww = torch.ones_like(g) if w is None else w.to(s.dtype)
    with torch.no_grad():
        shift = torch.where(ww.unsqueeze(-2) > 0, s, float("-inf")).amax(dim=-1, keepdim=True)
        shift = torch.nan_to_num(shift, neginf=0.0)
    e = torch.exp((s - shift).clamp(max=EXP_CEIL)) * ww.unsqueeze(-2)
    return torch.exp(shift) * torch.matmul(e, v.to(s.dtype))


def block_kernel_cost(
    cost: torch.Tensor, f: torch.Tensor, g: torch.Tensor, w: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """``sum_j w_j exp((f_i + g_j - C_ij)/eps) C_ij`` for one block: (B, r, L) -> (B, r)."""
    s = (f.unsqueeze(-1) + g.unsqueeze(-2) - cost) / eps
    ww = torch.ones_like(g) if w is None else w.to(s.dtype)
    return (torch.exp(s) * ww.unsqueeze(-2) * cost).sum(-1)


FillBlock = Callable[[slice, torch.Tensor], torch.Tensor | None]


def softmin_fused(
    fill: FillBlock,
    n_out: int,
    n_red: int,
    batch: int,
    eps: float,
    dtype: torch.dtype,
    device: torch.device,
    reduce_dim: int = -1,
) -> torch.Tensor:
    """No-grad blocked softmin over reused buffers.

    ``fill(sl, buf)`` writes the scores ``s_ij = (h'_j - C_ij)/eps`` (``h' = h + eps log w``) of the
    outputs ``sl`` into ``buf``, shaped (B, len(sl), n_red) when ``reduce_dim == -1`` and
    (B, n_red, len(sl)) when ``reduce_dim == -2``; it may return a per-output offset (B, len(sl))
    that is added to the log-sum-exp (a row term taken out of the block). Returns (B, n_out).
    """
    out = torch.empty(batch, n_out, dtype=dtype, device=device)
    buffer = None
    for sl in row_blocks(n_out, n_red, batch):
        width = sl.stop - sl.start
        shape = (batch, width, n_red) if reduce_dim == -1 else (batch, n_red, width)
        numel = batch * width * n_red
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=device)
        buf = buffer[:numel].view(shape)
        offset = fill(sl, buf)
        top = buf.amax(dim=reduce_dim, keepdim=True)
        top = torch.nan_to_num(top, neginf=0.0)
        buf.sub_(top).clamp_min_(-EXP_FLOOR).exp_()
        lse = buf.sum(dim=reduce_dim).log_().add_(top.squeeze(reduce_dim))
        if offset is not None:
            lse.add_(offset)
        out[:, sl] = lse
    return out.mul_(-eps)
