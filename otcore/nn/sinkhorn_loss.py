"""``SinkhornLoss``: the entropic OT loss between point clouds as a module that warm-starts itself.

In a training loop the measures move a little from one step to the next, and so do the optimal
potentials: started from the previous step's potentials (at the target eps, without annealing;
on the scaling-iteration path a debiased cross problem left far from its optimum passes through
two coarser eps first, see ``otcore.solvers.entropic.scaling_loop.LADDER``), a solve needs a fraction of
the iterations of a cold start. The module keeps them between calls (detached, not a buffer:
they are not part of the model's state) and uses them whenever the new call has the same
shapes, dtype and device.

Reference: Feydy et al., "Interpolating between optimal transport and MMD using Sinkhorn
divergences", AISTATS 2019 (GeomLoss's ``SamplesLoss("sinkhorn")``, the interface this mirrors).
"""

from __future__ import annotations

import torch

from otcore._validation import check_max_iter, check_positive, check_ratio, check_rho
from otcore.geometry import PointCloud
from otcore.losses.divergence import divergence_and_potentials, same_measures
from otcore.solvers.entropic.sinkhorn import sinkhorn


class SinkhornLoss(torch.nn.Module):
    """Debiased Sinkhorn divergence (or the plain entropic OT value) between point clouds.

    ``loss(x, y, a=None, b=None)``: x (n, d) / (B, n, d), y (m, d) / (B, m, d), weights as in
    ``otcore.sinkhorn_divergence``; returns () or (B,), differentiable in x, y, a and b.

    Two spellings of the same problem (one of them per module):

    * otcore's: ``eps``, ``cost``, ``rho``, ``eps_scaling``, ``relative_eps``, all in the
      units of ``cost`` (``"sqeuclidean"`` is |x - y|^2, no 1/2);
    * GeomLoss's ``SamplesLoss("sinkhorn", p=..., blur=..., reach=..., scaling=...)``: give
      ``p`` (1 or 2) or ``blur``. The cost is then GeomLoss's |x - y|^p / p, eps = blur^p
      (or ``eps`` itself, in those units), the marginal penalty rho = reach^p, and annealing
      divides blur by ``scaling`` per iteration; the value is GeomLoss's, in the units of
      |x - y|^p / p. Internally p = 2 runs otcore's |x - y|^2 at 2 eps and 2 rho, and halves
      the value (the same problem scaled by 2).

    Args:
        eps: entropic regularisation (> 0), in the units of the cost. Required unless ``blur``.
        cost: as in ``PointCloud`` (default ``"sqeuclidean"``); not with ``p``.
        rho: KL penalty on both marginals (> 0; None: balanced), as in
            ``otcore.sinkhorn_divergence``.
        p: GeomLoss's exponent: 1 (cost |x - y|) or 2 (cost |x - y|^2 / 2).
        blur: GeomLoss's blur: eps = blur^p (implies p = 2 unless ``p`` is given).
        reach: GeomLoss's reach: rho = reach^p (None: balanced).
        scaling: GeomLoss's annealing ratio of blur per iteration, in (0, 1) (None: no
            annealing of cold starts, otcore's default; GeomLoss's default is 0.5).
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

    Raises:
        ValueError: a knob given in both spellings (``eps`` and ``blur``, ``rho`` and
            ``reach``, ``eps_scaling`` and ``scaling``, ``cost`` or ``relative_eps`` with
            ``p``), ``p`` other than 1 or 2, or a value out of range.
    """

    def __init__(self, eps: float | None = None, *, cost=None, rho: float | None = None, p: int | None = None,
                 blur: float | None = None, reach: float | None = None, scaling: float | None = None,
                 debias: bool = True, warm_start: bool = True, eps_scaling: float | None = None,
                 tol: float | None = None, max_iter: int = 2000, backend: str = "auto", validate: bool = True,
                 relative_eps: str | None = None) -> None:
        super().__init__()
        geomloss = p is not None or blur is not None or reach is not None or scaling is not None
        for native, theirs, given in (("eps", "blur", eps is not None and blur is not None),
                                      ("rho", "reach", rho is not None and reach is not None),
                                      ("eps_scaling", "scaling", eps_scaling is not None and scaling is not None)):
            if given:
                raise ValueError(f"give {native} or {theirs}, not both (the same knob in two spellings)")
        if geomloss:
            if cost is not None or relative_eps is not None:
                raise ValueError("cost and relative_eps are otcore's spelling; with GeomLoss's p/blur/reach/scaling "
                                 "the cost is |x - y|^p / p")
            p = 2 if p is None else p
            if p not in (1, 2):
                raise ValueError(f"p must be 1 or 2 (GeomLoss's |x - y|^p / p), got {p!r}")
            self.unit = float(p)  # otcore's cost |x - y|^p is p times GeomLoss's
            cost = "sqeuclidean" if p == 2 else "euclidean"
            if blur is not None:
                eps = self.unit * check_positive("blur", blur) ** p
            elif eps is not None:
                eps = self.unit * check_positive("eps", eps)
            rho = None if reach is None else self.unit * check_positive("reach", reach) ** p
            ratio = check_ratio("scaling", scaling)
            eps_scaling = None if ratio is None else ratio ** p
        else:
            self.unit = 1.0
        if eps is None:
            raise ValueError("eps is missing (or GeomLoss's blur)")
        self.eps = check_positive("eps", eps)
        self.rho = None if rho is None else check_rho("rho", rho, 1.0, "tau")
        self.max_iter = check_max_iter("max_iter", max_iter)
        self.cost = "sqeuclidean" if cost is None else cost
        self.debias, self.warm_start = bool(debias), bool(warm_start)
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
                x, y, a, b, eps=self.eps, cost=self.cost, backend=self.backend, rho=self.rho, tol=self.tol,
                max_iter=self.max_iter, eps_scaling=self.eps_scaling, validate=self.validate, init=init,
                relative_eps=self.relative_eps)
        else:
            scaling = None if init is not None else self.eps_scaling
            res = sinkhorn(PointCloud(x, y, cost=self.cost, backend=self.backend, validate=self.validate), a, b,
                           eps=self.eps, rho_a=self.rho, rho_b=self.rho, tol=self.tol, max_iter=self.max_iter,
                           grad="envelope",
                           init=None if init is None else (init[0], init[1]),
                           eps_scaling=scaling, validate=self.validate, relative_eps=self.relative_eps)
            value, potentials = res.value, (res.f, res.g)
        if self.warm_start:
            self._key, self._potentials = key, potentials
        return value if self.unit == 1.0 else value / self.unit

    def _key_of(self, x, y, a, b) -> tuple:
        """What a stored warm start must match: shapes, dtype, device (and, debiased, sameness)."""
        same = self.debias and same_measures(x, y, a, b, compare_values=self.validate)
        return (tuple(x.shape), tuple(y.shape), x.dtype, x.device, same)

    def extra_repr(self) -> str:
        unbalanced = "" if self.rho is None else f", rho={self.rho}"
        scale = "" if self.unit == 1.0 else f", value scaled by 1/{self.unit:g} (GeomLoss's |x - y|^p / p)"
        return (f"eps={self.eps}, cost={self.cost!r}{unbalanced}, debias={self.debias}, "
                f"warm_start={self.warm_start}{scale}")
