"""Half-precision inputs computed in float32: the cast, and the warning its backward pass owes.

Gradients are computed in float32 and cast back to the input's half dtype, where a value
beyond its range (65504 for float16) becomes inf. That is the dtype's limit, not an error of
the solve, but it must not pass silently: ``upcast`` warns when its backward pass rounds a
gradient to inf.
"""

from __future__ import annotations

import warnings

import torch

from otcore.warnings import PrecisionWarning

HALF = (torch.float16, torch.bfloat16)


class _Upcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.source = t.dtype
        return t.to(dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
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
