"""Triton kernels of the softmin primitive: a streaming log-sum-exp and plan products, tiled.

For a batch of cost matrices C (B, n, m), each program owns BLOCK_M rows and streams over the
columns in tiles of BLOCK_N (both autotuned on GPUs), so no more than a (BLOCK_M, BLOCK_N) tile
of C ever exists:

* ``lse``:   lse_i = log sum_j exp(S_j - C_ij / eps)                     (running max and sum)
* ``apply``: out_i  = sum_j exp(min(S_j - C_ij / eps - L_i, ceil)) k_ij V_j     (B, n, k)
             rows_i = sum_j exp(min(S_j - C_ij / eps - L_i, ceil)) k_ij R_j     (B, n)

with k_ij = 1, C_ij or dC/d(a_i) / (a_i - b_j) (``COEF_*``). Reducing over rows instead (the
g-update) is the same call on the transposed geometry: swapped point clouds, or C^T as a
strided view. The cost tile is either

* read from a dense C (any strides), or
* recomputed from points a (B, n, d), b (B, m, d) as |a_i|^2 + |b_j|^2 - 2 a_i.b_j, clamped at 0
  (``COST_SQEUCLIDEAN``), or its square root (``COST_EUCLIDEAN``). The dot product runs on the
  tensor cores for d >= 16 (TF32 when ``torch.get_float32_matmul_precision() != "highest"``;
  half inputs natively), and as rank-1 updates on the FMA units for d < 16.

Accumulation is float32 for float32/float16/bfloat16 inputs and float64 for float64 inputs
(the dtype of ``S``). ``naive.py`` holds the oracle these kernels are tested
against. References: Dao et al., "FlashAttention", NeurIPS 2022 (online softmax tiling);
Feydy, "Geometric data analysis, beyond convolutions" (KeOps online reductions), 2020.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..availability import interpreting
from ..codes import COST_DENSE


def _tile_configs() -> list[triton.Config]:
    """Tile shapes the autotuner tries on a GPU (re-tuned per (n, m, d)); one under the interpreter."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64})]
    shapes = [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3), (128, 128, 8, 2), (32, 64, 4, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in shapes]

#: Widths below this (point dimension d, columns k of V) use FMA rank-1 updates instead of tl.dot.
MIN_DOT = 16
#: Largest chunk of d (or of the columns of V) one tl.dot covers.
MAX_CHUNK = 64


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


@triton.jit
def _exact_bf16(t, ACC: tl.constexpr):
    """bfloat16 operands as their exact float32 values (products and sums are then those of a
    bfloat16 MMA with float32 accumulation): Triton's interpreter multiplies bfloat16 wrongly."""
    if t.dtype == tl.bfloat16:
        t = t.to(ACC)
    return t


