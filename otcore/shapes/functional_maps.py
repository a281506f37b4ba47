"""Functional maps: linear maps between the spectral bases of two shapes, and their regularisers.

With ``Phi_x`` (n_x, k_x) and ``Phi_y`` (n_y, k_y) the mass-orthonormal Laplace-Beltrami bases
(``laplacian_basis``), a map T: y -> x of the vertices (a point map, or a soft map given as a
row-stochastic (n_y, n_x) matrix ``Pi_yx``) pulls functions back from x to y, ``f_y = Pi_yx f_x``.
In the bases this is the functional map [1]

    C_xy = Phi_y^+ Pi_yx Phi_x   (k_y, k_x),     Phi^+ = Phi^T M  (the mass-weighted pseudo-inverse),

which sends the spectral coefficients of a function on x to those of its pull-back on y. The
conventions follow ULRSSM [3] and Le et al. [4]: ``C_xy`` is estimated from descriptors F_x, F_y
(n, d) by regularised least squares (``fmap_from_features``), and its deviation from a bijective,
area-preserving (orthogonal), isometric (commuting with the Laplacians) map that agrees with a
soft point map (coupling) is penalised (``bijectivity_loss``, ``orthogonality_loss``,
``laplacian_commutativity_loss``, ``coupling_loss``). Every function is differentiable (except
the nearest-neighbour conversions to point maps); the regularisers take optional leading batch
dimensions ``...``; the squared norms are Frobenius norms.

References:
    [1] M. Ovsjanikov, M. Ben-Chen, J. Solomon, A. Butscher, L. Guibas. Functional maps: a flexible
        representation of maps between shapes. SIGGRAPH 2012.
    [2] S. Attaiki, G. Pai, M. Ovsjanikov. DPFM: deep partial functional maps. 3DV 2021
        (the resolvent Laplacian-commutativity mask).
    [3] D. Cao, P. Roetzer, F. Bernard. Unsupervised learning of robust spectral shape matching.
        SIGGRAPH 2023 (ULRSSM).
    [4] T. Le, K. Nguyen, S. Sun, N. Ho, X. Xie. Integrating efficient optimal transport and
        functional maps for unsupervised shape correspondence learning. CVPR 2024.
"""

from __future__ import annotations

import math

import torch

from otcore._validation import _real, check_finite, check_positive
from otcore.geometry import PointCloud

#: Rows of the cost computed at once by ``nearest`` (bounds memory at CHUNK x n).
CHUNK = 2048


def _floating(name: str, t, dims: int) -> torch.Tensor:
    if not torch.is_tensor(t) or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating torch.Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.dim() < dims or 0 in t.shape:
        raise ValueError(f"{name} must have at least {dims} non-empty dimension(s), got shape {tuple(t.shape)}")
    return t


