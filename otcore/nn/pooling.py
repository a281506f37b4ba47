"""Generalized sum pooling (GSP): partial optimal transport of local features to prototypes.

A drop-in replacement for global average pooling [1]. The n local features ``x_i`` (the pixels
of a (C, H, W) map, or the elements of a set) each carry mass 1/n; a fraction ``mu`` of the total
mass is transported to K learned prototypes ``p_k``, the rest stays as residual ``rho_i`` at no
cost. With the cost ``C_ik = |x_i / |x_i| - p_k / |p_k||`` (Euclidean distance of unit vectors)
and entropy ``eps``:

    min_{pi, rho >= 0}  <pi, C> + eps [sum pi log pi + sum rho log rho]
    s.t.  sum_k pi_ik + rho_i = 1/n,   sum_ik pi_ik = mu.

Its solution is ``pi_ik = v e^{-C_ik/eps} u_i``, ``rho_i = u_i``. Eliminating ``u`` leaves one
unknown per problem, ``t = log v``: with ``s_i = log sum_k exp(-C_ik / eps)`` (the geometry's
softmin over the prototypes),

    rho_i = (1/n) sigmoid(-(t + s_i)),   pi_ik = (1/n) sigmoid(t + s_i) softmax_k(-C_ik / eps),

and ``t`` solves the monotone scalar equation ``mean_i sigmoid(t + s_i) = mu``. The paper's
fixed-point iteration (``u = (1/n) / (1 + v a)``, ``v = mu / sum u a``, 100 steps) is a
linear-rate iteration on this equation; here it is solved by Newton's method on the logit of the
mean, safeguarded by bisection in the bracket ``[logit(mu) - max s, logit(mu) - min s]``
(quadratic convergence, never leaves the bracket), all in the log domain: nothing overflows at
any eps, scale or dtype, and half inputs are computed in float32. The loop runs a fixed
``n_iter`` steps with no host reads; ``GSPResult.constraint_error`` reports how well the mass
constraint holds (the per-feature constraints hold exactly by construction). The one host read
of a forward pass checks that the n x K cosines are finite (inputs are validated only then).

The pooled vector is ``mean_i w_i x_i`` with the weights ``w_i = (1 - n rho_i) / mu =
sigmoid(t + s_i) / mu`` (mean 1). ``mu = 1`` is average pooling exactly (``w_i = 1``; the
fixed-point iteration only approaches it like 1/t), and is computed as such. Gradients reach the
features and prototypes through ``s`` (autograd through the geometry's softmin) and through ``t``
by implicit differentiation of its equation (the custom backward of ``_PartialMass``).

Two choices differ from the official code, so that the layer replaces average pooling as is:
no 1 x 1 embedding convolution before the transport (the layer has no projection of its own;
put one in front if wanted), and the re-weighted features are averaged, not max-pooled.

The attribute histogram ``hist_k = sum_i pi_ik / mu`` (sums to 1) feeds the zero-shot
regularisation loss ``zsr_loss`` of [1]; ``k_center`` is the greedy farthest-point
initialisation of the prototypes from given vectors (the paper uses the classifier's weights).

References:
    [1] Y. Z. Gurbuz, O. Can, A. A. Alatan. Generalized sum pooling for metric learning.
        ICCV 2023 (official code: yetigurbuz/generalized-sum-pooling).
    [2] T. F. Gonzalez. Clustering to minimize the maximum intercluster distance. Theoretical
        Computer Science 38, 1985 (greedy k-center).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from otcore._precision import HALF, upcast
from otcore._validation import _real, check_finite, check_max_iter, check_positive
from otcore.geometry import CostMatrix

#: Entropy of the partial transport, in units of the cost (distances of unit vectors, in [0, 2]).
#: The TensorFlow benchmark code of [1] uses gamma = 1 / eps = 20; its PyTorch code's gamma = 0.1
#: (eps = 10) gives weights within a few percent of average pooling at this cost scale.
DEFAULT_EPS = 0.05
#: Safeguarded Newton steps; each halves the bracket at worst and converges quadratically near t.
DEFAULT_N_ITER = 20


@dataclass(frozen=True)
class GSPResult:
    """Output of ``gsp_pool``; every tensor is differentiable and in the features' dtype.

    Attributes:
        pooled: (B, C) the weighted mean ``mean_i w_i x_i``.
        weights: (B, n) pooling weights ``w_i = n sum_k pi_ik / mu`` (mean 1).
        histogram: (B, K) attribute histogram ``sum_i pi_ik / mu`` over the prototypes (sums to 1).
        constraint_error: (B,) ``|sum_ik pi_ik - mu|`` of the returned solution (the row
            constraints hold exactly by construction); 0 when ``mu = 1``.
    """

    pooled: torch.Tensor
    weights: torch.Tensor
    histogram: torch.Tensor
    constraint_error: torch.Tensor


def gsp_pool(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    *,
    transport_ratio: float = 0.3,
    eps: float = DEFAULT_EPS,
    n_iter: int = DEFAULT_N_ITER,
) -> GSPResult:
    """Generalized sum pooling of a batch of feature maps or sets (see the module docstring).

    Args:
        features: (B, C, H, W) feature maps or (B, N, C) sets of N features.
        prototypes: (K, C) prototypes (normalised to unit length inside; their scale is free).
        transport_ratio: ``mu`` in (0, 1], the fraction of the mass transported; 1 is average
            pooling.
        eps: entropic regularisation (> 0) in units of the cost (distances in [0, 2]); the
            paper's gamma is 1 / eps.
        n_iter: safeguarded Newton steps on the transport's one scalar unknown (>= 1).

    Returns:
        ``GSPResult`` with pooled (B, C), weights (B, n), histogram (B, K), constraint_error (B,).

    Raises:
        ValueError: bad shapes, non-finite values, transport_ratio outside (0, 1], eps <= 0 or
            n_iter < 1.
    """
    x = _channels_first(features)
    _check_prototypes(prototypes, x.shape[1])
    mu = _check_ratio(transport_ratio)
    eps = check_positive("eps", eps)
    n_iter = check_max_iter("n_iter", n_iter)
    compute = torch.float32 if x.dtype in HALF else x.dtype
    xc = upcast(x, compute)
    pc = upcast(prototypes, compute)
    n = xc.shape[-1]
    cos, finite = _cosines(xc, pc)
    if not bool(finite):  # one host read, on the n x K cosines and n norms (not the features)
        check_finite("features", features)
        check_finite("prototypes", prototypes)
        cos, _ = _cosines(_max_scaled(xc, 1), pc)  # finite features whose squares overflow
    # distances of unit vectors, sqrt(2 - 2 cos); gradient 0, not inf, where the vectors coincide
    geom = CostMatrix(torch.sqrt((2 - 2 * cos).clamp_min(torch.finfo(cos.dtype).tiny)), validate=False)
    zeros_k = xc.new_zeros(xc.shape[0], pc.shape[0])
    softmin = geom.softmin(zeros_k, eps, axis=1)  # (B, n): -eps log sum_k exp(-C_ik / eps)
    if mu == 1.0:
        transported = torch.ones_like(softmin)  # n sum_k pi_ik: everything moves
        error = softmin.new_zeros(softmin.shape[0])
    else:
        s = -softmin / eps
        t = _PartialMass.apply(s, mu, n_iter)
        transported = torch.sigmoid(t.unsqueeze(-1) + s)
        error = (transported.mean(-1) - mu).abs().detach()
    weights = transported / mu
    pooled = (xc @ weights.unsqueeze(-1)).squeeze(-1) / n
    mass = (weights / n).unsqueeze(-1)  # (B, n, 1): sum_k pi_ik / mu
    histogram = geom.kernel_apply(zeros_k, softmin, eps, None, mass, axis=0).squeeze(-1)
    out = features.dtype
    return GSPResult(pooled.to(out), weights.to(out), histogram.to(out), error.to(out))


class _PartialMass(torch.autograd.Function):
    """t (B,) solving ``mean_i sigmoid(t + s_i) = mu`` for s (B, n); implicit backward.

    Differentiating the equation at its solution: ``sum_i sigma'_i (dt + ds_i) = 0``, so
    ``dt/ds_i = -sigma'_i / sum_j sigma'_j`` with ``sigma' = sigmoid (1 - sigmoid)``.
    """

    @staticmethod
    def forward(s: torch.Tensor, mu: float, n_iter: int) -> torch.Tensor:
        return _solve_partial_mass(s, mu, n_iter)

    @staticmethod
    def setup_context(ctx, inputs, output):
        s, _, _ = inputs
        ctx.save_for_backward(s, output)

    @staticmethod
    def backward(ctx, grad_t: torch.Tensor):
        s, t = ctx.saved_tensors
        sig = torch.sigmoid(t.unsqueeze(-1) + s)
        slope = sig * (1 - sig)
        total = slope.sum(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
        return -grad_t.unsqueeze(-1) * slope / total, None, None


def _solve_partial_mass(s: torch.Tensor, mu: float, n_iter: int) -> torch.Tensor:
    """Root t (B,) of ``mean_i sigmoid(t + s_i) = mu`` for s (B, n), with no host reads.

    Newton's method on the increasing ``phi(t) = logit(mean_i sigmoid(t + s_i)) - logit(mu)``,
    which is linear with slope 1 in both tails (a mean of sigmoids is not: Newton on it stalls
    on plateaus and overshoots where one feature is partly transported). Every log is taken as
    a log-sum-exp of log-sigmoids, so nothing underflows at any spread of s. A step that leaves
    the bracket ``[lo, hi]`` (h(lo) <= 0 <= h(hi), tightened at every iterate) is replaced by
    bisection.
    """
    logit = math.log(mu) - math.log1p(-mu)
    lo = logit - s.amax(-1)  # every sigmoid <= mu there
    hi = logit - s.amin(-1)  # every sigmoid >= mu there
    t = logit - s.mean(-1)
    for _ in range(n_iter):
        z = t.unsqueeze(-1) + s
        log_in = -torch.nn.functional.softplus(-z)  # log sigmoid(z)
        log_out = -torch.nn.functional.softplus(z)  # log (1 - sigmoid(z))
        log_m, log_1m = torch.logsumexp(log_in, -1), torch.logsumexp(log_out, -1)  # + log n each
        phi = log_m - log_1m - logit
        log_slope = torch.logsumexp(log_in + log_out, -1) + math.log(s.shape[-1]) - log_m - log_1m
        above = phi > 0
        hi = torch.where(above, t, hi)
        lo = torch.where(above, lo, t)
        newton = t - phi * torch.exp(-log_slope)
        inside = (newton >= lo) & (newton <= hi)  # NaN: False
        t = torch.where(inside, newton, (lo + hi) / 2)
    return t


def zsr_loss(
    histograms: torch.Tensor,
    labels: torch.Tensor,
    class_embeddings: torch.Tensor,
    *,
    ridge: float = 0.05,
    scale: float = 9.5,
) -> torch.Tensor:
    """Zero-shot regularisation loss of GSP [1]: attribute histograms must predict class embeddings.

    The batch is split into halves A (the first ``B // 2`` samples) and B (the rest). Ridge
    regression from the histograms of one half to the embeddings of its labels,
    ``W_A = X_A^T (X_A X_A^T + ridge I)^-1 E[y_A]``, predicts the other half's embeddings
    ``X_B W_A`` (and symmetrically ``X_A W_B``); each prediction is scored against every class
    embedding by the dot product times ``scale`` and the loss is the softmax cross-entropy with
    the true class, averaged over the batch (the official code's recipe: raw dot products, margin 0).

    Args:
        histograms: (B, K) attribute histograms (``GSPResult.histogram``), B >= 2.
        labels: (B,) integer class labels in ``[0, n_classes)``.
        class_embeddings: (n_classes, d) learned class embeddings.
        ridge: ridge penalty (> 0); the paper's lambda.
        scale: multiplier of the dot products (> 0).

    Returns:
        Scalar loss in the histograms' dtype, differentiable in histograms and class_embeddings.

    Raises:
        ValueError: bad shapes or labels, non-finite values, ridge or scale <= 0.
    """
    if not torch.is_tensor(histograms) or histograms.dim() != 2 or histograms.shape[0] < 2:
        raise ValueError(f"histograms must be a (B, K) tensor with B >= 2, got {getattr(histograms, 'shape', histograms)}")
    check_finite("histograms", histograms)
    b = histograms.shape[0]
    if not torch.is_tensor(labels) or labels.shape != (b,) or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor of shape ({b},), got {getattr(labels, 'shape', labels)}")
    if not torch.is_tensor(class_embeddings) or class_embeddings.dim() != 2:
        raise ValueError(f"class_embeddings must be a (n_classes, d) tensor, got {getattr(class_embeddings, 'shape', class_embeddings)}")
    check_finite("class_embeddings", class_embeddings)
    if bool((labels < 0).any()) or bool((labels >= class_embeddings.shape[0]).any()):
        raise ValueError(f"labels must lie in [0, {class_embeddings.shape[0]}) (rows of class_embeddings)")
    ridge = check_positive("ridge", ridge)
    scale = check_positive("scale", scale)
    compute = torch.float32 if histograms.dtype in HALF else histograms.dtype
    X, E = upcast(histograms, compute), upcast(class_embeddings, compute)
    half = b // 2
    parts = ((slice(0, half), slice(half, b)), (slice(half, b), slice(0, half)))
    losses = []
    for fit, predict in parts:
        Xf = X[fit]
        gram = Xf @ Xf.mT + ridge * torch.eye(Xf.shape[0], dtype=compute, device=X.device)
        W = Xf.mT @ torch.linalg.solve(gram, E[labels[fit]])
        logits = scale * (X[predict] @ W) @ E.mT
        losses.append(torch.nn.functional.cross_entropy(logits, labels[predict], reduction="sum"))
    return (torch.stack(losses).sum() / b).to(histograms.dtype)


def k_center(vectors: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy k-center (farthest-point) selection [2]: indices (k,) into ``vectors`` (m, d).

    Starts from row 0 (as the official code does), then repeatedly takes the row farthest (in
    Euclidean distance; first on ties) from those already chosen: a 2-approximation of the
    k-center problem. Returns int64 indices on the vectors' device.
    """
    if not torch.is_tensor(vectors) or vectors.dim() != 2 or not vectors.is_floating_point():
        raise ValueError(f"vectors must be a floating (m, d) tensor, got {getattr(vectors, 'shape', vectors)}")
    check_finite("vectors", vectors)
    k = check_max_iter("k", k)
    if k > vectors.shape[0]:
        raise ValueError(f"k must be at most the number of vectors ({vectors.shape[0]}), got {k}")
    v = vectors.detach()
    chosen = torch.zeros(k, dtype=torch.long, device=v.device)
    nearest = (v - v[0]).pow(2).sum(-1)
    for j in range(1, k):
        chosen[j] = torch.argmax(nearest)
        nearest = torch.minimum(nearest, (v - v[chosen[j]]).pow(2).sum(-1))
    return chosen


class GSPPooling(torch.nn.Module):
    """Generalized sum pooling [1], a drop-in replacement for global average pooling.

    Maps (B, C, H, W) feature maps or (B, N, C) sets to (B, C), with no projection of its own:
    the output is the mean of the features re-weighted by how much of their mass a partial
    optimal transport sends to ``n_prototypes`` learned prototypes (module docstring of
    ``otcore.nn.pooling``). ``transport_ratio=1`` is average pooling exactly.

    Args:
        in_channels: C, the features' dimension.
        n_prototypes: K, the number of learned prototypes (the paper: 64, or 128 for >= 1000 classes).
        transport_ratio: fraction of the mass transported, in (0, 1] (the paper: 0.3).
        eps: entropic regularisation in units of the cost (distances of unit vectors, in [0, 2]).
        n_iter: safeguarded Newton steps of the transport solve.

    Attributes:
        prototypes: (K, C) parameter, standard normal at construction; ``init_prototypes`` sets
            them by greedy k-center from given vectors.
        last_histogram: (B, K) attribute histogram of the last forward pass (differentiable; the
            input of ``zsr_loss``), None before the first.
        last_result: the full ``GSPResult`` of the last forward pass, None before the first
            (it holds that pass's autograd graph until the next forward).
    """

    def __init__(self, in_channels: int, n_prototypes: int = 64, transport_ratio: float = 0.3, *,
                 eps: float = DEFAULT_EPS, n_iter: int = DEFAULT_N_ITER) -> None:
        super().__init__()
        self.in_channels = check_max_iter("in_channels", in_channels)
        self.n_prototypes = check_max_iter("n_prototypes", n_prototypes)
        self.transport_ratio = _check_ratio(transport_ratio)
        self.eps = check_positive("eps", eps)
        self.n_iter = check_max_iter("n_iter", n_iter)
        self.prototypes = torch.nn.Parameter(torch.randn(self.n_prototypes, self.in_channels))
        self.last_result: GSPResult | None = None

    @property
    def last_histogram(self) -> torch.Tensor | None:
        return None if self.last_result is None else self.last_result.histogram

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) or (B, N, C) features -> (B, C) pooled, in the features' dtype."""
        self.last_result = gsp_pool(features, self.prototypes, transport_ratio=self.transport_ratio,
                                    eps=self.eps, n_iter=self.n_iter)
        return self.last_result.pooled

    @torch.no_grad()
    def init_prototypes(self, vectors: torch.Tensor) -> torch.Tensor:
        """Set the prototypes to the greedy k-center selection of ``vectors`` (m, C), m >= K.

        Returns the chosen row indices (K,).
        """
        if torch.is_tensor(vectors) and (vectors.dim() != 2 or vectors.shape[-1] != self.in_channels):
            raise ValueError(f"vectors must have shape (m, {self.in_channels}), got {tuple(vectors.shape)}")
        idx = k_center(vectors, self.n_prototypes)
        self.prototypes.copy_(vectors[idx])
        return idx

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, n_prototypes={self.n_prototypes}, "
                f"transport_ratio={self.transport_ratio}, eps={self.eps}, n_iter={self.n_iter}")