@triton.jit
def _cost_tile(
    A, Bp, SQA, SQB, pid_b, offs_m, offs_n, mask_m, mask_n, d,
    s_ab, s_ai, s_ak, s_bb, s_bj, s_bk, s_qa, s_qb,
    COST: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, SMALL_D: tl.constexpr, PRECISION: tl.constexpr, EXACT_BF16: tl.constexpr,
):
    """The (BLOCK_M, BLOCK_N) tile C[pid_b, offs_m, offs_n] in the accumulation dtype."""
    if COST == 0:  # COST_DENSE: A is C with strides (batch, row, column)
        ptrs = A + pid_b * s_ab + offs_m[:, None] * s_ai + offs_n[None, :] * s_ak
        c = tl.load(ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(ACC)
    else:
        a_rows = A + pid_b * s_ab + offs_m * s_ai
        b_rows = Bp + pid_b * s_bb + offs_n * s_bj
        dot = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        if SMALL_D:  # BLOCK_D == d: rank-1 updates
            for k in tl.static_range(BLOCK_D):
                ak = tl.load(a_rows + k * s_ak, mask=mask_m, other=0.0).to(ACC)
                bk = tl.load(b_rows + k * s_bk, mask=mask_n, other=0.0).to(ACC)
                dot += ak[:, None] * bk[None, :]
        else:
            offs_d = tl.arange(0, BLOCK_D)
            for k0 in range(0, d, BLOCK_D):
                mask_d = (k0 + offs_d) < d
                at = tl.load(a_rows[:, None] + (k0 + offs_d)[None, :] * s_ak,
                             mask=mask_m[:, None] & mask_d[None, :], other=0.0)
                bt = tl.load(b_rows[:, None] + (k0 + offs_d)[None, :] * s_bk,
                             mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                if EXACT_BF16:
                    at, bt = _exact_bf16(at, ACC), _exact_bf16(bt, ACC)
                dot = tl.dot(at, tl.trans(bt), dot, input_precision=PRECISION, out_dtype=ACC)
        sqa = tl.load(SQA + pid_b * s_qa + offs_m, mask=mask_m, other=0.0)
        sqb = tl.load(SQB + pid_b * s_qb + offs_n, mask=mask_n, other=0.0)
        c = tl.maximum(sqa[:, None] + sqb[None, :] - 2.0 * dot, 0.0)
        if COST == 2:  # COST_EUCLIDEAN
            c = tl.sqrt(c)
    return c


@triton.jit
def _score_tile(
    A, Bp, SQA, SQB, S, pid_b, n0, offs_m, mask_m, m, d, inv_eps,
    s_ab, s_ai, s_ak, s_bb, s_bj, s_bk, s_qa, s_qb, s_sb,
    COST: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, SMALL_D: tl.constexpr, PRECISION: tl.constexpr, EXACT_BF16: tl.constexpr,
):
    """Columns n0 .. n0 + BLOCK_N of the row block: (s_j - C_ij / eps, C_ij, offs_n, mask_n)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < m
    c = _cost_tile(A, Bp, SQA, SQB, pid_b, offs_m, offs_n, mask_m, mask_n, d,
                   s_ab, s_ai, s_ak, s_bb, s_bj, s_bk, s_qa, s_qb,
                   COST, ACC, BLOCK_M, BLOCK_N, BLOCK_D, SMALL_D, PRECISION, EXACT_BF16)
    s = tl.load(S + pid_b * s_sb + offs_n, mask=mask_n, other=float("-inf"))
    return s[None, :] - c * inv_eps, c, offs_n, mask_n


@triton.autotune(configs=_tile_configs(), key=["n", "m", "d"])
@triton.jit
def _lse_kernel(
    A, Bp, SQA, SQB, S, INV_EPS, OUT, n, m, d,
    s_ab, s_ai, s_ak, s_bb, s_bj, s_bk, s_qa, s_qb, s_sb, s_ob,
    COST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SMALL_D: tl.constexpr, PRECISION: tl.constexpr, EXACT_BF16: tl.constexpr,
):
    pid_m, pid_b = tl.program_id(0), tl.program_id(1)
    ACC = S.dtype.element_ty
    inv_eps = tl.load(INV_EPS)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    run_max = tl.full([BLOCK_M], float("-inf"), ACC)
    run_sum = tl.zeros([BLOCK_M], ACC)
    for n0 in range(0, m, BLOCK_N):
        score, _, _, _ = _score_tile(
            A, Bp, SQA, SQB, S, pid_b, n0, offs_m, mask_m, m, d, inv_eps,
            s_ab, s_ai, s_ak, s_bb, s_bj, s_bk, s_qa, s_qb, s_sb,
            COST, ACC, BLOCK_M, BLOCK_N, BLOCK_D, SMALL_D, PRECISION, EXACT_BF16)
        new_max = tl.maximum(run_max, tl.max(score, 1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # all -inf so far: nothing to shift
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(score - shift[:, None]), 1)
        run_max = new_max
    lse = tl.log(run_sum) + tl.where(run_max == float("-inf"), 0.0, run_max)
    tl.store(OUT + pid_b * s_ob + offs_m, lse, mask=mask_m)


@triton.autotune(configs=_tile_configs(), key=["n", "m", "d", "k"])
@triton.jit
def _apply_kernel(
    A, Bp, SQA, SQB, S, L, V, R, INV_EPS, OUT, ROWS, n, m, d, k, ceil,
    s_ab, s_ai, s_ak, s_bb, s_bj, s_bk, s_qa, s_qb, s_sb, s_lb, s_vb, s_vj, s_vk, s_rb, s_ob, s_oi, s_wb,
    COST: tl.constexpr, COEF: tl.constexpr, HAS_V: tl.constexpr, HAS_R: tl.constexpr, WANT_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SMALL_D: tl.constexpr,
    BLOCK_V: tl.constexpr, SMALL_V: tl.constexpr, PRECISION: tl.constexpr, V_PRECISION: tl.constexpr,
    EXACT_BF16: tl.constexpr,
):
    pid_m, pid_v, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ACC = S.dtype.element_ty
    inv_eps = tl.load(INV_EPS)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < k
    row_shift = tl.load(L + pid_b * s_lb + offs_m, mask=mask_m, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_V], ACC)
    rows = tl.zeros([BLOCK_M], ACC)
    for n0 in range(0, m, BLOCK_N):
        score, c, offs_n, mask_n = _score_tile(
            A, Bp, SQA, SQB, S, pid_b, n0, offs_m, mask_m, m, d, inv_eps,
            s_ab, s_ai, s_ak, s_bb, s_bj, s_bk, s_qa, s_qb, s_sb,
            COST, ACC, BLOCK_M, BLOCK_N, BLOCK_D, SMALL_D, PRECISION, EXACT_BF16)
        w = tl.exp(tl.minimum(score - row_shift[:, None], ceil))
        if COEF == 1:  # COEF_COST
            w = w * c
        if COEF == 2:  # COEF_DCOST
            if COST == 2:  # COST_EUCLIDEAN: d|a - b| / da = (a - b) / |a - b|, and 0 at a = b
                w = w * tl.where(c > 0.0, 1.0 / tl.where(c > 0.0, c, 1.0), 0.0)
            else:  # d|a - b|^2 / da = 2 (a - b)
                w = w * 2.0
        if WANT_ROWS:
            if HAS_R:
                r = tl.load(R + pid_b * s_rb + offs_n, mask=mask_n, other=0.0).to(ACC)
                rows += tl.sum(w * r[None, :], 1)
            else:
                rows += tl.sum(w, 1)
        if HAS_V:
            v_ptrs = V + pid_b * s_vb + offs_n[:, None] * s_vj + offs_v[None, :] * s_vk
            if SMALL_V:  # k < MIN_DOT: one reduction per column of V
                for t in tl.static_range(BLOCK_V):  # columns t >= k (padding) repeat the last one
                    col_t = tl.minimum(t, k - 1)
                    vt = tl.load(V + pid_b * s_vb + offs_n * s_vj + col_t * s_vk, mask=mask_n, other=0.0).to(ACC)
                    part = tl.sum(w * vt[None, :], 1)
                    acc = tl.where(tl.arange(0, BLOCK_V)[None, :] == t, acc + part[:, None], acc)
            else:
                vt = tl.load(v_ptrs, mask=mask_n[:, None] & mask_v[None, :], other=0.0)
                wt = w.to(vt.dtype)
                if EXACT_BF16:
                    wt, vt = _exact_bf16(wt, ACC), _exact_bf16(vt, ACC)
                acc = tl.dot(wt, vt, acc, input_precision=V_PRECISION, out_dtype=ACC)
    if HAS_V:
        out_ptrs = OUT + pid_b * s_ob + offs_m[:, None] * s_oi + offs_v[None, :]
        tl.store(out_ptrs, acc, mask=mask_m[:, None] & mask_v[None, :])
    if WANT_ROWS and pid_v == 0:
        tl.store(ROWS + pid_b * s_wb + offs_m, rows, mask=mask_m)


def _geometry_args(a: torch.Tensor, b: torch.Tensor | None, cost: int, acc: torch.dtype):
    """Shapes, squared norms, strides and the d-tiling of the cost operands.

    ``a`` is the dense cost (B, n, m) when ``cost == COST_DENSE`` (``b`` unused), else the
    points (B, n, d) whose rows are the outputs and ``b`` (B, m, d) the reduced points.
    """
    if cost == COST_DENSE:
        B, n, m = a.shape
        sq = torch.zeros(1, 1, dtype=acc, device=a.device)
        strides = (*a.stride(), 0, 0, 0, 0, 0)
        return (B, n, m, 1), (a, a, sq, sq), strides, {"BLOCK_D": 1, "SMALL_D": True}
    B, n, d = a.shape
    m = b.shape[1]
    sqa, sqb = a.to(acc).pow(2).sum(-1), b.to(acc).pow(2).sum(-1)
    strides = (*a.stride(), *b.stride(), sqa.stride(0), sqb.stride(0))
    small = d < MIN_DOT
    block_d = d if small else min(triton.next_power_of_2(d), MAX_CHUNK)
    return (B, n, m, d), (a, b, sqa, sqb), strides, {"BLOCK_D": block_d, "SMALL_D": small}


def _inv_eps(eps: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """1/eps as a one-element tensor (a Python float would reach the kernel as float32)."""
    return torch.full((1,), 1.0 / eps, dtype=dtype, device=device)


def lse(a: torch.Tensor, b: torch.Tensor | None, s: torch.Tensor, eps: float, cost: int) -> torch.Tensor:
    """``lse_i = log sum_j exp(s_j - C_ij / eps)``: (B, n) in ``s``'s dtype.

    Args:
        a, b: the cost operands (see ``_geometry_args``).
        s: (B, m) scores on the reduced axis (float32, or float64 for float64 operands).
        eps: regularisation.
        cost: ``COST_DENSE``, ``COST_SQEUCLIDEAN`` or ``COST_EUCLIDEAN``.
    """
    (B, n, m, d), ops, strides, tiling = _geometry_args(a, b, cost, s.dtype)
    out = torch.empty(B, n, dtype=s.dtype, device=s.device)
    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]), B)

    _lse_kernel[grid](
        *ops, s, _inv_eps(eps, s.dtype, s.device), out, n, m, d, *strides, s.stride(0), out.stride(0),
        COST=cost, PRECISION=_dot_precision(a.dtype), EXACT_BF16=interpreting(),
        **tiling,
    )
    return out


def apply(
    a: torch.Tensor, b: torch.Tensor | None, s: torch.Tensor, l: torch.Tensor, v: torch.Tensor | None,
    r: torch.Tensor | None, eps: float, cost: int, coef: int, ceil: float, want_rows: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plan-like products ``(out, rows)`` of the module docstring.

    Shapes: s (B, m), l (B, n), v (B, m, k) or None, r (B, m) or None (= ones). Returns out
    (B, n, k) (k = 0 without ``v``) and rows (B, n) (zeros unless ``want_rows``), in ``s``'s dtype.
    """
    (B, n, m, d), ops, strides, tiling = _geometry_args(a, b, cost, s.dtype)
    acc = s.dtype
    k = 0 if v is None else v.shape[-1]
    out = torch.empty(B, n, k, dtype=acc, device=s.device)
    rows = torch.zeros(B, n, dtype=acc, device=s.device)
    small_v = k < MIN_DOT
    block_v = triton.next_power_of_2(max(k, 1)) if small_v else min(triton.next_power_of_2(k), MAX_CHUNK)
    v_arg = s if v is None else v
    v_strides = (0, 0, 0) if v is None else v.stride()
    r_arg = s if r is None else r
    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]), 1 if small_v else triton.cdiv(k, block_v), B)

    _apply_kernel[grid](
        *ops, s, l, v_arg, r_arg, _inv_eps(eps, acc, s.device), out, rows, n, m, d, k, ceil,
        *strides, s.stride(0), l.stride(0), *v_strides, 0 if r is None else r.stride(0),
        out.stride(0), out.stride(1), rows.stride(0),
        COST=cost, COEF=coef, HAS_V=v is not None, HAS_R=r is not None, WANT_ROWS=want_rows,
        BLOCK_V=block_v, SMALL_V=small_v,
        PRECISION=_dot_precision(a.dtype), V_PRECISION=_dot_precision(v_arg.dtype), EXACT_BF16=interpreting(),
        **tiling,
    )
    return out, rows
