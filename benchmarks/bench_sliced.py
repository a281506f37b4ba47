"""Sliced Wasserstein: otcore.sliced_wasserstein vs POT's ot.sliced_wasserstein_distance.

Both get the same (d, L) projection matrix, so they solve exactly the same problem; the time
covers projection, sorting and the 1-D quantile merge. POT runs on NumPy arrays (``pot``) or
torch tensors through its backend (``pot_torch``). ``SlicedError`` tracks |otcore - POT| / POT (float64).
``SlicedGPU`` gives the GPU figure at n = 10^6 (skipped without CUDA).
"""

from __future__ import annotations

from typing import ClassVar

import torch

import otcore

from . import peers, problems

N_PROJECTIONS = 128


def directions(d: int) -> torch.Tensor:
    """(d, 128) float64 unit directions, the same for every implementation."""
    theta = torch.randn(d, N_PROJECTIONS, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return theta / theta.norm(dim=0, keepdim=True)


def pot_sliced(x, y, a, b, theta) -> float:
    """POT's sliced Wasserstein on whatever arrays it is given (NumPy or torch)."""
    ot = peers.require("ot")
    return float(ot.sliced_wasserstein_distance(x, y, a, b, p=2, projections=theta))


def otcore_sliced(x, y, a, b, theta) -> float:
    value = otcore.sliced_wasserstein(x, y, a, b, p=2, projections=theta)
    if value.is_cuda:
        torch.cuda.synchronize()
    return float(value)


class Sliced:
    """CPU, float64: n points in d dimensions on both sides, 128 directions."""

    params = (["otcore", "pot", "pot_torch"], problems.by_profile([10_000], [10_000, 100_000]), [3, 64],
              ["uniform", "weighted"])
    param_names: ClassVar[list[str]] = ["impl", "n", "d", "weights"]
    timeout = 600

    def setup(self, impl, n, d, weights):
        x, y = problems.clouds(n, d=d)
        a, b = problems.weighted_histograms(n) if weights == "weighted" else (None, None)
        theta = directions(d)
        self.inputs = [x, y, a, b, theta]
        if impl == "pot":
            self.inputs = [None if t is None else t.numpy() for t in self.inputs]
        self.fn = otcore_sliced if impl == "otcore" else pot_sliced
        if impl == "otcore":
            self.fn(*self.inputs)  # warm-up

    def time_sliced(self, *params):
        self.fn(*self.inputs)



class SlicedError:
    """|otcore - POT| / POT in float64 on the problems of ``Sliced``."""

    params = (problems.by_profile([10_000], [10_000, 100_000]), [3, 64], ["uniform", "weighted"])
    param_names: ClassVar[list[str]] = ["n", "d", "weights"]
    timeout = 600

    def track_error(self, n, d, weights):
        x, y = problems.clouds(n, d=d)
        a, b = problems.weighted_histograms(n) if weights == "weighted" else (None, None)
        inputs = [x, y, a, b, directions(d)]
        reference = pot_sliced(*(None if t is None else t.numpy() for t in inputs))
        return abs(otcore_sliced(*inputs) - reference) / reference

    track_error.unit = "relative"


class SlicedGPU:
    """CUDA, float32: n = 10^6 points per side in d = 3 and 64, 128 directions."""

    params = problems.gpu_params(["otcore", "pot_torch"], [1_000_000], [3, 64])
    param_names: ClassVar[list[str]] = ["impl", "n", "d"]
    timeout = 600

    def setup(self, impl, n, d):
        device = problems.device_or_skip("cuda")
        x, y = problems.clouds(n, d=d)
        theta = directions(d)
        self.inputs = [x.float().to(device), y.float().to(device), None, None, theta.float().to(device)]
        self.fn = otcore_sliced if impl == "otcore" else pot_sliced
        self.fn(*self.inputs)  # warm-up (CUDA context, allocator)

    def time_sliced(self, *params):
        self.fn(*self.inputs)
        torch.cuda.synchronize()
