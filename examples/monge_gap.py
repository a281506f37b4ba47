"""Fitting a transport map between 2-D Gaussians with and without the Monge gap.

A residual MLP is trained by ``otcore.neural.fit_monge_map`` to push samples of N(0, S0) onto
samples of N(m1, S1), once with the Monge gap (lam = 1, the default) and once without it
(lam = 0: the Sinkhorn divergence alone, which accepts any map with the right push-forward).
Both are compared with the closed-form W2-optimal map ``otcore.neural.gaussian.w2_map`` by
L2-UVP (100 E|T(x) - T*(x)|^2 / Var(P1), in %), and their displacements x -> T(x) are drawn
beside the optimal ones.

Run: ``python examples/monge_gap.py`` (about 12 s on one CPU thread); saves ``examples/monge_gap.png``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from otcore.neural import fit_monge_map, gaussian

F64 = torch.float64


def problem(gen: torch.Generator):
    """A source N(0, S0) and a target N(m1, S1), both anisotropic and rotated against each other."""

    def cov(angle: float, scales: tuple[float, float]) -> torch.Tensor:
        c, s = math.cos(angle), math.sin(angle)
        R = torch.tensor([[c, -s], [s, c]], dtype=F64)
        return R @ torch.diag(torch.tensor(scales, dtype=F64)) @ R.T

    m0, S0 = torch.zeros(2, dtype=F64), cov(0.3, (2.0, 0.3))
    m1, S1 = torch.tensor([2.0, 1.0], dtype=F64), cov(-0.9, (1.5, 0.4))
    return m0, S0, m1, S1


def sample(mean: torch.Tensor, cov: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(n, 2, generator=gen, dtype=F64) @ torch.linalg.cholesky(cov).T + mean


def main() -> None:
    # batches of 128 points are too small to gain from several threads, and lose badly to
    # oversubscription on a busy CPU
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    m0, S0, m1, S1 = problem(gen)
    x, y = sample(m0, S0, 4096, gen).float(), sample(m1, S1, 4096, gen).float()
    A, b = gaussian.w2_map(m0, S0, m1, S1)
    test = sample(m0, S0, 2000, gen)
    optimal = test @ A.T + b

    panels = [("closed-form W2 map", optimal)]
    for lam in (1.0, 0.0):
        model = fit_monge_map(x, y, lam=lam, seed=0)
        with torch.no_grad():
            mapped = model(test.float()).double()
        uvp = float(gaussian.l2_uvp(mapped, optimal, S1))
        label = "with the Monge gap" if lam > 0 else "without (lam = 0)"
        print(f"{label:>20}: L2-UVP = {uvp:.2f} %")
        panels.append((f"{label}: L2-UVP {uvp:.1f} %", mapped))

    fig, axes = plt.subplots(1, 3, figsize=(15, 5), sharex=True, sharey=True)
    shown = slice(0, 150)
    for ax, (title, mapped) in zip(axes, panels, strict=True):
        ax.scatter(*test.T, s=2, c="tab:blue", alpha=0.3, label="source")
        ax.scatter(*mapped.T, s=2, c="tab:orange", alpha=0.3, label="T(source)")
        start, end = test[shown], mapped[shown]
        ax.quiver(*start.T, *(end - start).T, angles="xy", scale_units="xy", scale=1, width=0.002, alpha=0.6)
        ax.set_title(title)
        ax.set_aspect("equal")
    axes[0].legend(loc="upper left", markerscale=5)
    fig.suptitle("Maps fitted by fit_monge_map between 2-D Gaussians (arrows: x -> T(x))")
    fig.tight_layout()
    out = Path(os.environ.get("OTCORE_EXAMPLES_OUT", Path(__file__).parent)) / "monge_gap.png"
    fig.savefig(out, dpi=110)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
