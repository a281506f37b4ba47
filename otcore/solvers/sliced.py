"""Sliced Wasserstein distances: 1-D OT along directions of the sphere, averaged or maximised.

For measures mu, nu on R^d and directions theta_1..theta_L on the unit sphere,

    SW_p(mu, nu)     = ( (1/L) sum_l W_p^p(theta_l # mu, theta_l # nu) )^(1/p)     (sliced)
    max-SW_p(mu, nu) = max_theta W_p(theta # mu, theta # nu)                       (max-sliced)
    EBSW_p(mu, nu)   = ( sum_l w_l W_p^p(theta_l # mu, theta_l # nu) )^(1/p),
                       w = softmax_l(W_p^p(theta_l # mu, theta_l # nu))             (energy-based, f = exp)

with theta # mu the law of <theta, X>. Each 1-D problem is solved by sorting
(``otcore.solvers.ot1d``): time O(L (n + m) (d + log(n + m))), memory O(L (n + m)).

**Root convention.** ``sliced_wasserstein`` returns the p-th root of the mean over directions of
W_p^p, as POT's ``ot.sliced_wasserstein_distance``. Other libraries differ: OTT's
``tools.sliced.sliced_wasserstein`` returns the mean of W_p^p (no root; square it here: ``sw ** p``);
some training codes use the mean of the roots ``mean_l W_p`` (smaller, by Jensen's inequality).
SW_p <= EBSW_p <= max-SW_p <= W_p for the same directions.

References:
    [1] N. Bonneel, J. Rabin, G. Peyré, H. Pfister. Sliced and Radon Wasserstein barycenters of
        measures. JMIV 51 (2015).
    [2] I. Deshpande, Y.-T. Hu, R. Sun, et al. Max-sliced Wasserstein distance and its use for
        GANs. CVPR 2019.
    [3] K. Nguyen, N. Ho. Energy-based sliced Wasserstein distance. NeurIPS 2023.
    [4] K. Nguyen, N. Bariletto, N. Ho. Quasi-Monte Carlo for 3D sliced Wasserstein. ICLR 2024.
    [5] R. Flamary et al. POT: Python Optimal Transport. JMLR 22 (2021).
"""

from __future__ import annotations

import math

import torch

from otcore._validation import _real, check_finite, check_max_iter, check_positive, mass_rtol
from otcore.core.problem import Problem, prepare_problem
from otcore.geometry import PointCloud
from otcore.solvers.ot1d import check_p, ot1d_cost

PROJECTIONS = ("random", "orthogonal", "qmc")


# ----------------------------------------------------------------------------------- directions
def _generator(seed: int | torch.Generator | None) -> torch.Generator:
    """A CPU generator of its own (the global RNG is never used): seeded by ``seed``, or by the OS
    when None; a ``torch.Generator`` given as ``seed`` is used (and advanced) as it is."""
    if isinstance(seed, torch.Generator):
        return seed
    gen = torch.Generator()
    if seed is None:
        gen.seed()
        return gen
    v = _real("seed", seed, "an integer, a torch.Generator or None")
    if not v.is_integer() or v < 0:
        raise ValueError(f"seed must be a non-negative integer, a torch.Generator or None, got {seed!r}")
    return gen.manual_seed(int(v))


def _unit_columns(t: torch.Tensor) -> torch.Tensor:
    return t / torch.linalg.vector_norm(t, dim=0, keepdim=True)


