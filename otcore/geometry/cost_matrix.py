"""Dense cost matrices."""

from __future__ import annotations

import math

import numpy as np
import torch

from otcore._arrays import TORCH_GRAIN, numpy_view
from otcore._validation import check_finite, check_tensor
from otcore.geometry.backends import resolve_backend
from otcore.geometry.base import Geometry
from otcore.kernels.codes import COST_DENSE
from otcore.kernels.softmin import blocked
from otcore.kernels.softmin.blocked import EXP_FLOOR


class CostMatrix(Geometry):
    """A dense cost C of shape (n, m) or (B, n, m).

    Args:
        C: the costs; must be finite.
        backend: ``"auto"`` (Triton for CUDA float32/float16/bfloat16 costs when it imports,
            torch otherwise), ``"torch"`` or ``"triton"`` (on CPU tensors it needs
            ``TRITON_INTERPRET=1``).
        validate: check that C is finite (a host synchronisation); ``False`` skips the check.
    """

    holds_costs = True

    def __init__(self, C: torch.Tensor, backend: str = "auto", *, validate: bool = True):
        check_tensor("C", C)
        if C.dim() not in (2, 3):
            raise ValueError(f"C must have shape (n, m) or (B, n, m), got {tuple(C.shape)}")
        if C.shape[-1] == 0 or C.shape[-2] == 0:
            raise ValueError(f"C is empty: shape {tuple(C.shape)}")
        if not C.is_floating_point():
            raise ValueError(f"C must be a floating tensor, got {C.dtype}")
        self.validate = validate
        self.batched = C.dim() == 3
        self.C = C if self.batched else C.unsqueeze(0)
        self.backend = resolve_backend(backend, C.device, C.dtype, None)
        if validate:  # one read of each problem's range: finiteness, and the ``cost_range`` it caches
            ranges = self._ranges()
            if not all(map(math.isfinite, ranges)):
                check_finite("C", C)  # raises, counting the non-finite entries (NaN reaches the extremes)
            self._cost_range = min(ranges)

    @property
    def shape(self):
        return tuple(self.C.shape)

    @property
    def tensors(self):
        return (self.C,)

    def with_tensors(self, *tensors: torch.Tensor) -> CostMatrix:
        (C,) = tensors
        return self._replace(C=C)

    def cost_rows(self, rows, transpose=False):
        return (self.C.mT[:, rows] if transpose else self.C[:, rows]).to(self.dtype)

    def restricted(self, rows, transpose=False):
        return self.with_tensors(self.C[:, :, rows] if transpose else self.C[:, rows])

    def kernel_operands(self, transpose):
        return (self.C.mT if transpose else self.C), None, COST_DENSE

    def fused_layout(self, transpose):
        return -2 if transpose else -1

    def fill_scores(self, rows, buf, h, inv_eps, transpose):
        if transpose:  # columns of C, kept in C's memory order: buf is (B, n, r), reduce over n
            torch.add(h.unsqueeze(-1), self.C[:, :, rows], alpha=-inv_eps, out=buf)
        else:
            torch.add(h.unsqueeze(-2), self.C[:, rows], alpha=-inv_eps, out=buf)

    def stream_lse(self, scaled, inv_eps, transpose):
        # a small CPU cost: one thread either way, and NumPy's few operations dispatch faster (not
        # with validate=False, whose solves promise to read nothing on the host, NumPy views included)
        if self.validate and self.C.numel() < TORCH_GRAIN:
            C, h = numpy_view(self.C), numpy_view(scaled)
            if C is not None and h is not None and C.dtype == h.dtype:
                return torch.from_numpy(_numpy_lse(C, h, inv_eps, axis=-2 if transpose else -1))
        if not transpose:
            return None
        return blocked.column_lse(self.C, scaled, inv_eps, blocked.Buffers(self.dtype, self.device))

    def materialize(self):
        return self.C.to(self.dtype)

    def _range_bounds(self):
        return torch.tensor(self._ranges(), dtype=torch.float64, device=self.device)

    def _ranges(self) -> list[float]:
        """max C - min C of each problem, on the host: two reductions over C as stored (any
        strides), read back together (by NumPy where ``numpy_view`` allows); the difference in
        float64 (no overflow, no rounding)."""
        C = self.C.detach()
        array = numpy_view(C)
        if array is not None:
            highs, lows = (array.max(axis=(-2, -1)).reshape(-1).tolist(),
                           array.min(axis=(-2, -1)).reshape(-1).tolist())
        else:
            highs, lows = torch.stack((C.amax(dim=(-2, -1)), C.amin(dim=(-2, -1)))).reshape(2, -1).tolist()
        return [high - low for high, low in zip(highs, lows, strict=True)]


def _numpy_lse(C: np.ndarray, h: np.ndarray, inv_eps: float, axis: int) -> np.ndarray:
    """``log sum exp(h - C inv_eps)`` along ``axis`` of C (B, n, m): -1 with h (B, m) on the
    columns (-> (B, n)), -2 with h (B, n) on the rows (-> (B, m)); max-shifted and clamped at
    -``EXP_FLOOR`` as ``blocked.lse_``. NaN and inf propagate as they do in torch."""
    with np.errstate(all="ignore"):
        scores = C * -inv_eps
        scores += h[:, None, :] if axis == -1 else h[:, :, None]
        top = scores.max(axis, keepdims=True)
        top[top == -math.inf] = 0.0  # torch's nan_to_num(neginf=0) (NumPy's takes 15 us)
        np.minimum(top, np.finfo(top.dtype).max, out=top)
        scores -= top
        np.maximum(scores, -EXP_FLOOR, out=scores)
        np.exp(scores, out=scores)
        lse = np.log(scores.sum(axis))
        lse += np.squeeze(top, axis)
    return lse
