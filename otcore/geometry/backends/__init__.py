"""Choosing how a geometry's softmin runs, and reporting the choice.

Two implementations compute the same three primitives (``softmin``, ``kernel_apply``,
``kernel_cost``), each a module of functions taking the geometry first:

* ``torch_blocked``: blocks of rows through ``otcore.kernels.softmin.blocked`` (CPU, float64);
* ``triton_kernels``: the fused kernels of ``otcore.kernels.softmin.op`` (CUDA, or the CPU under
  ``TRITON_INTERPRET=1``).

``"auto"`` picks Triton for CUDA tensors in float32, float16 or bfloat16 when Triton imports and
the kernels cover the geometry (float64 stays on the torch path), and torch otherwise.
``"triton"`` forces the kernels: it raises a ``ValueError`` saying why when they cannot run (no
Triton; CPU tensors without ``TRITON_INTERPRET=1``; an unsupported cost).
"""

from __future__ import annotations

import functools
import logging
import sys
from importlib import metadata
from types import ModuleType

import torch

from otcore.kernels.availability import interpreting, triton_import_error, triton_version

from . import torch_blocked, triton_kernels

BACKENDS = ("auto", "torch", "triton")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IMPLEMENTATIONS: dict[str, ModuleType] = {"torch": torch_blocked, "triton": triton_kernels}

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
        device: that of the geometry's tensors.
        dtype: that of the geometry's tensors.
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


def _version(distribution: str) -> str:
    """The installed version of a distribution, or "not installed"."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def show_config(file=None) -> dict[str, object]:
    """Print (to ``file``, default stdout) and return what otcore will run on this machine.

    Versions (otcore, Python, torch, NumPy, SciPy, POT, Triton or why it does not import), torch's
    thread count (small problems on a busy CPU run faster with one thread), the device, and in
    ``backends`` which implementation ``backend="auto"`` selects for float32 tensors on the
    default device (CUDA when present, else CPU): ``"triton"`` (fused kernels) or ``"torch"``
    (blocked torch).
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pnorm = "no Triton kernel for p-norm costs"
    config: dict[str, object] = {
        "otcore": metadata.version("otcore"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "scipy": _version("scipy"),
        "POT": _version("POT"),
        "torch threads": torch.get_num_threads(),
        "triton": triton_version() or triton_import_error(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "triton interpreter (TRITON_INTERPRET)": interpreting(),
        "float32 matmul precision": torch.get_float32_matmul_precision(),
        "backends": {
            "CostMatrix": resolve_backend("auto", device, torch.float32, None),
            "PointCloud sqeuclidean/euclidean": resolve_backend("auto", device, torch.float32, None),
            "PointCloud p-norm": resolve_backend("auto", device, torch.float32, pnorm),
        },
    }
    out = file or sys.stdout
    for key, value in config.items():
        if isinstance(value, dict):
            print(f"{key}:", file=out)
            for name, choice in value.items():
                print(f"  {name}: {choice}", file=out)
        else:
            print(f"{key}: {value}", file=out)
    return config
