"""Ceilings of the GPUs we report on, for the floor of one Sinkhorn iteration.

One half-step (a softmin over n x m) needs n*m exponentials and, for points in dimension d,
2*n*m*d FLOPs of dot products; its floor is the larger of the two times. A Sinkhorn iteration is
two half-steps. Rates for the H100/H200 SXM (the same 132-SM chip at up to 1.98 GHz):

* exponentials: MUFU.EX2 issues 16 per clock per SM on compute capability 9.0 (CUDA C++
  Programming Guide, "Arithmetic Instructions" throughput table): 132 * 16 * 1.98e9 = 4.18e12 /s.
* dot products: strict fp32 runs on the FMA units, 132 * 128 * 2 * 1.98e9 = 66.9 TFLOP/s; TF32
  tensor cores about 495 TFLOP/s dense (datasheet); bf16 788 TFLOP/s, measured on random data on
  this workplace's H200 (the device tool's KINDS.md; the datasheet says about 990).
"""

from __future__ import annotations

import math

EXP_PER_SECOND = 132 * 16 * 1.98e9
MATMUL_FLOPS = {"fp32": 132 * 128 * 2 * 1.98e9, "tf32": 495e12, "bf16": 788e12}


def sinkhorn_iteration_floor(n: int, m: int, d: int, precision: str, device_name: str) -> float:
    """Seconds one Sinkhorn iteration needs at least on ``device_name`` (NaN for other GPUs)."""
    if not any(chip in device_name for chip in ("H100", "H200")):
        return math.nan
    half_step = max(n * m / EXP_PER_SECOND, 2 * n * m * d / MATMUL_FLOPS[precision])
    return 2 * half_step
