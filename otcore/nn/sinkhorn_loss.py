"""``SinkhornLoss``: the entropic OT loss between point clouds as a module that warm-starts itself.

In a training loop the measures move a little from one step to the next, and so do the optimal
potentials: started from the previous step's potentials (at the target eps, without annealing),
a solve needs a fraction of the iterations of a cold start. The module keeps them between calls
(detached, not a buffer: they are not part of the model's state) and uses them whenever the new
call has the same shapes, dtype and device.

Reference: Feydy et al., "Interpolating between optimal transport and MMD using Sinkhorn
divergences", AISTATS 2019 (GeomLoss's ``SamplesLoss("sinkhorn")``, the interface this mirrors).
"""

from __future__ import annotations

import torch

from otcore._validation import check_max_iter, check_positive, check_ratio
from otcore.geometry import PointCloud
from otcore.losses.divergence import divergence_and_potentials, same_measures
from otcore.solvers.entropic.sinkhorn import sinkhorn


class SinkhornLoss(torch.nn.Module):
    """Debiased Sinkhorn divergence (or the plain entropic OT value) between point clouds.

    ``loss(x, y, a=None, b=None)``: x (n, d) / (B, n, d), y (m, d) / (B, m, d), weights as in
    ``otcore.sinkhorn_divergence``; returns () or (B,), differentiable in x, y, a and b.

    Args:
        eps: entropic regularisation (> 0), in the units of the cost (``"sqeuclidean"``:
            |x - y|^2, no 1/2: GeomLoss's ``blur`` is sqrt(eps / 2)).
        cost: as in ``PointCloud``.
        debias: True for ``sinkhorn_divergence`` (S_eps: 0 for identical inputs, >= 0); False
            for ``sinkhorn(...).value`` (OT_eps: <P, C> + eps KL(P || a x b)).
        warm_start: start each call from the potentials of the previous one when the shapes,
            dtype and device agree (and, debiased, whether x and y are the same measure).
        eps_scaling: annealing of cold starts, as in ``sinkhorn_divergence`` (off by default).
        tol: as in ``sinkhorn_divergence``.
        max_iter: as in ``sinkhorn_divergence``.
        backend: as in ``sinkhorn_divergence``.
        validate: as in ``sinkhorn_divergence``.
        relative_eps: as in ``sinkhorn_divergence``.

    ``reset()`` forgets the stored potentials.
    """

    def __init__(self, eps: float, *, cost="sqeuclidean", debias: bool = True, warm_start: bool = True,
                 eps_scaling: float | None = None, tol: float | None = None, max_iter: int = 2000,
                 backend: str = "auto", validate: bool = True, relative_eps: str | None = None) -> None:
        super().__init__()
        self.eps = check_positive("eps", eps)
        self.max_iter = check_max_iter("max_iter", max_iter)
        self.cost, self.debias, self.warm_start = cost, bool(debias), bool(warm_start)
        self.eps_scaling = check_ratio("eps_scaling", eps_scaling)
        self.tol, self.backend, self.validate = tol, backend, validate
        self.relative_eps = relative_eps
        self._key: tuple | None = None
        self._potentials: tuple[torch.Tensor, ...] | None = None

    def reset(self) -> None:
        """Forget the potentials of the last call: the next one starts cold."""
        self._key, self._potentials = None, None

    def forward(self, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor | None = None,
                b: torch.Tensor | None = None) -> torch.Tensor:
        key = self._key_of(x, y, a, b)
        init = self._potentials if self.warm_start and key == self._key else None
        if self.debias:
            value, potentials = divergence_and_potentials(
                x, y, a, b, eps=self.eps, cost=self.cost, backend=self.backend, tol=self.tol,
                max_iter=self.max_iter, eps_scaling=self.eps_scaling, validate=self.validate, init=init,
                relative_eps=self.relative_eps)
        else:
            scaling = None if init is not None else self.eps_scaling
            res = sinkhorn(PointCloud(x, y, cost=self.cost, backend=self.backend, validate=self.validate), a, b,
                           eps=self.eps, tol=self.tol, max_iter=self.max_iter, grad="envelope",
                           init=None if init is None else (init[0], init[1]),
                           eps_scaling=scaling, validate=self.validate, relative_eps=self.relative_eps)
            value, potentials = res.value, (res.f, res.g)
        if self.warm_start:
            self._key, self._potentials = key, potentials
        return value

    def _key_of(self, x, y, a, b) -> tuple:
        """What a stored warm start must match: shapes, dtype, device (and, debiased, sameness)."""
        same = self.debias and same_measures(x, y, a, b, compare_values=self.validate)
        return (tuple(x.shape), tuple(y.shape), x.dtype, x.device, same)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, cost={self.cost!r}, debias={self.debias}, warm_start={self.warm_start}"
