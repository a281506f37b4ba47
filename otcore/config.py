"""What otcore will run on this machine: versions, device, and the backend each geometry gets."""

from __future__ import annotations

import sys

import torch

from otcore.geometry.backend import resolve_backend
from otcore.kernels.availability import interpreting, triton_import_error, triton_version


def show_config(file=None) -> dict[str, object]:
    """Print (to ``file``, default stdout) and return otcore's configuration.

    The ``backends`` entry says which implementation ``backend="auto"`` selects for float32
    tensors on the default device (CUDA when present, else CPU): ``"triton"`` (fused kernels) or
    ``"torch"`` (blocked reference).
    """
    from otcore import __version__

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pnorm = "no Triton kernel for p-norm costs"
    config: dict[str, object] = {
        "otcore": __version__,
        "torch": torch.__version__,
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
