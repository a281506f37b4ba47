"""Unsupervised shape correspondence: functional maps, sliced-Wasserstein alignment, entropic OT.

The loss of Le et al. [1] (built on ULRSSM [2]) for per-vertex features ``F_x`` (n_x, d) and
``F_y`` (n_y, d) that a network computes on two shapes with spectra ``(evals, evecs, mass)``
(``otcore.shapes.laplacian_basis``):

- functional maps ``C_xy``, ``C_yx`` from the features by regularised least squares
  (``otcore.shapes.fmap_from_features``: resolvent-mask prior of weight ``lam``);
- soft point maps ``Pi_yx`` (n_y, n_x), ``Pi_xy`` (n_x, n_y) from the l2-normalised features
  ``Fh``: ``soft_map="softmax"`` (training: ``softmax(<Fh_y, Fh_x> / tau)`` by rows, as [1, 2])
  or ``"sinkhorn"`` (the adaptive refinement of [1]: the entropic OT plan P between the uniform
  clouds ``Fh_y`` and ``Fh_x`` with cost ``|Fh_y_i - Fh_x_j|^2`` and
  ``eps = 2 sigma^2 mean(cost)`` (the paper's ``exp(-D / (2 sigma^2))`` with D normalised by its
  mean), by ``otcore.sinkhorn``; ``Pi_yx`` is P with its rows normalised, ``Pi_xy`` is P^T with
  its rows normalised (``n_y P`` and ``n_x P^T`` once Sinkhorn has converged). The plan is computed
  on detached features, so it is a constant of the loss, as in [1]);
- the loss, a weighted sum of

      bijectivity    ||C_xy C_yx - I||^2 + ||C_yx C_xy - I||^2
      orthogonality  ||C_xy^T C_xy - I||^2 + ||C_yx^T C_yx - I||^2
      laplacian      ||C_xy L_x - L_y C_xy||^2 + ||C_yx L_y - L_x C_yx||^2  (L = diag(evals) / max evals)
      coupling       ||C_xy - Phi_y^+ Pi_yx Phi_x||^2 + ||C_yx - Phi_x^+ Pi_xy Phi_y||^2
      alignment      SW_p(Fh_x, Pi_xy Fh_y) + SW_p(Pi_yx Fh_x, Fh_y)  (otcore.sliced_wasserstein)

The point-to-point map at inference (``shape_matching_pointmap``, ``ShapeMatchingLoss.pointmap``)
is the row-wise argmax of the entropic plan: vertex i of y goes to
``argmin_j |Fh_y_i - Fh_x_j|^2 - g_j`` with g the plan's dual potential on x (nearest-neighbour
search shifted by g; the plan is never formed), so crowded targets are penalised and the map is
closer to a bijection than plain nearest neighbours.

Choices that differ from [1]: the alignment term compares l2-normalised features (the soft maps
use them too; raw features would let the network lower the term by shrinking its outputs) and
uses otcore's sliced-Wasserstein convention, the p-th root of the mean over directions of
W_p^p (the paper's code averages the roots, a smaller value by Jensen's inequality); the
Laplacian term divides both spectra by their joint maximum so that its weight does not depend
on the shapes' scale. Meshes of different sizes do not batch: a batch of pairs is a sum of losses.

References:
    [1] T. Le, K. Nguyen, S. Sun, N. Ho, X. Xie. Integrating efficient optimal transport and
        functional maps for unsupervised shape correspondence learning. CVPR 2024.
    [2] D. Cao, P. Roetzer, F. Bernard. Unsupervised learning of robust spectral shape matching.
        SIGGRAPH 2023.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from otcore._validation import _real, check_max_iter, check_positive
from otcore.core.result import OTResult
from otcore.geometry import PointCloud
from otcore.shapes.functional_maps import (
    _pair,
    bijectivity_loss,
    check_lam,
    check_spectrum,
    coupling_loss,
    fmap_from_features,
    laplacian_commutativity_loss,
    nearest,
    orthogonality_loss,
    soft_pointmap,
)
from otcore.solvers import sinkhorn, sliced_wasserstein
from otcore.solvers.ot1d import check_p
from otcore.solvers.sliced import _generator

SOFT_MAPS = ("softmax", "sinkhorn")
TERMS = ("bijectivity", "orthogonality", "laplacian", "coupling", "alignment")


@dataclass(frozen=True)
class ShapeMatchingTerms:
    """The unweighted terms of the shape-matching loss and the maps they were computed from.

    Attributes:
        bijectivity: () tensor (module docstring).
        orthogonality: () tensor (module docstring).
        laplacian: () tensor (module docstring).
        coupling: () tensor (module docstring).
        alignment: () tensor (module docstring).
        fmap_xy: (k_y, k_x) functional map from x to y.
        fmap_yx: (k_x, k_y) functional map from y to x.
        soft_map_yx: (n_y, n_x) soft point map from y to x (rows sum to 1).
        soft_map_xy: (n_x, n_y) soft point map from x to y (rows sum to 1).
    """

    bijectivity: torch.Tensor
    orthogonality: torch.Tensor
    laplacian: torch.Tensor
    coupling: torch.Tensor
    alignment: torch.Tensor
    fmap_xy: torch.Tensor
    fmap_yx: torch.Tensor
    soft_map_yx: torch.Tensor
    soft_map_xy: torch.Tensor


def _unit(feat: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(feat, dim=-1)


def entropic_plan(feat_x: torch.Tensor, feat_y: torch.Tensor, *, sigma: float = 0.1, n_iter: int = 50) -> OTResult:
    """The entropic OT plan between the l2-normalised features of y (rows) and x (columns).

    Uniform weights, cost ``|Fh_y_i - Fh_x_j|^2`` (a ``PointCloud``: never materialised), and
    ``eps = 2 sigma^2 mean_ij(cost)`` (the mean in closed form). Runs exactly ``n_iter``
    Sinkhorn iterations (``tol=0``; the refinement of [1] runs 10); the inputs are detached.

    Args:
        feat_x: (n_x, d).
        feat_y: (n_y, d).
        sigma: bandwidth (> 0) relative to the mean cost.
        n_iter: Sinkhorn iterations (>= 1).

    Returns:
        ``OTResult`` of the (n_y, n_x) problem, in the features' dtype.
    """
    sigma = check_positive("sigma", sigma)
    n_iter = check_max_iter("n_iter", n_iter)
    _pair(feat_x, feat_y)
    ux, uy = _unit(feat_x.detach()), _unit(feat_y.detach())
    mean_cost = ux.square().sum(-1).mean() + uy.square().sum(-1).mean() - 2 * ux.mean(0) @ uy.mean(0)
    eps = 2 * sigma**2 * float(mean_cost.clamp_min(torch.finfo(ux.dtype).eps))
    return sinkhorn(PointCloud(uy, ux), eps=eps, max_iter=n_iter, tol=0, grad="envelope")


def shape_matching_pointmap(feat_x: torch.Tensor, feat_y: torch.Tensor, *, sigma: float = 0.1,
                            n_iter: int = 50) -> torch.Tensor:
    """The point map y -> x (n_y,) read from the entropic plan of the features (``entropic_plan``).

    Vertex i of y goes to its most likely target under the plan,
    ``argmax_j P_ij = argmin_j |Fh_y_i - Fh_x_j|^2 - g_j`` (g: the plan's potential on x).
    Not differentiable.

    Args:
        feat_x: (n_x, d).
        feat_y: (n_y, d).
        sigma: as in ``entropic_plan``.
        n_iter: as in ``entropic_plan``.

    Returns:
        (n_y,) int64 indices of vertices of x.
    """
    result = entropic_plan(feat_x, feat_y, sigma=sigma, n_iter=n_iter)
    return nearest(_unit(feat_y.detach()), _unit(feat_x.detach()), shift=result.g)


def shape_matching_terms(feat_x: torch.Tensor, feat_y: torch.Tensor, spectrum_x, spectrum_y, *,
                         lam: float = 100.0, gamma: float = 0.5, soft_map: str = "softmax", tau: float = 0.07,
                         sigma: float = 0.1, n_iter: int = 50, n_projections: int = 200, p: float = 2,
                         seed: int | torch.Generator | None = None) -> ShapeMatchingTerms:
    """Every term of the shape-matching loss (the functional twin of ``ShapeMatchingLoss``).

    Args:
        feat_x: (n_x, d) per-vertex features of x.
        feat_y: (n_y, d) per-vertex features of y (same d and dtype as ``feat_x``).
        spectrum_x: ``(evals (k,), evecs (n, k), mass (n,))`` of x, e.g.
            ``otcore.shapes.laplacian_basis``; cast to the features' dtype.
        spectrum_y: the same for y.
        lam: the functional-map solver's prior (``otcore.shapes.fmap_from_features``).
        gamma: the functional-map solver's prior (``otcore.shapes.fmap_from_features``).
        soft_map: ``"softmax"`` (temperature ``tau``) or ``"sinkhorn"`` (``sigma``, ``n_iter``
            iterations; the plan is held constant).
        tau: the temperature of the ``"softmax"`` soft maps (``otcore.shapes.soft_pointmap``).
        sigma: the bandwidth of the ``"sinkhorn"`` soft maps, as in ``entropic_plan``.
        n_iter: the Sinkhorn iterations of the ``"sinkhorn"`` soft maps, as in ``entropic_plan``.
        n_projections: the number of directions of the sliced-Wasserstein alignment
            (``otcore.sliced_wasserstein``).
        p: the order of the sliced-Wasserstein alignment.
        seed: the seed of the alignment's directions: an int gives the same directions at every
            call, None fresh ones.

    Returns:
        ``ShapeMatchingTerms``; each term is differentiable in the features.

    Raises:
        ValueError: features of different dimensions or dtypes, non-finite values, spectra that do
            not match the features, and bad options (each named).
    """
    _pair(feat_x, feat_y)
    if soft_map not in SOFT_MAPS:
        raise ValueError(f"soft_map must be one of {SOFT_MAPS}, got {soft_map!r}")
    dtype = feat_x.dtype
    spectrum_x = tuple(t.to(dtype) for t in check_spectrum("spectrum_x", spectrum_x, feat_x.shape[0]))
    spectrum_y = tuple(t.to(dtype) for t in check_spectrum("spectrum_y", spectrum_y, feat_y.shape[0]))
    fmap_xy = fmap_from_features(feat_x, feat_y, spectrum_x, spectrum_y, lam=lam, gamma=gamma)
    fmap_yx = fmap_from_features(feat_y, feat_x, spectrum_y, spectrum_x, lam=lam, gamma=gamma)
    if soft_map == "softmax":
        pi_yx, pi_xy = soft_pointmap(feat_y, feat_x, tau=tau), soft_pointmap(feat_x, feat_y, tau=tau)
    else:
        # (n_y, n_x); after a few iterations only one of its marginals is exact: each soft map is
        # normalised on its own (the final row / column normalisations of [1])
        plan = entropic_plan(feat_x, feat_y, sigma=sigma, n_iter=n_iter).plan
        pi_yx, pi_xy = plan / plan.sum(1, keepdim=True), (plan / plan.sum(0, keepdim=True)).mT
    evals_x, evals_y = spectrum_x[0], spectrum_y[0]
    scale = torch.maximum(evals_x.max(), evals_y.max()).clamp_min(torch.finfo(dtype).tiny)
    ux, uy = _unit(feat_x), _unit(feat_y)
    align = sliced_wasserstein(ux, pi_xy @ uy, n_projections=n_projections, p=p, seed=seed) + \
        sliced_wasserstein(pi_yx @ ux, uy, n_projections=n_projections, p=p, seed=seed)
    return ShapeMatchingTerms(
        bijectivity=bijectivity_loss(fmap_xy, fmap_yx),
        orthogonality=orthogonality_loss(fmap_xy) + orthogonality_loss(fmap_yx),
        laplacian=laplacian_commutativity_loss(fmap_xy, evals_x / scale, evals_y / scale)
        + laplacian_commutativity_loss(fmap_yx, evals_y / scale, evals_x / scale),
        coupling=coupling_loss(fmap_xy, pi_yx, spectrum_x, spectrum_y)
        + coupling_loss(fmap_yx, pi_xy, spectrum_y, spectrum_x),
        alignment=align, fmap_xy=fmap_xy, fmap_yx=fmap_yx, soft_map_yx=pi_yx, soft_map_xy=pi_xy,
    )


class ShapeMatchingLoss(torch.nn.Module):
    """The unsupervised shape-matching loss of Le et al. [1] (module docstring), as a module.

    ``loss = sum_t weight_t * term_t`` over the terms bijectivity, orthogonality, laplacian,
    coupling and alignment. Defaults follow the paper's release configuration (weights 1, the
    Laplacian term off, ``lam = 100``, ``tau = 0.07``, 200 projections, p = 2), with the
    alignment weight 1 on l2-normalised features instead of 100 on raw ones.

    Args:
        bijectivity: weight (>= 0).
        orthogonality: weight (>= 0).
        laplacian: weight (>= 0).
        coupling: weight (>= 0).
        alignment: weight (>= 0).
        lam: as in ``shape_matching_terms``.
        gamma: as in ``shape_matching_terms``.
        soft_map: as in ``shape_matching_terms``. Switch it to ``"sinkhorn"`` for the adaptive
            refinement of a trained network on a test pair.
        tau: as in ``shape_matching_terms``.
        sigma: as in ``shape_matching_terms``.
        n_iter: as in ``shape_matching_terms``.
        n_projections: as in ``shape_matching_terms``.
        p: as in ``shape_matching_terms``.
        seed: as in ``shape_matching_terms``.

    Raises:
        ValueError: a negative or non-finite weight, or a bad option (each named), at construction.

    Example::

        spec_x = otcore.shapes.laplacian_basis(vx, fx, 50)
        spec_y = otcore.shapes.laplacian_basis(vy, fy, 50)
        criterion = otcore.nn.ShapeMatchingLoss()
        loss = criterion(net(x_inputs), net(y_inputs), spec_x, spec_y)
        loss.backward()
        p2p = criterion.pointmap(net(x_inputs), net(y_inputs))   # (n_y,) vertices of x
    """

    def __init__(self, *, bijectivity: float = 1.0, orthogonality: float = 1.0, laplacian: float = 0.0,
                 coupling: float = 1.0, alignment: float = 1.0, lam: float = 100.0, gamma: float = 0.5,
                 soft_map: str = "softmax", tau: float = 0.07, sigma: float = 0.1, n_iter: int = 50,
                 n_projections: int = 200, p: float = 2, seed: int | torch.Generator | None = None):
        super().__init__()
        weights = {"bijectivity": bijectivity, "orthogonality": orthogonality, "laplacian": laplacian,
                   "coupling": coupling, "alignment": alignment}
        for name, w in weights.items():
            v = _real(name, w, "a weight >= 0")
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite weight >= 0, got {w!r}")
        if soft_map not in SOFT_MAPS:
            raise ValueError(f"soft_map must be one of {SOFT_MAPS}, got {soft_map!r}")
        _generator(seed)  # raises on a bad seed; the seed itself is kept (an int: the same directions each call)
        self.weights = {name: float(w) for name, w in weights.items()}
        self.options: dict[str, Any] = {"lam": check_lam(lam), "gamma": check_positive("gamma", gamma), "soft_map": soft_map,
                        "tau": check_positive("tau", tau), "sigma": check_positive("sigma", sigma),
                        "n_iter": check_max_iter("n_iter", n_iter),
                        "n_projections": check_max_iter("n_projections", n_projections), "p": check_p(p), "seed": seed}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in {**self.weights, **self.options}.items())

    def terms(self, feat_x: torch.Tensor, feat_y: torch.Tensor, spectrum_x, spectrum_y) -> ShapeMatchingTerms:
        """The unweighted terms and maps (``shape_matching_terms`` with this module's options)."""
        return shape_matching_terms(feat_x, feat_y, spectrum_x, spectrum_y, **self.options)

    def forward(self, feat_x: torch.Tensor, feat_y: torch.Tensor, spectrum_x, spectrum_y) -> torch.Tensor:
        """The weighted loss (), differentiable in ``feat_x`` (n_x, d) and ``feat_y`` (n_y, d)."""
        terms = self.terms(feat_x, feat_y, spectrum_x, spectrum_y)
        return sum(w * getattr(terms, name) for name, w in self.weights.items())

    def pointmap(self, feat_x: torch.Tensor, feat_y: torch.Tensor) -> torch.Tensor:
        """(n_y,) the refined point map y -> x (``shape_matching_pointmap`` with ``sigma``, ``n_iter``)."""
        return shape_matching_pointmap(feat_x, feat_y, sigma=self.options["sigma"], n_iter=self.options["n_iter"])
