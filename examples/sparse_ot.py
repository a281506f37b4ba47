"""Sparsity-constrained OT on a 1-D toy problem: plans with at most k nonzeros per column.

Sources are a two-bump mixture, targets a single bump; the cost is |x - y|^2. The semi-dual of
Liu, Puigcerver & Blondel (ICLR 2023) is solved for k = 1, 2, 4 and k = n (squared-l2 OT, no
sparsity constraint), next to the dense entropic plan of Sinkhorn. Saves examples/sparse_ot.png.

Run: python examples/sparse_ot.py   (about 3 s on one CPU core)
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import otcore


def problem(n: int = 32, m: int = 24):
    """1-D sources (two bumps) and targets (one bump) on sorted grids, float64."""
    x = torch.linspace(0, 1, n, dtype=torch.float64)
    y = torch.linspace(0, 1, m, dtype=torch.float64)
    a = torch.exp(-((x - 0.25) / 0.08) ** 2) + 0.6 * torch.exp(-((x - 0.75) / 0.1) ** 2) + 1e-2
    b = torch.exp(-((y - 0.5) / 0.15) ** 2) + 1e-2
    cost = (x[:, None] - y[None, :]) ** 2
    return cost, a / a.sum(), b / b.sum()


def main() -> None:
    cost, a, b = problem()
    n = len(a)
    gamma = 0.02 * float(cost.mean())  # the quadratic term, in cost units per unit mass
    panels = []
    for k in (1, 2, 4, n):
        res = otcore.sparse_ot(cost, a, b, k=k, gamma=gamma, warn=False)
        nnz = int((res.plan > 0).sum(0).max())
        label = f"k = {k}" if k < n else "k = n (l2 OT)"
        panels.append((res.plan, f"{label}\nmax nnz/column {nnz}, <P,C> = {float(res.transport_cost):.4f}"))
        print(f"{label:14s} converged={bool(res.converged)} max nonzeros per column={nnz} "
              f"value={float(res.value):.5f} row error={float(res.info['error']):.2e}")
    entropic = otcore.sinkhorn(cost, a, b, eps=0.02 * float(cost.mean()))
    panels.append((entropic.plan, f"entropic (Sinkhorn)\n<P,C> = {float(entropic.transport_cost):.4f}"))
    exact = otcore.emd(cost, a, b)
    print(f"exact OT <P,C> = {float(exact.transport_cost):.5f}")

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), constrained_layout=True)
    for ax, (plan, title) in zip(axes, panels, strict=True):
        ax.imshow(plan.numpy(), cmap="magma_r", aspect="auto", interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("target j")
    axes[0].set_ylabel("source i")
    fig.suptitle("Sparsity-constrained OT: at most k nonzeros in each column of the plan", fontsize=11)
    out = Path(os.environ.get("OTCORE_EXAMPLES_OUT", Path(__file__).parent)) / "sparse_ot.png"
    fig.savefig(out, dpi=110)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