def _cosines(x: torch.Tensor, prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities of features x (B, C, n) and prototypes (K, C): (B, n, K), and whether
    they and the features' norms are all finite (a 0-dim bool tensor, not read here).

    One matrix product of the raw features, divided by norms afterwards (no normalised copy of
    the features). The costs of a sample are few (7 x 7 x 64 for a ResNet head), so they are
    held densely and shared by the solve and the histogram. A zero vector has cosine 0 with
    everything. The few prototypes are scaled by their largest entry first, so their norms
    never overflow; the features' norms overflow when their squares do (finite = False then).
    """
    x_norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)  # (B, 1, n)
    p = _max_scaled(prototypes, -1)
    p = p / torch.linalg.vector_norm(p, dim=-1, keepdim=True).clamp_min(1e-12)
    cos = (p @ x / x_norm).mT  # a view of (B, K, n)
    return cos, torch.isfinite(cos).all() & torch.isfinite(x_norm).all()


def _max_scaled(v: torch.Tensor, dim: int) -> torch.Tensor:
    """``v`` divided by its largest |entry| along ``dim`` (directions, hence costs, unchanged)."""
    return v / v.abs().amax(dim, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


def _channels_first(features) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H W), (B, N, C) -> (B, C, N) (views); checks type and emptiness."""
    if not torch.is_tensor(features) or not features.is_floating_point():
        raise ValueError(f"features must be a floating-point torch.Tensor, got {getattr(features, 'dtype', type(features))}")
    if features.dim() not in (3, 4) or 0 in features.shape:
        raise ValueError(f"features must be a non-empty (B, C, H, W) or (B, N, C) tensor, got {tuple(features.shape)}")
    return features.flatten(2) if features.dim() == 4 else features.mT


def _check_prototypes(prototypes, channels: int) -> None:
    if not torch.is_tensor(prototypes) or not prototypes.is_floating_point():
        raise ValueError(f"prototypes must be a floating-point torch.Tensor, got {getattr(prototypes, 'dtype', type(prototypes))}")
    if prototypes.dim() != 2 or prototypes.shape[0] == 0 or prototypes.shape[1] != channels:
        raise ValueError(f"prototypes must have shape (K, {channels}) with K >= 1 to match the features' "
                         f"channels, got {tuple(prototypes.shape)}")


def _check_ratio(value) -> float:
    v = _real("transport_ratio", value, "a number in (0, 1]")
    if not 0.0 < v <= 1.0:
        raise ValueError(f"transport_ratio must lie in (0, 1] (1: average pooling), got {value!r}")
    return v
