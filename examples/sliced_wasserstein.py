"""Sliced-Wasserstein gradient flow: a Gaussian cloud flows onto a target shape (2-D).

Each step draws L fresh directions and moves the points down the gradient of SW_2^2 between the
cloud and the target, scaled so that a step moves every point by the average over directions of
its 1-D optimal displacement (with orthogonal directions this is the iterative distribution
transfer of Pitié et al. 2005 / Rabin et al. 2011). The three direction samplers of
``otcore.sliced_wasserstein`` are compared: i.i.d. ``"random"``, ``"orthogonal"`` (random
orthonormal bases) and ``"qmc"`` (scrambled Sobol mapped to the circle). Progress is measured
by the exact W_2 (``otcore.emd``) to the target. A last panel shows what the samplers change:
the error of the SW_2^2 estimate against the number of directions (40 seeds each). Variance
reduction per call (orthogonal, then QMC, far below i.i.d. directions) need not make the flow
faster: with 6 fresh directions per step, the i.i.d. sampler reached the smallest W_2 here.

Run: ``python examples/sliced_wasserstein.py`` (about 5 s on one CPU core); saves
``examples/sliced_wasserstein.png``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import otcore

N, STEPS, L, EVERY = 400, 120, 6, 5
KINDS = ("random", "orthogonal", "qmc")


def heart(n: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 2) points on a heart-shaped curve, slightly blurred."""
    t = 2 * math.pi * torch.rand(n, generator=gen, dtype=torch.float64)
    x = 16 * torch.sin(t) ** 3
    y = 13 * torch.cos(t) - 5 * torch.cos(2 * t) - 2 * torch.cos(3 * t) - torch.cos(4 * t)
    return torch.stack([x, y], -1) / 8 + 0.05 * torch.randn(n, 2, generator=gen, dtype=torch.float64)


def w2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Exact W_2 between uniform clouds."""
    return float(otcore.emd(torch.cdist(x, y) ** 2).value.sqrt())


def flow(start: torch.Tensor, target: torch.Tensor, kind: str) -> tuple[torch.Tensor, list[float]]:
    """Run the flow with one direction sampler; returns the final cloud and W_2 every EVERY steps."""
    x = start.clone().requires_grad_()
    history = [w2(start, target)]
    for step in range(STEPS):
        loss = otcore.sliced_wasserstein(x, target, projections=kind, n_projections=L, seed=step) ** 2
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            # grad_i = (2 / (L N)) sum_l theta_l (<theta_l, x_i> - matched target) and, in 2-D,
            # sum_l theta_l theta_l^T ~ (L / 2) I: a step of N * grad moves x_i by its mean 1-D displacement
            x -= N * grad
        if (step + 1) % EVERY == 0:
            history.append(w2(x.detach(), target))
    return x.detach(), history


def estimator_error(x: torch.Tensor, y: torch.Tensor, sizes: list[int]) -> dict[str, list[float]]:
    """Relative RMSE of SW_2^2 with L directions over 40 seeds, against 2^14 QMC directions."""
    truth = float(otcore.sliced_wasserstein(x, y, projections="qmc", n_projections=2**14, seed=0)) ** 2
    return {kind: [math.sqrt(sum((float(otcore.sliced_wasserstein(x, y, projections=kind, n_projections=L,
                                                                   seed=s)) ** 2 - truth) ** 2
                                 for s in range(1, 41)) / 40) / truth for L in sizes] for kind in KINDS}


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    target = heart(N, gen)
    start = 0.6 * torch.randn(N, 2, generator=gen, dtype=torch.float64) + torch.tensor([-2.5, 1.0], dtype=torch.float64)
    fig, axes = plt.subplots(1, 5, figsize=(21, 4.2))
    steps = [k * EVERY for k in range(STEPS // EVERY + 1)]
    for ax, kind in zip(axes[:3], KINDS):
        final, history = flow(start, target, kind)
        print(f"{kind:>10}: W_2 to the target {history[0]:.3f} -> {history[-1]:.4f} after {STEPS} steps of L = {L}")
        ax.scatter(*target.T, s=4, c="lightgray", label="target")
        ax.scatter(*start.T, s=4, c="tab:blue", alpha=0.3, label="start")
        ax.scatter(*final.T, s=4, c="tab:red", label=f"after {STEPS} steps")
        ax.set_title(f'projections="{kind}"  (W_2 = {history[-1]:.3f})')
        ax.set_aspect("equal")
        ax.legend(loc="lower left", fontsize=7, markerscale=3)
        axes[3].semilogy(steps, history, label=kind)
    axes[3].set_xlabel("step")
    axes[3].set_ylabel("exact W_2 to the target")
    axes[3].set_title(f"sliced-Wasserstein flow, L = {L} directions per step")
    axes[3].legend()
    sizes = [4, 16, 64, 256]
    for kind, err in estimator_error(start, target, sizes).items():
        axes[4].loglog(sizes, err, "o-", label=kind)
        print(f"{kind:>10}: relative RMSE of SW_2^2 with L = {sizes}: " + ", ".join(f"{e:.1e}" for e in err))
    axes[4].set_xlabel("directions L")
    axes[4].set_ylabel("relative RMSE of SW_2^2")
    axes[4].set_title("estimator error (start vs target, 40 seeds)")
    axes[4].legend()
    fig.tight_layout()
    out = Path(os.environ.get("OTCORE_EXAMPLES_OUT", Path(__file__).parent)) / "sliced_wasserstein.png"
    fig.savefig(out, dpi=110)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
