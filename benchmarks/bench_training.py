"""An OT loss inside a training loop: Adam steps on a point cloud, CPU, float32.

The README's clouds (500 points each, x ~ N(0, I), y ~ N(0, I) + 1 in 2-D), 20 Adam steps of
size 0.05 on x per sample. ``otcore_loss`` is ``otcore.nn.SinkhornLoss`` (warm-started from the
previous step's potentials) at its default tolerance, ``otcore_loss_tol1e-2`` the same at
marginal error 1e-2 (about GeomLoss's accuracy: its loop ends at a divergence no lower than this
one's), ``otcore_divergence`` the functional ``sinkhorn_divergence`` (a cold start each step),
``geomloss`` GeomLoss's ``SamplesLoss("sinkhorn", p=2, blur=sqrt(eps / 2),
scaling=0.5)`` (its cost is |x - y|^2 / 2, so that blur is the same eps). otcore solves each step
to its default tolerance (marginal error 1e-4); GeomLoss runs its fixed eps-scaling schedule.
``track_final_divergence`` is otcore's divergence (float64, tol 1e-9) at the points each loop
ends at: lower is a better-trained x.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from . import peers

STEPS, N = 20, 500


def _loss(impl: str, eps: float):
    import otcore

    if impl == "otcore_loss":
        return otcore.nn.SinkhornLoss(eps=eps)
    if impl == "otcore_loss_tol1e-2":
        return otcore.nn.SinkhornLoss(eps=eps, tol=1e-2)
    if impl == "otcore_divergence":
        return lambda x, y: otcore.sinkhorn_divergence(x, y, eps=eps, warn=False)
    samples_loss = peers.require("geomloss").SamplesLoss("sinkhorn", p=2, blur=math.sqrt(eps / 2), scaling=0.5)
    return lambda x, y: 2 * samples_loss(x, y)


class TrainingLoop:
    params = (["otcore_loss", "otcore_loss_tol1e-2", "otcore_divergence", "geomloss"], [0.1, 0.01])
    param_names: ClassVar[list[str]] = ["impl", "eps"]
    timeout = 600
    number = 1
    repeat = 1

    def setup(self, impl, eps):
        gen = torch.Generator().manual_seed(0)
        self.x0 = torch.randn(N, 2, generator=gen)
        self.y = torch.randn(N, 2, generator=gen) + 1
        # warm-up, one step: first-call costs (lazy imports and initialisation in torch.optim, autograd
        # and the solvers) are not the loop's; each loop then starts with a fresh loss (cold potentials)
        self._train(_loss(impl, eps), steps=1)

    def _train(self, loss, steps: int = STEPS) -> torch.Tensor:
        x = self.x0.clone().requires_grad_()
        opt = torch.optim.Adam([x], lr=0.05)
        for _ in range(steps):
            opt.zero_grad()
            loss(x, self.y).backward()
            opt.step()
        return x.detach()

    def time_steps(self, impl, eps):
        self._train(_loss(impl, eps))

    def track_final_divergence(self, impl, eps):
        import otcore

        x = self._train(_loss(impl, eps))
        return float(otcore.sinkhorn_divergence(x.double(), self.y.double(), eps=eps, tol=1e-9, max_iter=50_000))

    track_final_divergence.unit = "divergence"
