"""GSP pooling: otcore.nn.GSPPooling vs global average pooling, forward + backward.

The peer a user would otherwise pick is the layer GSP replaces, ``adaptive_avg_pool2d``. Both
pool the same (64, 512, 7, 7) float32 feature maps (a ResNet-50 head's shape with 512 channels)
and back-propagate a random upstream gradient; GSP uses its defaults (64 prototypes, mu = 0.3,
20 safeguarded Newton steps). ``track_constraint_error`` records ``|sum pi - mu|`` of that solve.
"""

from __future__ import annotations

from typing import ClassVar

import torch

import otcore.nn

from . import problems

SHAPE = (64, 512, 7, 7)


def feature_maps(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(64, 512, 7, 7) ReLU-like float32 maps that require grad, and an upstream gradient (64, 512)."""
    gen = torch.Generator().manual_seed(0)
    maps = torch.randn(*SHAPE, generator=gen).clamp_min(0).to(device).requires_grad_(True)
    upstream = torch.randn(SHAPE[0], SHAPE[1], generator=gen).to(device)
    return maps, upstream


def average_pooling(maps: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.adaptive_avg_pool2d(maps, 1).flatten(1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Pooling:
    """Forward + backward of one (64, 512, 7, 7) batch."""

    params = (["gsp", "average"], problems.DEVICES)
    param_names: ClassVar[list[str]] = ["impl", "device"]
    timeout = 300

    def setup(self, impl, device):
        self.device = problems.device_or_skip(device)
        self.maps, self.upstream = feature_maps(self.device)
        torch.manual_seed(0)
        self.layer = otcore.nn.GSPPooling(SHAPE[1]).to(self.device) if impl == "gsp" else average_pooling
        self.time_forward_backward(impl, device)  # warm-up (and Triton's JIT on CUDA)

    def time_forward_backward(self, impl, device):
        self.maps.grad = None
        self.layer(self.maps).backward(self.upstream)
        _sync(self.device)


class PoolingAccuracy:
    """Constraint error of GSP's transport solve on the benchmark batch."""

    def track_constraint_error(self):
        maps, _ = feature_maps(torch.device("cpu"))
        torch.manual_seed(0)
        layer = otcore.nn.GSPPooling(SHAPE[1])
        with torch.no_grad():
            layer(maps)
        return float(layer.last_result.constraint_error.max())

    track_constraint_error.unit = "mass"