def check_spectrum(name: str, spectrum, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(evals (k,), evecs (n, k), mass (n,))`` from a ``laplacian_basis`` output (any 3-tuple),
    checked for shapes, finiteness and positive masses; ``n`` the expected number of vertices."""
    if not isinstance(spectrum, (tuple, list)) or len(spectrum) != 3:
        raise ValueError(f"{name} must be a tuple (evals, evecs, mass) as laplacian_basis returns, "
                         f"got {type(spectrum).__name__}")
    evals, evecs, mass = spectrum
    for part, t, dims in (("evals", evals, 1), ("evecs", evecs, 2), ("mass", mass, 1)):
        if not torch.is_tensor(t) or not t.is_floating_point() or t.dim() != dims or 0 in t.shape:
            raise ValueError(f"{name}.{part} must be a non-empty {dims}-D floating tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        check_finite(f"{name}.{part}", t)
    if evals.shape[0] != evecs.shape[1] or mass.shape[0] != evecs.shape[0]:
        raise ValueError(f"{name} has inconsistent shapes: evals {tuple(evals.shape)}, evecs {tuple(evecs.shape)}, "
                         f"mass {tuple(mass.shape)} (expected (k,), (n, k), (n,))")
    if n is not None and evecs.shape[0] != n:
        raise ValueError(f"{name} describes {evecs.shape[0]} vertices, the features {n}")
    if bool((mass <= 0).any()):
        raise ValueError(f"{name}.mass must be > 0 everywhere")
    return evals, evecs, mass


def spectral_coefficients(f: torch.Tensor, evecs: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """``Phi^+ f = Phi^T M f``: (..., k, d) coefficients of functions f (..., n, d) in the basis
    ``evecs`` (..., n, k), orthonormal for the masses (..., n) [1].

    Raises:
        ValueError: ``f``, ``evecs`` or ``mass`` not floating tensors of these shapes (n must agree).
    """
    _floating("f", f, 2)
    _floating("evecs", evecs, 2)
    _floating("mass", mass, 1)
    if not f.shape[-2] == evecs.shape[-2] == mass.shape[-1]:
        raise ValueError(f"f (..., n, d), evecs (..., n, k) and mass (..., n) must agree on n, got "
                         f"{tuple(f.shape)}, {tuple(evecs.shape)} and {tuple(mass.shape)}")
    return evecs.mT @ (mass.unsqueeze(-1) * f)


def resolvent_mask(evals_x: torch.Tensor, evals_y: torch.Tensor, gamma: float = 0.5) -> torch.Tensor:
    """The (..., k_y, k_x) resolvent commutativity mask of DPFM [2] / ULRSSM [3].

    With eigenvalues normalised by the largest of both spectra and ``mu = lambda^gamma``,
    ``D_ij = |R(mu_y_i) - R(mu_x_j)|^2`` for the resolvent ``R(mu) = 1 / (mu - i)``, i.e.
    ``(mu_y/(mu_y^2+1) - mu_x/(mu_x^2+1))^2 + (1/(mu_y^2+1) - 1/(mu_x^2+1))^2``: 0 between equal
    eigenvalues, growing with their gap (bounded, unlike the plain commutator's squared gap).

    Args:
        evals_x: (..., k_x) eigenvalues of x (>= 0).
        evals_y: (..., k_y) eigenvalues of y (>= 0).
        gamma: exponent (> 0).

    Raises:
        ValueError: ``evals_x`` / ``evals_y`` not floating tensors, ``gamma`` not > 0.
    """
    gamma = check_positive("gamma", gamma)
    _floating("evals_x", evals_x, 1)
    _floating("evals_y", evals_y, 1)
    scale = torch.maximum(evals_x.amax(-1, keepdim=True), evals_y.amax(-1, keepdim=True)).clamp_min(
        torch.finfo(evals_x.dtype).tiny)
    mx = (evals_x / scale).clamp_min(0).pow(gamma).unsqueeze(-2)     # (..., 1, k_x)
    my = (evals_y / scale).clamp_min(0).pow(gamma).unsqueeze(-1)     # (..., k_y, 1)
    re = my / (my.square() + 1) - mx / (mx.square() + 1)
    im = 1 / (my.square() + 1) - 1 / (mx.square() + 1)
    return re.square() + im.square()


def fmap_from_features(feat_x: torch.Tensor, feat_y: torch.Tensor, spectrum_x, spectrum_y, *,
                       lam: float = 100.0, gamma: float = 0.5) -> torch.Tensor:
    """The functional map ``C_xy`` (k_y, k_x) that best carries the descriptors of x to those of y.

    With ``A = Phi_x^+ F_x`` (k_x, d) and ``B = Phi_y^+ F_y`` (k_y, d), solves

        min_C ||C A - B||^2 + lam * sum_ij D_ij C_ij^2,    D = resolvent_mask(evals_x, evals_y, gamma)

    row by row: ``(A A^T + lam diag(D_i)) c_i = A b_i`` (k_y solves of size k_x; the regularised
    functional-map layer of ULRSSM [3] / DPFM [2]). ``lam = 0`` is plain least squares (needs
    d >= k_x descriptors). Differentiable in the features.

    Args:
        feat_x: (n_x, d) descriptors on x.
        feat_y: (n_y, d) descriptors on y (the same d).
        spectrum_x: ``(evals, evecs, mass)`` of x (``laplacian_basis``).
        spectrum_y: ``(evals, evecs, mass)`` of y.
        lam: weight (>= 0) of the Laplacian-commutativity prior.
        gamma: exponent of the resolvent mask (> 0).

    Returns:
        (k_y, k_x) in the features' dtype.

    Raises:
        ValueError: shapes that do not match, non-finite inputs, lam < 0, gamma <= 0.
    """
    _pair(feat_x, feat_y)
    evals_x, evecs_x, mass_x = (t.to(feat_x.dtype) for t in check_spectrum("spectrum_x", spectrum_x, feat_x.shape[0]))
    evals_y, evecs_y, mass_y = (t.to(feat_x.dtype) for t in check_spectrum("spectrum_y", spectrum_y, feat_y.shape[0]))
    lam = check_lam(lam)
    A = spectral_coefficients(feat_x, evecs_x, mass_x)
    B = spectral_coefficients(feat_y, evecs_y, mass_y)
    lhs = (A @ A.mT).unsqueeze(-3) + lam * torch.diag_embed(resolvent_mask(evals_x, evals_y, gamma))
    return torch.linalg.solve(lhs, (B @ A.mT).unsqueeze(-1)).squeeze(-1)


def check_lam(lam: float) -> float:
    """Raise unless ``lam`` (the weight of the functional-map prior) is a finite number >= 0."""
    v = _real("lam", lam, "a number >= 0")
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"lam must be finite and >= 0, got {lam!r}")
    return v


def _pair(feat_x, feat_y) -> None:
    for name, t in (("feat_x", feat_x), ("feat_y", feat_y)):
        _floating(name, t, 2)
        if t.dim() != 2:
            raise ValueError(f"{name} must have shape (n, d), got {tuple(t.shape)}")
        check_finite(name, t)
    if feat_x.shape[1] != feat_y.shape[1] or feat_x.dtype != feat_y.dtype:
        raise ValueError(f"feat_x and feat_y must have the same dimension d and dtype, got {tuple(feat_x.shape)} "
                         f"{feat_x.dtype} and {tuple(feat_y.shape)} {feat_y.dtype}")


def _identity_gap(m: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    return (m - eye).square().sum((-2, -1))


def bijectivity_loss(fmap_xy: torch.Tensor, fmap_yx: torch.Tensor) -> torch.Tensor:
    """``||C_xy C_yx - I||^2 + ||C_yx C_xy - I||^2``: 0 iff the two maps are mutually inverse.

    Args:
        fmap_xy: (..., k_y, k_x).
        fmap_yx: (..., k_x, k_y).

    Returns:
        (...) the penalty.
    """
    _floating("fmap_xy", fmap_xy, 2)
    _floating("fmap_yx", fmap_yx, 2)
    if fmap_xy.shape[-2:] != fmap_yx.shape[-2:][::-1]:
        raise ValueError(f"fmap_yx must have the transposed shape of fmap_xy, got {tuple(fmap_xy.shape)} "
                         f"and {tuple(fmap_yx.shape)}")
    return _identity_gap(fmap_xy @ fmap_yx) + _identity_gap(fmap_yx @ fmap_xy)


def orthogonality_loss(fmap: torch.Tensor) -> torch.Tensor:
    """``||C^T C - I||^2`` of a functional map C (..., k_y, k_x): 0 iff C preserves the L2 inner
    product of functions (an area-preserving point map)."""
    _floating("fmap", fmap, 2)
    return _identity_gap(fmap.mT @ fmap)


def laplacian_commutativity_loss(fmap_xy: torch.Tensor, evals_x: torch.Tensor, evals_y: torch.Tensor) -> torch.Tensor:
    """``||C_xy diag(evals_x) - diag(evals_y) C_xy||^2 = sum_ij (evals_y_i - evals_x_j)^2 C_ij^2``.

    0 iff C maps each eigenspace of x into the eigenspace of y of the same eigenvalue (an
    isometry). The scale of the eigenvalues is the caller's: ``ShapeMatchingLoss`` divides both
    spectra by their joint maximum so the penalty does not depend on the shapes' size.

    Args:
        fmap_xy: (..., k_y, k_x).
        evals_x: (..., k_x).
        evals_y: (..., k_y).

    Returns:
        (...) the penalty.
    """
    _floating("fmap_xy", fmap_xy, 2)
    _floating("evals_x", evals_x, 1)
    _floating("evals_y", evals_y, 1)
    if evals_x.shape[-1] != fmap_xy.shape[-1] or evals_y.shape[-1] != fmap_xy.shape[-2]:
        raise ValueError(f"evals_x / evals_y have lengths {evals_x.shape[-1]} / {evals_y.shape[-1]}, expected "
                         f"{fmap_xy.shape[-1]} / {fmap_xy.shape[-2]} to match fmap_xy")
    gap = evals_y.unsqueeze(-1) - evals_x.unsqueeze(-2)
    return (gap * fmap_xy).square().sum((-2, -1))


def pointmap_to_fmap(pointmap: torch.Tensor, spectrum_x, spectrum_y) -> torch.Tensor:
    """The functional map ``C_xy = Phi_y^+ Pi_yx Phi_x`` (k_y, k_x) of a map from y to x.

    Args:
        pointmap: (n_y,) integer indices of vertices of x (the image of each vertex of y), or a
            (n_y, n_x) floating soft map (rows: vertices of y, typically row-stochastic).
        spectrum_x: ``(evals, evecs, mass)`` of x.
        spectrum_y: ``(evals, evecs, mass)`` of y.

    Returns:
        (k_y, k_x), in the dtype of the soft map (or of ``spectrum_y`` for a point map);
        differentiable in a soft map and in the spectra.

    Raises:
        ValueError: a pointmap that is neither (n_y,) indices in [0, n_x) nor an (n_y, n_x)
            floating matrix; bad spectra.
    """
    _, evecs_x, _ = check_spectrum("spectrum_x", spectrum_x)
    _, evecs_y, mass_y = check_spectrum("spectrum_y", spectrum_y)
    n_x, n_y = evecs_x.shape[0], evecs_y.shape[0]
    if not torch.is_tensor(pointmap):
        raise ValueError(f"pointmap must be a torch.Tensor, got {type(pointmap).__name__}")
    if pointmap.is_floating_point():
        if pointmap.shape != (n_y, n_x):
            raise ValueError(f"pointmap (soft) must have shape (n_y, n_x) = ({n_y}, {n_x}), got {tuple(pointmap.shape)}")
        check_finite("pointmap", pointmap)
        pulled = pointmap @ evecs_x.to(pointmap.dtype)
        evecs_y, mass_y = evecs_y.to(pointmap.dtype), mass_y.to(pointmap.dtype)
    else:
        if pointmap.dtype == torch.bool or pointmap.is_complex() or pointmap.shape != (n_y,):
            raise ValueError(f"pointmap must be ({n_y},) integer indices or an ({n_y}, {n_x}) soft map, got "
                             f"{pointmap.dtype} {tuple(pointmap.shape)}")
        if bool((pointmap < 0).any()) or bool((pointmap >= n_x).any()):
            raise ValueError(f"pointmap holds indices outside [0, {n_x})")
        pulled = evecs_x[pointmap.long()].to(evecs_y.dtype)
    return spectral_coefficients(pulled, evecs_y, mass_y)


def nearest(queries: torch.Tensor, points: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """For each query, the index of the point minimising ``|q_i - p_j|^2 - shift_j``.

    Computed in blocks of rows (memory O(CHUNK x n)); not differentiable. ``shift`` (m,) is
    e.g. a dual potential: the row-wise argmax of an entropic plan is ``nearest(y, x, g)``.

    Args:
        queries: (s, d).
        points: (m, d).
        shift: (m,) or None (plain nearest neighbours).

    Returns:
        (s,) int64 indices into ``points``.

    Raises:
        ValueError: ``queries`` / ``points`` not (s, d) / (m, d) floating tensors of one d, or
            ``shift`` not an (m,) floating tensor.
    """
    for name, t in (("queries", queries), ("points", points)):
        if _floating(name, t, 2).dim() != 2:
            raise ValueError(f"{name} must have shape (rows, d), got {tuple(t.shape)}")
    if queries.shape[1] != points.shape[1]:
        raise ValueError(f"queries and points must have the same dimension d, got {tuple(queries.shape)} "
                         f"and {tuple(points.shape)}")
    if shift is not None and _floating("shift", shift, 1).shape != (points.shape[0],):
        raise ValueError(f"shift must have shape ({points.shape[0]},) (one value per point), got {tuple(shift.shape)}")
    geom = PointCloud(queries.detach(), points.detach(), backend="torch")
    out = []
    for start in range(0, queries.shape[0], CHUNK):
        cost = geom.cost_rows(slice(start, start + CHUNK))[0]
        out.append((cost if shift is None else cost - shift.detach().to(cost.dtype)).argmin(-1))
    return torch.cat(out)


def fmap_to_pointmap(fmap_xy: torch.Tensor, evecs_x: torch.Tensor, evecs_y: torch.Tensor) -> torch.Tensor:
    """The point map y -> x (n_y,) closest to a functional map ``C_xy`` (k_y, k_x).

    A point map T with ``Phi_y C_xy = Pi_T Phi_x`` sends vertex i of y to the vertex j of x whose
    spectral embedding ``Phi_x[j]`` is nearest to ``Phi_y[i] C_xy`` [1]: this is the minimiser of
    ``||Pi Phi_x - Phi_y C_xy||`` over point maps, found by nearest-neighbour search.

    Args:
        fmap_xy: (k_y, k_x).
        evecs_x: (n_x, k_x).
        evecs_y: (n_y, k_y).

    Returns:
        (n_y,) int64 indices of vertices of x.

    Raises:
        ValueError: shapes that do not match.
    """
    for name, t in (("fmap_xy", fmap_xy), ("evecs_x", evecs_x), ("evecs_y", evecs_y)):
        _floating(name, t, 2)
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if fmap_xy.shape != (evecs_y.shape[1], evecs_x.shape[1]):
        raise ValueError(f"fmap_xy must have shape (k_y, k_x) = ({evecs_y.shape[1]}, {evecs_x.shape[1]}), "
                         f"got {tuple(fmap_xy.shape)}")
    dtype = torch.promote_types(fmap_xy.dtype, evecs_y.dtype)
    return nearest(evecs_y.to(dtype) @ fmap_xy.to(dtype), evecs_x.to(dtype))


def soft_pointmap(feat_from: torch.Tensor, feat_to: torch.Tensor, *, tau: float = 0.07) -> torch.Tensor:
    """Soft point map ``softmax_j(<f_i, g_j> / tau)`` of l2-normalised features (rows sum to 1).

    Args:
        feat_from: (n, d) features of the shape whose vertices are mapped.
        feat_to: (m, d) features of the other shape.
        tau: temperature (> 0); the soft maps of ULRSSM [3] and Le et al. [4] use 0.07.

    Returns:
        (n, m) row-stochastic, differentiable in both feature sets.
    """
    tau = check_positive("tau", tau)
    _pair(feat_from, feat_to)
    a = torch.nn.functional.normalize(feat_from, dim=-1)
    b = torch.nn.functional.normalize(feat_to, dim=-1)
    return torch.softmax(a @ b.mT / tau, dim=-1)


def coupling_loss(fmap_xy: torch.Tensor, soft_map_yx: torch.Tensor, spectrum_x, spectrum_y) -> torch.Tensor:
    """``||C_xy - Phi_y^+ Pi_yx Phi_x||^2``: agreement of a functional map with a soft point map.

    Args:
        fmap_xy: (k_y, k_x).
        soft_map_yx: (n_y, n_x) soft map from y to x (e.g. ``soft_pointmap(feat_y, feat_x)``).
        spectrum_x: ``(evals, evecs, mass)`` of x.
        spectrum_y: ``(evals, evecs, mass)`` of y.

    Returns:
        () the penalty, differentiable in the map and the soft map.
    """
    _floating("fmap_xy", fmap_xy, 2)
    implied = pointmap_to_fmap(soft_map_yx, spectrum_x, spectrum_y)
    if implied.shape != fmap_xy.shape:
        raise ValueError(f"fmap_xy has shape {tuple(fmap_xy.shape)}, the spectra give {tuple(implied.shape)}")
    return (fmap_xy - implied.to(fmap_xy.dtype)).square().sum((-2, -1))
