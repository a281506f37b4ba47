"""otcore demo: solve real OT problems, compare with POT, save a figure of the plans.

1. Two point clouds (a crescent and a Gaussian blob, 800 points each): entropic OT with
   otcore.sinkhorn on a PointCloud (never builds the cost matrix) vs POT's log-domain Sinkhorn.
2. Two histograms on a 1-D grid (200 bins on [0, 1]): otcore.sinkhorn and otcore.emd vs POT, and
   the exact value against the closed form of 1-D OT (quantile functions), each timed on its own.

Run: python examples/demo.py   (writes examples/demo_plans.png)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import ot
import torch

import otcore

N_POINTS = 800


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def clouds(n: int, gen: torch.Generator):
    t = torch.rand(n, generator=gen, dtype=torch.float64) * np.pi
    crescent = torch.stack([torch.cos(t), torch.sin(t)], 1) + 0.05 * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    blob = 0.3 * torch.randn(n, 2, generator=gen, dtype=torch.float64) + torch.tensor([1.0, -0.2], dtype=torch.float64)
    return crescent, blob


def histograms(bins: int):
    grid = torch.linspace(0, 1, bins, dtype=torch.float64)
    bump = lambda mu, s: torch.exp(-0.5 * ((grid - mu) / s) ** 2)
    a = bump(0.25, 0.05) + 0.5 * bump(0.6, 0.08)
    b = bump(0.7, 0.06) + 0.3 * bump(0.3, 0.04)
    return grid, a / a.sum(), b / b.sum()


def w2_1d(grid, a, b):
    """Closed-form squared W2 on the line: integral of the squared quantile gap."""
    levels = np.linspace(0, 1, 20001)[1:-1]
    qa = np.interp(levels, np.cumsum(a), grid)
    qb = np.interp(levels, np.cumsum(b), grid)
    return float(np.mean((qa - qb) ** 2))


def main():
    gen = torch.Generator().manual_seed(0)
    rows = []

    x, y = clouds(N_POINTS, gen)
    eps = 2e-2
    res, t_ot = timed(lambda: otcore.sinkhorn(otcore.PointCloud(x, y), eps=eps, tol=1e-9, max_iter=10_000))
    C = ot.dist(x.numpy(), y.numpy())
    u = np.full(N_POINTS, 1 / N_POINTS)
    P_pot, t_pot = timed(lambda: ot.sinkhorn(u, u, C, eps, method="sinkhorn_log", stopThr=1e-9, numItermax=10_000))
    rows.append(("clouds: Sinkhorn <P,C>", float(res.transport_cost), t_ot, float((P_pot * C).sum()), t_pot,
                 "POT sinkhorn_log"))
    gap = np.abs(res.plan.numpy() - P_pot).sum()

    grid, a, b = histograms(200)
    Cg = (grid[:, None] - grid[None]) ** 2
    ex, t_ex = timed(lambda: otcore.emd(Cg, a, b))
    w2_pot, t_w2 = timed(lambda: ot.emd2(a.numpy(), b.numpy(), Cg.numpy()))
    rows.append(("histograms: exact W2^2", float(ex.value), t_ex, w2_pot, t_w2, "POT emd2"))
    sk, t_sk = timed(lambda: otcore.sinkhorn(Cg, a, b, eps=1e-3, tol=1e-9, max_iter=20_000))
    P_h, t_h = timed(lambda: ot.sinkhorn(a.numpy(), b.numpy(), Cg.numpy(), 1e-3, method="sinkhorn_log",
                                         stopThr=1e-9, numItermax=20_000))
    rows.append(("histograms: Sinkhorn <P,C>", float(sk.transport_cost), t_sk, float((P_h * Cg.numpy()).sum()), t_h,
                 "POT sinkhorn_log"))
    w2_closed, t_closed = timed(lambda: w2_1d(grid.numpy(), a.numpy(), b.numpy()))
    rows.append(("histograms: closed form vs emd", float(ex.value), t_ex, w2_closed, t_closed, "1-D quantiles"))

    print(f"{'problem':30s} {'otcore':>12s} {'time':>9s}   {'reference':>12s} {'time':>9s}  reference")
    for name, v, t, ref, tr, who in rows:
        print(f"{name:30s} {v:12.6f} {t:8.4f}s   {ref:12.6f} {tr:8.4f}s  {who}")
    print(f"clouds: L1 gap between otcore's and POT's plans = {gap:.2e}; "
          f"otcore converged in {int(res.n_iter)} iterations")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    P = res.plan.numpy()
    match = P.argmax(1)
    for i in range(0, N_POINTS, 8):
        axes[0].plot([x[i, 0], y[match[i], 0]], [x[i, 1], y[match[i], 1]], color="0.7", lw=0.5)
    axes[0].scatter(x[:, 0], x[:, 1], s=3, label="source")
    axes[0].scatter(y[:, 0], y[:, 1], s=3, label="target")
    axes[0].set_title(f"point clouds, eps={eps}: largest plan entry per source point")
    axes[0].set_xlabel("first coordinate")
    axes[0].set_ylabel("second coordinate")
    axes[0].legend()
    # plans are indexed [source bin, target bin]; extent maps bins to their positions on the grid
    extent = (float(grid[0]), float(grid[-1]), float(grid[0]), float(grid[-1]))
    image = axes[1].imshow(np.log10(sk.plan.numpy() + 1e-12), origin="lower", extent=extent, vmin=-8, cmap="magma")
    fig.colorbar(image, ax=axes[1], label="log10 P[i, j] (mass moved from bin i to bin j)")
    axes[1].set_title("histograms: Sinkhorn plan, eps=1e-3")
    exact = ex.plan.numpy()
    image = axes[2].imshow(np.log10(exact + 1e-12), origin="lower", extent=extent, vmin=-8, cmap="magma",
                           interpolation="none")
    fig.colorbar(image, ax=axes[2], label="log10 P[i, j] (mass moved from bin i to bin j)")
    axes[2].set_title(f"histograms: exact plan ({int((exact > 0).sum())} nonzeros)")
    for ax in axes[1:]:
        ax.set_xlabel("target position (bin centre on [0, 1])")
        ax.set_ylabel("source position (bin centre on [0, 1])")
    out = Path(os.environ.get("OTCORE_EXAMPLES_OUT", Path(__file__).parent)) / "demo_plans.png"
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"figure saved to {out}")


if __name__ == "__main__":
    main()