def sample_directions(kind: str, d: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """(d, n) float64 CPU unit directions of the sphere S^{d-1}, one per column.

    - ``"random"``: i.i.d. uniform (normalised Gaussians).
    - ``"orthogonal"``: ceil(n / d) independent Haar-random orthonormal bases (QR of Gaussian
      matrices, signs fixed by diag(R)), concatenated and cut to n columns; every column is uniform
      on the sphere and the columns of one block are orthogonal (a variance reduction).
    - ``"qmc"``: randomised quasi-Monte Carlo: a scrambled Sobol sequence in [0, 1)^d mapped by
      the inverse normal CDF and normalised (the "Gaussian-mapped Sobol" construction of [4]);
      the scrambling seed comes from ``gen``, so each draw is a fresh unbiased point set.
    """
    if kind == "random":
        return _unit_columns(torch.randn(d, n, generator=gen, dtype=torch.float64))
    if kind == "orthogonal":
        blocks = -(-n // d)
        q, r = torch.linalg.qr(torch.randn(blocks, d, d, generator=gen, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
        return q.permute(1, 0, 2).reshape(d, blocks * d)[:, :n].contiguous()
    if kind == "qmc":
        scramble = int(torch.randint(0, 2**62, (), generator=gen))
        cube = torch.quasirandom.SobolEngine(d, scramble=True, seed=scramble).draw(n, dtype=torch.float64)
        tiny = torch.finfo(torch.float64).eps
        return _unit_columns(torch.special.ndtri(cube.clamp(tiny, 1 - tiny)).T)
    raise ValueError(f"projections must be one of {PROJECTIONS}, a (d, L) tensor or None, got {kind!r}")


def resolve_projections(projections, *, d: int, n_projections: int, seed, dtype: torch.dtype,
                        device: torch.device, validate: bool) -> torch.Tensor:
    """The (d, L) directions in ``dtype`` on ``device``: drawn for a name (None = "random"),
    checked for a tensor (whose L overrides ``n_projections``, as in POT)."""
    if projections is None or isinstance(projections, str):
        n_projections = check_max_iter("n_projections", n_projections)
        theta = sample_directions(projections or "random", d, n_projections, _generator(seed))
        return theta.to(device=device, dtype=dtype)
    if not torch.is_tensor(projections):
        raise ValueError(f"projections must be one of {PROJECTIONS}, a (d, L) tensor or None, "
                         f"got {type(projections).__name__}")
    if projections.dim() != 2 or projections.shape[0] != d or projections.shape[1] == 0 \
            or not projections.is_floating_point():
        raise ValueError(f"projections must be a floating tensor of shape (d, L) = ({d}, L >= 1) with unit "
                         f"columns, got {tuple(projections.shape)} {projections.dtype}")
    if validate:
        check_finite("projections", projections)
        norms = torch.linalg.vector_norm(projections.detach().double(), dim=0)
        err = float((norms - 1).abs().max())
        if err > mass_rtol(projections.dtype):
            raise ValueError(f"projections must have unit columns (theta_l on the sphere); the column norms "
                             f"differ from 1 by up to {err:.3g}")
    return projections.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------- shared core
def _prepare(x, y, a, b, p, validate: bool) -> tuple[Problem, torch.Tensor, torch.Tensor, float]:
    """The validated batched problem, the points (B, n, d), (B, m, d) in the compute dtype, and p."""
    p = check_p(p)
    problem = prepare_problem(PointCloud(x, y, backend="torch", validate=validate), a, b, balanced=True,
                              validate=validate)
    geom = problem.geom
    xs, ys = geom.tensors
    return problem, xs.to(geom.dtype), ys.to(geom.dtype), p


def slice_costs(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, theta: torch.Tensor,
                p: float, uniform: tuple[bool, bool]) -> torch.Tensor:
    """W_p^p between the projections of the clouds on each direction.

    Args:
        x: (B, n, d) points.
        y: (B, m, d) points.
        a: (B, n) weights of x.
        b: (B, m) weights of y (the same masses as ``a``).
        theta: (d, L) directions shared by the batch, or (B, d, L) one set per problem.
        p: the order.
        uniform: whether a / b are uniform (the 1-D grid is then shared by all directions).

    Returns:
        (B, L) W_p^p per direction.
    """
    u = torch.matmul(theta.mT, x.mT)                                      # (B, L, n), rows contiguous
    v = torch.matmul(theta.mT, y.mT)
    return ot1d_cost(u, v, a.unsqueeze(1), b.unsqueeze(1), p, uniform=uniform)


def _root(v: torch.Tensor, p: float) -> torch.Tensor:
    """v^(1/p) for v >= 0 with gradient 0 (not inf) at v = 0."""
    pos = v > 0
    return torch.where(pos, torch.where(pos, v, 1).pow(1 / p), 0)


def _output(problem: Problem, value: torch.Tensor) -> torch.Tensor:
    value = value.to(problem.out_dtype)
    return value if problem.batched else value.squeeze(0)


# ----------------------------------------------------------------------------------- public API
def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None,
                       *, n_projections: int = 50, p: float = 2, projections=None,
                       seed: int | torch.Generator | None = None, validate: bool = True) -> torch.Tensor:
    """Sliced Wasserstein distance ``SW_p = ((1/L) sum_l W_p^p(theta_l # mu, theta_l # nu))^(1/p)``.

    The p-th root of the mean over directions (POT's convention; see the module docstring for
    OTT's and others'). ``sw ** p`` is the unbiased Monte Carlo estimate of SW_p^p.

    Args:
        x: (n, d) or (B, n, d) points of mu.
        y: (m, d) or (B, m, d) points of nu (n != m allowed).
        a: (n,) or (B, n) non-negative weights of x, or None (uniform 1/n).
        b: (m,) / (B, m) weights of y, as ``a``. Equal total masses; b is rescaled to the mass of
            a (a factor within rounding, held constant in autograd). For total mass M the result
            is M^(1/p) times SW_p.
        n_projections: the number L of directions drawn (ignored for a tensor ``projections``).
        p: the order, >= 1.
        projections: ``"random"`` (None: the default; uniform on the sphere), ``"orthogonal"``
            (blocks of random orthonormal bases), ``"qmc"`` (scrambled Sobol mapped to the sphere
            through the inverse normal CDF), or a (d, L) tensor whose columns are unit directions
            (POT's layout). Drawn directions are shared by every problem of a batch.
        seed: int or ``torch.Generator`` for the directions (reproducible; the global RNG is
            never touched), None for fresh ones.
        validate: check values (finiteness, signs, masses, unit directions): host synchronisations.

    Returns:
        () for unbatched inputs, else (B,); in the inputs' dtype and device. Differentiable in x, y,
        a, b and a tensor ``projections``; the gradient at SW = 0 is 0.

    Raises:
        ValueError: shapes that do not match (d, batch, weights), non-finite points or weights,
            negative weights, unequal masses, p < 1, n_projections < 1, unknown projection names,
            projections of the wrong shape or with non-unit columns, a bad seed.
    """
    problem, xs, ys, p = _prepare(x, y, a, b, p, validate)
    theta = resolve_projections(projections, d=xs.shape[-1], n_projections=n_projections, seed=seed,
                                dtype=xs.dtype, device=xs.device, validate=validate)
    costs = slice_costs(xs, ys, problem.a, problem.b, theta, p, (a is None, b is None))
    return _output(problem, _root(costs.mean(-1), p))


def energy_sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor | None = None,
                              b: torch.Tensor | None = None, *, n_projections: int = 50, p: float = 2,
                              projections=None, seed: int | torch.Generator | None = None,
                              detach_weights: bool = False, validate: bool = True) -> torch.Tensor:
    """Energy-based sliced Wasserstein, importance-sampled (IS-EBSW of Nguyen & Ho, 2023).

    Directions theta_l are drawn as in ``sliced_wasserstein`` (the proposal) and reweighted
    towards the slicing distribution sigma(theta) ∝ exp(W_p^p(theta # mu, theta # nu)):
    ``EBSW_p = (sum_l w_l W_l)^(1/p)`` with ``W_l = W_p^p`` along theta_l and ``w = softmax(W)``.
    The energy exp(W_p^p) is not scale invariant: rescaling the points by s changes the weights.
    For the same directions, SW_p <= EBSW_p <= max_l W_p(theta_l).

    Gradients: by default the importance weights are **not detached**, so the gradient is the
    exact gradient of the estimator (it includes the weights' dependence on the inputs).
    ``detach_weights=True`` holds w constant: the gradient is then the w-weighted average of the
    per-direction gradients.

    Args:
        x: as in ``sliced_wasserstein``.
        y: as in ``sliced_wasserstein``.
        a: as in ``sliced_wasserstein``.
        b: as in ``sliced_wasserstein``.
        n_projections: as in ``sliced_wasserstein``.
        p: as in ``sliced_wasserstein``.
        projections: as in ``sliced_wasserstein``.
        seed: as in ``sliced_wasserstein``.
        validate: as in ``sliced_wasserstein``.
        detach_weights: hold the importance weights constant in autograd.

    Returns:
        () or (B,) in the inputs' dtype and device.

    Raises:
        ValueError: as ``sliced_wasserstein``.
    """
    problem, xs, ys, p = _prepare(x, y, a, b, p, validate)
    theta = resolve_projections(projections, d=xs.shape[-1], n_projections=n_projections, seed=seed,
                                dtype=xs.dtype, device=xs.device, validate=validate)
    costs = slice_costs(xs, ys, problem.a, problem.b, theta, p, (a is None, b is None))
    w = torch.softmax(costs.detach() if detach_weights else costs, dim=-1)
    return _output(problem, _root((w * costs).sum(-1), p))


def max_sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor | None = None,
                           b: torch.Tensor | None = None, *, p: float = 2, n_projections: int = 50,
                           n_steps: int = 50, lr: float = 0.1, projections=None,
                           seed: int | torch.Generator | None = None, validate: bool = True) -> torch.Tensor:
    """Max-sliced Wasserstein ``max_theta W_p(theta # mu, theta # nu)`` over the unit sphere.

    The best of ``n_projections`` drawn directions (POT's ``max_sliced_wasserstein_distance``
    stops there) is refined by ``n_steps`` of projected (Riemannian) gradient ascent on the
    sphere (Deshpande et al., 2019): the gradient of W_p^p in theta is projected on the tangent
    space, normalised, and a step of length ``lr / sqrt(k + 1)`` (radians, roughly) is taken
    before renormalising theta. The best direction met is kept, so the result is never below
    the best drawn direction, and never above W_p (projections are 1-Lipschitz).

    The ascent runs on detached inputs; the returned value is W_p along the final direction,
    held constant (Danskin's theorem: that is the gradient of the max), differentiable in x, y,
    a and b. Each problem of a batch gets its own direction.

    Args:
        x: as in ``sliced_wasserstein``.
        y: as in ``sliced_wasserstein``.
        a: as in ``sliced_wasserstein``.
        b: as in ``sliced_wasserstein``.
        p: as in ``sliced_wasserstein``.
        projections: as in ``sliced_wasserstein``: the directions the ascent starts from.
        seed: as in ``sliced_wasserstein``.
        validate: as in ``sliced_wasserstein``.
        n_projections: how many directions are drawn to start from (>= 1).
        n_steps: gradient-ascent steps (>= 0; 0 = the max over drawn directions).
        lr: the first step length (> 0), decaying as 1/sqrt(k + 1).

    Returns:
        () or (B,) in the inputs' dtype and device.

    Raises:
        ValueError: as ``sliced_wasserstein``, and n_steps < 0, lr <= 0.
    """
    n_steps = check_max_iter("n_steps", n_steps, minimum=0)
    lr = check_positive("lr", lr)
    problem, xs, ys, p = _prepare(x, y, a, b, p, validate)
    uniform = (a is None, b is None)
    theta = resolve_projections(projections, d=xs.shape[-1], n_projections=n_projections, seed=seed,
                                dtype=xs.dtype, device=xs.device, validate=validate)
    xd, yd, ad, bd = xs.detach(), ys.detach(), problem.a.detach(), problem.b.detach()
    with torch.no_grad():
        costs = slice_costs(xd, yd, ad, bd, theta.detach(), p, uniform)   # (B, L)
        best_cost, first = costs.max(-1)
        best = theta.detach().mT[first]                                    # (B, d)
    current = best
    for k in range(n_steps):
        with torch.enable_grad():
            t = current.detach().requires_grad_()
            cost = slice_costs(xd, yd, ad, bd, t.unsqueeze(-1), p, uniform).squeeze(-1)  # (B,)
            (grad,) = torch.autograd.grad(cost.sum(), t)
        with torch.no_grad():
            better = (cost > best_cost).unsqueeze(-1)
            best, best_cost = torch.where(better, t, best), torch.maximum(cost, best_cost)
            grad = grad - (grad * t).sum(-1, keepdim=True) * t                 # tangent to the sphere
            step = grad / torch.linalg.vector_norm(grad, dim=-1, keepdim=True).clamp_min(torch.finfo(grad.dtype).tiny)
            current = t + (lr / math.sqrt(k + 1)) * step
            current = current / torch.linalg.vector_norm(current, dim=-1, keepdim=True)
    if n_steps:
        with torch.no_grad():
            cost = slice_costs(xd, yd, ad, bd, current.unsqueeze(-1), p, uniform).squeeze(-1)
            best = torch.where((cost > best_cost).unsqueeze(-1), current, best)
    value = slice_costs(xs, ys, problem.a, problem.b, best.unsqueeze(-1), p, uniform).squeeze(-1)
    return _output(problem, _root(value, p))
