"""Half-precision inputs computed in float32: the cast, and the warning its backward pass owes.

Gradients are computed in float32 and cast back to the input's half dtype, where a value
beyond its range (65504 for float16) becomes inf. That is the dtype's limit, not an error of
the solve, but it must not pass silently: ``upcast`` warns when its backward pass rounds a
gradient to inf.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from otcore.warnings import PrecisionWarning

HALF = (torch.float16, torch.bfloat16)


class _Upcast(torch.autograd.Function):
    """``t.to(dtype)``. Where ``t`` is broadcast (an expanded view: stride 0, e.g. weights shared
    by a batch), the backward pass sums the gradient over the broadcast dims in the wide dtype
    and hands it back in their first slice (zeros elsewhere), so the view's own backward sums
    one value per point: a half-precision sum of per-problem gradients could otherwise meet
    +inf and -inf and make NaN."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.source = t.dtype
        ctx.broadcast = tuple(d for d in range(t.dim()) if t.stride(d) == 0 and t.shape[d] > 1)
        return t.to(dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.broadcast:
            total = grad.sum(dim=ctx.broadcast, keepdim=True)
            grad = torch.zeros_like(grad)
            first = grad
            for d in ctx.broadcast:
                first = first.narrow(d, 0, 1)
            first.copy_(total)
        limit = torch.finfo(ctx.source).max
        if bool((grad.abs() > limit).any()):  # a host read, on half inputs' backward only
            warnings.warn(
                f"a gradient exceeds the range of {ctx.source} (|grad| > {limit:g}) and is inf there: "
                "give the inputs in float32, or scale the loss down",
                PrecisionWarning,
                stacklevel=2,
            )
        return grad.to(ctx.source), None


def upcast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``; for a half tensor that requires grad, one whose backward pass warns
    (``PrecisionWarning``) when the gradient overflows the half dtype."""
    if t.dtype in HALF and t.requires_grad and dtype != t.dtype:
        return _Upcast.apply(t, dtype)
    return t.to(dtype)


def exp_above_tiny_(t, *, zero: bool = False):
    """``exp(t)`` in place, with ``t`` first raised to 1 + log(tiny) (tiny: the dtype's smallest
    normal number). The CPU exponential takes a slow path for results at or below tiny, 5 to 35
    times slower (float64, float32) on tensors of underflowing entries. The entries raised were
    below e * tiny: lost in any sum that also holds an entry far above tiny (a max-shifted
    log-sum-exp, a plan with a mass), and only there is this safe: where every entry underflows
    (a kernel built far from the iterate), the raised sum is a wrong finite number where the plain
    exponential gives 0, which its caller detects. ``zero``: the raised entries are set to 0
    instead (one more pass), for a caller that cannot detect it (a stabilised kernel, whose sums
    are scaled by up to e^T before they are judged). ``t`` may also be a NumPy array (whose
    float32 exponential has no slow path: with ``zero``, it is not raised first)."""
    if isinstance(t, np.ndarray):
        floor = t.dtype.type(1.0 + math.log(np.finfo(t.dtype).tiny))
        with np.errstate(under="ignore"):
            raised = t if zero and t.dtype == np.float32 else np.maximum(t, floor, out=t)
            out = np.exp(raised, out=t)
        if zero:  # a product with the mask: branch-free (a masked assignment is 4x slower)
            out *= out > np.exp(floor)
        return out
    floor = 1.0 + math.log(torch.finfo(t.dtype).tiny)
    out = t.clamp_min_(floor).exp_()
    if not zero:
        return out
    smallest = float(torch.tensor(floor, dtype=t.dtype).exp())  # exp(floor) as this dtype rounds it
    return torch.nn.functional.threshold(out, smallest, 0.0, inplace=True)


@contextlib.contextmanager
def flushed_subnormals() -> Iterator[None]:
    """Flush subnormal numbers to zero in this thread's CPU arithmetic for the duration, then
    restore the mode found (``torch.set_flush_denormal``: x86 with SSE3; elsewhere nothing).

    Products of small plan or kernel entries fall below the normal range at small eps, where each
    operation runs 10 to 30 times slower on x86 CPUs (measured: the eps = 0.01 training loop of
    500 points 4.2 s -> 1.5 s on a Xeon). For the solvers that use it such terms are below u times
    any sum they accept, so flushing them changes no result beyond rounding.
    """
    flushing = float(torch.tensor(torch.finfo(torch.float32).tiny) * 0.5) == 0.0  # the mode in force
    switched = not flushing and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if switched:
            torch.set_flush_denormal(False)
