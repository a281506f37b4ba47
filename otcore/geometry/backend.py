"""Choosing how a geometry's softmin runs: the pure-torch reference or the Triton kernels.

``"auto"`` picks Triton for CUDA tensors in float32, float16 or bfloat16 when Triton imports and
the kernels cover the geometry (float64 stays on the torch path, whose blocked dense products are
the accuracy reference), and torch otherwise. ``"triton"`` forces the kernels: it raises a
``ValueError`` saying why when they cannot run (no Triton; CPU tensors without
``TRITON_INTERPRET=1``, which is how the tests run them on a CPU; an unsupported cost).
"""

from __future__ import annotations

import functools
import logging

import torch

from otcore.kernels.availability import interpreting, triton_import_error

BACKENDS = ("auto", "torch", "triton")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_log = logging.getLogger("otcore")


def triton_unavailable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (None when they can)."""
    error = triton_import_error()
    if error is not None:
        return error
    if device.type == "cuda" or interpreting():
        return None
    return f"the tensors are on {device.type}; the kernels need CUDA tensors (or TRITON_INTERPRET=1)"


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype, unsupported: str | None) -> str:
    """The backend a geometry runs on: ``"torch"`` or ``"triton"``.

    Args:
        requested: ``"auto"``, ``"torch"`` or ``"triton"``.
        device, dtype: those of the geometry's tensors.
        unsupported: why the kernels do not cover this geometry (None when they do).

    Raises:
        ValueError: an unknown name, or ``"triton"`` where the kernels cannot run.
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "torch":
        return "torch"
    if requested == "triton":
        reason = unsupported or triton_unavailable(device)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run: {reason}. Use backend='torch' or 'auto'.")
        return "triton"
    if device.type != "cuda" or dtype not in KERNEL_DTYPES or unsupported is not None:
        return "torch"
    reason = triton_unavailable(device)
    if reason is not None:
        _log_fallback(reason)
        return "torch"
    return "triton"


@functools.cache
def _log_fallback(reason: str) -> None:
    _log.warning("otcore: Triton kernels unavailable (%s); using the torch backend", reason)
