"""Problem generators shared by the benchmarks (deterministic, float64 then cast), and the profile.

Two profiles, chosen by the environment variable ``OTCORE_BENCH`` when asv imports the suite
(asv fixes parameters at import, so the variable must be set for the whole ``asv`` command):

* ``quick`` (the default, ``make bench``): every peer comparison on its smallest problems
  (n = 500 dense, 1000 points, 10^4 sliced, the n = 500 assignment and the 8x8 digits for SNS);
  under 4 minutes of the 10 it is allowed on 2 CPU cores (asv's forkserver, 2026-12-02);
* ``full`` (``make bench-full``, ``OTCORE_BENCH=full``): every size, eps and problem family the
  README and the issues quote (n up to 5000 dense, 3000 points, 10^5 sliced, 20 000-vertex
  meshes, all eight SNS problems); not timed as a whole, expect well over half an hour.

``by_profile(quick, full)`` returns the parameter list of the active profile.
"""

from __future__ import annotations

import os

import numpy as np
import torch

#: The active profile: "quick" unless OTCORE_BENCH=full.
PROFILE = os.environ.get("OTCORE_BENCH", "quick")
if PROFILE not in ("quick", "full"):
    raise ValueError(f"OTCORE_BENCH must be 'quick' or 'full', got {PROFILE!r}")


def by_profile(quick: list, full: list) -> list:
    """``full`` under OTCORE_BENCH=full, else ``quick`` (a parameter list of an asv benchmark)."""
    return full if PROFILE == "full" else quick


def clouds(n: int, d: int = 2, seed: int = 0, m: int | None = None):
    """Two Gaussian clouds, the second shifted and shrunk: x (n, d), y (m, d) float64."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(m or n, d, generator=gen, dtype=torch.float64) * 0.7 + 1.0
    return x, y


def weighted_histograms(n: int, seed: int = 0):
    """Random positive weights on the simplex (float64), a pair of lengths n."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
    b = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
    return a / a.sum(), b / b.sum()


def digits_histograms(i: int = 0, j: int = 1, p: float = 2.0):
    """Two 8x8 digit images of scikit-learn as histograms with the l_p^p ground cost between pixels.

    Falls back to NotImplementedError (asv skip) when scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise NotImplementedError("scikit-learn is not installed") from err
    images = load_digits().images.reshape(-1, 64).astype(np.float64) + 1e-3
    a, b = images[i] / images[i].sum(), images[j] / images[j].sum()
    grid = np.stack(np.meshgrid(np.arange(8), np.arange(8), indexing="ij"), -1).reshape(-1, 2).astype(np.float64)
    C = (np.abs(grid[:, None] - grid[None]) ** p).sum(-1)
    return torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(C)


#: Devices the benchmarks enumerate: CUDA only where it exists (on a CPU machine every CUDA
#: combination would start a process only to skip).
DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def gpu_params(*lists: list) -> tuple[list, ...]:
    """Parameter lists of a GPU-only benchmark: in full where CUDA exists, else one combination
    (the first of each list), which skips in ``setup``."""
    return lists if torch.cuda.is_available() else tuple(values[:1] for values in lists)


def device_or_skip(name: str) -> torch.device:
    """The torch device, or NotImplementedError (an asv skip) if it is not available here."""
    if name == "cuda" and not torch.cuda.is_available():
        raise NotImplementedError("no CUDA device")
    return torch.device(name)
