"""Balanced clustering with optimal transport: SwAV/SeLa codes, balanced k-means, DEPICT targets.

- ``sinkhorn_codes``: the balanced soft assignments of SeLa [1] and SwAV [2], computed in the log
  domain (no overflow at any score scale or dtype), on one process or over the concatenated
  batches of the ranks of a ``torch.distributed`` group (SwAV's distributed Sinkhorn-Knopp).
- ``OTKMeans``: k-means whose assignment step is balanced entropic OT (Sinkhorn) to the centroids,
  with final hard labels by exact OT, so cluster sizes follow the prescribed weights exactly.
- ``depict_target``: the auxiliary target distribution of DEPICT [3], a one-step approximate
  balancing, with the paper's and the official code's normalisations.

References:
    [1] Y. M. Asano, C. Rupprecht, A. Vedaldi. Self-labelling via simultaneous clustering and
        representation learning. ICLR 2020.
    [2] M. Caron, I. Misra, J. Mairal, P. Goyal, P. Bojanowski, A. Joulin. Unsupervised learning
        of visual features by contrasting cluster assignments (SwAV). NeurIPS 2020.
    [3] K. Ghasedi Dizaji, A. Herandi, C. Deng, W. Cai, H. Huang. Deep clustering via joint
        convolutional autoencoder embedding and relative entropy minimization. ICCV 2017.
"""

from __future__ import annotations

import math
import struct
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from otcore._validation import _real, check_finite, check_max_iter, check_positive, check_tol
from otcore.distributed.collectives import all_reduce, check_group, gather_descriptors
from otcore.solvers import emd
from otcore.solvers.entropic.dual import default_tol
from otcore.warnings import ConvergenceWarning

#: Iteration cap of ``sinkhorn_codes(n_iter=None)`` (iterate to ``tol``).
CODES_MAX_ITER = 1000
#: Iteration cap of OTKMeans' inner Sinkhorn solves (with well-separated clusters the weak
#: coupling between blocks makes Sinkhorn slow, and the final labels are exact anyway).
KMEANS_SINKHORN_MAX_ITER = 1000


def sinkhorn_codes(
    scores: torch.Tensor,
    *,
    eps: float = 0.05,
    n_iter: int | None = 3,
    tol: float | None = None,
    cluster_weights: torch.Tensor | None = None,
    group: object | None = None,
) -> torch.Tensor:
    """Balanced soft assignments of B samples to K clusters (SeLa / SwAV codes).

    Solves ``max_Q <Q, scores> + eps H(Q)`` over Q >= 0 with rows summing to 1 and columns to
    ``B * cluster_weights``, by Sinkhorn-Knopp: the kernel ``exp(scores / eps)`` is normalised
    alternately over samples (columns to ``w``) and over clusters (rows to 1), in SwAV's order, so the rows of the result sum to 1 exactly and its columns approach
    ``B * w`` as iterations go on (3 iterations, SwAV's default, give approximate balance).
    Nothing overflows at any ``scores / eps`` (``exp(scores / eps)`` is never formed), and
    half-precision scores are computed in float32. Two exact paths, chosen after the fact:

    - SwAV's row/column scalings applied to the stabilised kernel ``exp(scores / eps - column
      max)``, used when no kernel entry, row or column sum falls below sqrt(tiny) of the dtype
      (float32: e^-43; covers SwAV's setting, cosine scores with eps >= 0.05), so nothing that
      matters underflows; it costs one exp in all.
    - Otherwise (a host check after the loop), the iterations are recomputed as log-sum-exp
      normalisations of ``scores / eps`` (one exp per normalisation, about 3x the time), exact
      at any scale.

    The iterations are written here rather than through ``otcore.sinkhorn``: on a 4096 x 3000
    problem the general solver (marginal checks, a host read per iteration, its dual value)
    takes ~9x the time of SwAV's recipe for 3 iterations. With ``tol=None`` nothing is read on
    the host inside the loop (one read after it).

    Distributed (``group`` set; SwAV's ``distributed_sinkhorn`` [2], in both exact paths): each
    rank passes its own batch (B_r, K) and gets its rows of the codes of the concatenated batch
    of B = sum_r B_r samples, as one process would compute them on the concatenation (up to the
    order of floating-point sums). The column maxima and column sums are all-reduced over the
    ranks, rows are normalised locally; the fallback to the log domain and the stopping test
    are decided on all-reduced quantities, so every rank takes the same path and runs the same
    iterations. Costs one all-gather of a few integers and one all-reduce of the weights (the
    checks below), then one all-reduce of (G, K) column sums per iteration (in the log domain:
    two, three with ``tol``). Every rank must pass the same K, dtype, eps, n_iter, tol and
    cluster_weights (all checked) and at least one sample.

    Codes are targets, as in SwAV: they are computed under ``torch.no_grad`` and returned
    detached (no gradient flows to ``scores``).

    Args:
        scores: (B, K) similarities of samples to clusters (higher = closer), or (G, B, K) for
            G independent problems; with ``group``, this rank's samples (B_r, K) or (G, B_r, K).
        eps: entropic regularisation (> 0), in the units of ``scores``; SeLa's lambda is 1 / eps.
        n_iter: number of Sinkhorn iterations (one = a column and a row normalisation). With
            ``tol`` set it is the cap on iterations; ``None`` with ``tol`` iterates up to
            ``CODES_MAX_ITER``.
        tol: if set (or if ``n_iter`` is None, default 1e-6 in float64 and 1e-4 otherwise),
            stop once ``|Q^T 1 / B - w|_1 <= tol`` (the marginal error of the plan Q / B of
            mass 1); one ``ConvergenceWarning`` if the cap is reached first. Checking reads the
            error on the host every iteration.
        cluster_weights: (K,) or (G, K) non-negative cluster proportions (normalised to sum
            1); None: uniform 1 / K. Clusters of weight 0 get all-zero columns.
        group: None (default): this process's scores only. Otherwise the samples are spread
            over the ranks of a ``torch.distributed`` process group: a ``ProcessGroup``, or
            ``"default"`` for the default group (``None`` keeps its meaning of "not
            distributed", unlike ``otcore.distributed.RowSharded``). Works with gloo and NCCL.

    Returns:
        (B, K) or (G, B, K) codes in the dtype and device of ``scores`` (with ``group``: this
        rank's rows, (B_r, K) or (G, B_r, K)).

    Raises:
        ValueError: bad shapes or non-finite scores, eps <= 0, bad n_iter, tol or weights, or a
            bad ``group``. With ``group``, raised on every rank (without hanging) when
            torch.distributed is not initialised or this process is outside the group, when any
            rank's inputs are rejected, or when the ranks differ in K, dtype, batching G, eps,
            n_iter, tol or cluster_weights.
    """
    if group is None:
        codes_in, ranks = _codes_input(scores, eps, n_iter, tol, cluster_weights), None
    else:
        codes_in, ranks = _codes_input_across(group, scores, eps, n_iter, tol, cluster_weights)
    S, logw, eps, steps, tol, batched = codes_in
    codes, error = _balanced_codes(S, eps=eps, logw=logw, n_iter=steps, tol=tol, ranks=ranks)
    if error is not None and not bool(error.max() <= tol):
        warnings.warn(
            f"sinkhorn_codes: the column marginal error {float(error.max()):.3g} is above tol={tol:g} after "
            f"{steps} iterations; raise n_iter, loosen tol or increase eps.",
            ConvergenceWarning, stacklevel=2,
        )
    codes = codes if batched else codes.squeeze(0)
    return codes.to(scores.dtype)


class _CodesInput(NamedTuple):
    """sinkhorn_codes' validated arguments: scores (G, B, K) in the compute dtype, detached; log
    weights (G, 1, K); eps; the iteration count or cap; tol (None: fixed iterations); batched."""

    S: torch.Tensor
    logw: torch.Tensor
    eps: float
    steps: int
    tol: float | None
    batched: bool


class _Ranks(NamedTuple):
    """The samples are spread over the ranks of ``group`` (a torch.distributed group, None: the
    default one); ``B``: the number of samples of all ranks together."""

    group: object
    B: int


def _codes_input(scores, eps, n_iter, tol, cluster_weights) -> _CodesInput:
    """Validate this rank's arguments of ``sinkhorn_codes`` (no communication)."""
    if not torch.is_tensor(scores) or not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point torch.Tensor, got {getattr(scores, 'dtype', type(scores))}")
    if scores.dim() not in (2, 3) or 0 in scores.shape:
        raise ValueError(f"scores must be a non-empty (B, K) or (G, B, K) tensor, got shape {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores.amax()) & torch.isfinite(scores.amin())):  # NaN and inf reach one of them
        raise ValueError("scores holds non-finite values (NaN or inf)")
    eps = check_positive("eps", eps)
    n_iter = None if n_iter is None else check_max_iter("n_iter", n_iter)
    compute = torch.float32 if scores.dtype in (torch.float16, torch.bfloat16) else scores.dtype
    if tol is None and n_iter is None:
        tol = default_tol(compute)
    tol = None if tol is None else check_tol(tol)
    S = scores.detach().to(compute)
    batched = S.dim() == 3
    S = S if batched else S.unsqueeze(0)
    logw = _log_cluster_weights(cluster_weights, G=S.shape[0], K=S.shape[-1], dtype=compute, device=S.device)
    return _CodesInput(S, logw, eps, CODES_MAX_ITER if n_iter is None else n_iter, tol, batched)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# what every rank must agree on, in the order of ``_codes_descriptor`` (after the failure flag)
_AGREED = ("batching (B, K) or (G, B, K)", "number of problems G", "number of clusters K", "dtype", "eps",
           "n_iter", "tol")


def _codes_descriptor(c: _CodesInput | None, scores) -> list[int]:
    """[failed, *the _AGREED fields, B_r] as integers (floats by their bits: compared exactly)."""
    if c is None:
        return [1] + [0] * (len(_AGREED) + 1)
    G, B, K = c.S.shape
    tol = -1.0 if c.tol is None else c.tol
    return [0, int(c.batched), G, K, _DTYPES.index(scores.dtype), _bits(c.eps), c.steps, _bits(tol), B]


def _bits(x: float) -> int:
    """The IEEE-754 bits of a float64, as an int64 (for an exact comparison across ranks)."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _codes_input_across(group, scores, eps, n_iter, tol, cluster_weights) -> tuple[_CodesInput, _Ranks]:
    """Validate on every rank of ``group`` together: raises ValueError on every rank (after one
    all-gather, so no rank is left waiting) if any rank's inputs are rejected or the ranks
    disagree; else this rank's input and the total batch size."""
    if isinstance(group, str) and group == "default":
        group = None
    elif not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise ValueError(f"group must be None, 'default' or a torch.distributed ProcessGroup, got {group!r}")
    check_group(group)
    try:
        mine, problem = _codes_input(scores, eps, n_iter, tol, cluster_weights), None
    except ValueError as e:
        mine, problem = None, e
    device = scores.device if torch.is_tensor(scores) else torch.device("cpu")
    ranks = gather_descriptors(_codes_descriptor(mine, scores), device, group)
    if problem is not None:
        raise problem
    failed = [r for r, d in enumerate(ranks) if d[0]]
    if failed:
        raise ValueError(f"group: the inputs of rank(s) {failed} of the group were rejected (see the error raised "
                         "there); sinkhorn_codes raises on every rank")
    assert mine is not None
    for k, name in enumerate(_AGREED, start=1):
        values = [r[k] for r in ranks]
        if len(set(values)) > 1:
            shown: list = [str(_DTYPES[v]) for v in values] if name == "dtype" else values
            if name in ("eps", "tol"):
                shown = [struct.unpack("<d", struct.pack("<q", v))[0] for v in values]
            raise ValueError(f"group: the ranks' inputs differ in their {name} (by rank: {shown}); sinkhorn_codes "
                             "needs everything but the number of samples to be the same on every rank")
    w = mine.logw.exp()  # one MAX all-reduce of (w, -w): the largest and smallest weights of the ranks
    hi, lo = all_reduce(torch.cat([w, -w]), dist.ReduceOp.MAX, group).chunk(2)
    if bool((hi + lo > 8 * torch.finfo(w.dtype).eps * hi).any()):  # the same decision on every rank
        raise ValueError("cluster_weights: the ranks pass different cluster_weights; sinkhorn_codes needs the "
                         "same (normalised) weights on every rank")
    return mine, _Ranks(group, sum(r[-1] for r in ranks))


def _log_cluster_weights(w, *, G: int, K: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(G, 1, K) log of the normalised cluster weights (-inf for zero weights)."""
    if w is None:
        return torch.full((G, 1, K), -math.log(K), dtype=dtype, device=device)
    if not torch.is_tensor(w) or not w.is_floating_point():
        raise ValueError(f"cluster_weights must be a floating-point torch.Tensor or None, got {getattr(w, 'dtype', type(w))}")
    if w.shape not in ((K,), (G, K)):
        raise ValueError(f"cluster_weights has shape {tuple(w.shape)}, expected ({K},) or ({G}, {K}) to match scores")
    check_finite("cluster_weights", w)
    if bool((w < 0).any()) or bool((w.sum(-1) <= 0).any()):
        raise ValueError("cluster_weights must be >= 0 with a positive total")
    w = w.detach().to(device=device, dtype=dtype).expand(G, K)
    return (w / w.sum(-1, keepdim=True)).log().unsqueeze(1)


def _sample_sum(t: torch.Tensor, ranks: _Ranks | None) -> torch.Tensor:
    """``t`` (a sum over this rank's samples) summed over the ranks' samples (itself if local)."""
    return t if ranks is None else all_reduce(t, dist.ReduceOp.SUM, ranks.group)


def _sample_max(t: torch.Tensor, ranks: _Ranks | None) -> torch.Tensor:
    """``t`` (a max over this rank's samples) maximised over the ranks' samples (itself if local)."""
    return t if ranks is None else all_reduce(t, dist.ReduceOp.MAX, ranks.group)


def _balanced_codes(S: torch.Tensor, *, eps: float, logw: torch.Tensor, n_iter: int, tol: float | None,
                    ranks: _Ranks | None = None):
    """Codes (G, B, K) for scores S (G, B, K) and log cluster weights (G, 1, K), and the final
    column error (G,) when ``tol`` is set: kernel scalings where exact, else the log domain.
    With ``ranks``, S holds this rank's samples and the codes are its rows of the codes of all
    the ranks' samples (the path taken and the iterations run are the same on every rank)."""
    with torch.no_grad():
        codes, error, exact = _scaled_sinkhorn(S, eps=eps, w=logw.exp(), n_iter=n_iter, tol=tol, ranks=ranks)
        if not bool(exact):  # the one host read of the fixed-iteration path
            codes, error = _log_sinkhorn(S, eps=eps, logw=logw, n_iter=n_iter, tol=tol, ranks=ranks)
    return codes, error


def _scaled_sinkhorn(S: torch.Tensor, *, eps: float, w: torch.Tensor, n_iter: int, tol: float | None,
                     ranks: _Ranks | None = None):
    """SwAV's iterations on the stabilised kernel ``P = exp(S / eps - column max)`` (G, B, K), in
    place: columns scaled to ``w`` (G, 1, K), then rows to 1. Returns the codes, the final column
    error (G,) when ``tol`` is set (else None), and a () bool tensor ``exact``: whether no
    entry of the kernel and no row or column sum fell below sqrt(tiny) of the dtype (and all
    stayed finite), so that nothing that matters underflowed. Where ``exact`` is False the result must be recomputed in the log
    domain (``_log_sinkhorn``).

    With ``ranks``, column maxima and sums are all-reduced, and ``exact`` is that of all ranks:
    the local checks (kernel entries, row sums) travel as a count in the column sums' all-reduce
    (plus one scalar all-reduce after the last row normalisation when ``tol`` is None).
    """
    B = S.shape[1] if ranks is None else ranks.B
    floor = math.sqrt(torch.finfo(S.dtype).tiny)
    present = w > 0
    P = S / eps
    P.sub_(_sample_max(P.amax(1, keepdim=True), ranks)).exp_()  # a column factor: the first column scaling undoes it
    cols, exact = _column_sums(P, P.amin() >= floor, ranks)
    error = None
    for step in range(n_iter):
        exact = exact & (cols.masked_fill(~present, math.inf).amin() >= floor)
        P.mul_(w / cols.clamp_min(torch.finfo(S.dtype).tiny))
        rows = P.sum(2, keepdim=True)
        rows_ok = (rows.amin() >= floor) & torch.isfinite(rows).all()
        P.div_(rows)
        if tol is None and step == n_iter - 1:
            exact = exact & (rows_ok if ranks is None else _sample_sum((~rows_ok).to(S.dtype), ranks) == 0)
            break
        cols, ok = _column_sums(P, rows_ok, ranks)
        exact = exact & ok
        if tol is not None:
            error = (cols / B - w).abs().sum((1, 2))
            if bool(error.max() <= tol) or not bool(exact):
                break
    return P, error, exact


def _column_sums(P: torch.Tensor, ok: torch.Tensor, ranks: _Ranks | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The column sums (G, 1, K) of P over all the ranks' samples, and whether the () bool ``ok``
    holds on every rank (one all-reduce: the failures are counted in the same buffer)."""
    cols = P.sum(1, keepdim=True)
    if ranks is None:
        return cols, ok
    both = _sample_sum(torch.cat([cols.flatten(), (~ok).to(P.dtype).reshape(1)]), ranks)
    return both[:-1].view_as(cols), both[-1] == 0


def _log_sinkhorn(S: torch.Tensor, *, eps: float, logw: torch.Tensor, n_iter: int, tol: float | None,
                  ranks: _Ranks | None = None):
    """Alternate log-domain normalisations of ``L = S / eps`` (G, B, K): columns to ``logw``
    (G, 1, K), then rows to 0. Returns the codes exp(L) (rows sum to 1) and, when ``tol`` is
    set, the final column error (G,) (else None). With ``ranks``, the column normalisations
    (a max and a sum) and the column error are all-reduced; rows stay local.

    Works in place on two (G, B, K) buffers (L and its shifted exponential P), which makes the
    log domain cost about one exp per normalisation over the kernel-domain recipe.
    """
    B = S.shape[1] if ranks is None else ranks.B
    absent = torch.isinf(logw)  # zero-weight clusters: their columns are -inf throughout
    L = S / eps
    L.masked_fill_(absent, -math.inf)
    P = torch.empty_like(L)
    target = logw.exp()
    error = None
    for _ in range(n_iter):
        _normalise(L, P, dim=1, log_target=logw, absent=absent, ranks=ranks)
        rows = _normalise(L, P, dim=2, log_target=None, absent=None)
        P.div_(rows)  # exp(L) with rows summing to 1
        if tol is not None:
            error = (_sample_sum(P.sum(1, keepdim=True), ranks) / B - target).abs().sum((1, 2))
            if bool(error.max() <= tol):
                break
    return P, error


def _normalise(L: torch.Tensor, P: torch.Tensor, *, dim: int, log_target, absent,
               ranks: _Ranks | None = None) -> torch.Tensor:
    """Shift L in place so that its logsumexp over ``dim`` equals ``log_target`` (0 if None);
    with ``ranks`` (``dim`` 1, the samples), the max and the sums are those of all the ranks.

    Leaves ``P = exp(L_old - max)`` (max over ``dim``) and returns its sums over ``dim``.
    """
    m = _sample_max(L.amax(dim, keepdim=True), ranks)
    torch.sub(L, m, out=P).exp_()
    sums = _sample_sum(P.sum(dim, keepdim=True), ranks)
    shift = m + sums.log()
    if log_target is not None:
        shift = (shift - log_target).masked_fill_(absent, 0.0)
    L.sub_(shift)
    return sums


def depict_target(q: torch.Tensor, *, normalisation: str = "paper") -> torch.Tensor:
    """DEPICT's auxiliary target distribution: cluster probabilities re-weighted towards balance.

    With soft assignments p_ik (rows on the simplex) and cluster frequencies f_k = sum_i p_ik:

    - ``"paper"`` ([3]): ``q_ik ∝ p_ik / sqrt(f_k)``, normalised over k;
    - ``"code"`` (DEPICT's released code, as in DEC): ``q_ik ∝ p_ik^2 / f_k``, normalised over k.

    Either is a one-step approximation of the balanced assignment that ``sinkhorn_codes``
    solves exactly. Computed in float32 for half inputs; differentiable.

    Args:
        q: (N, K) or (G, N, K) predicted cluster probabilities (non-negative, finite).
        normalisation: ``"paper"`` or ``"code"``.

    Returns:
        Targets of the same shape and dtype, rows summing to 1.

    Raises:
        ValueError: bad shape, negative or non-finite q, or an unknown normalisation.
    """
    if normalisation not in ("paper", "code"):
        raise ValueError(f"normalisation must be 'paper' or 'code', got {normalisation!r}")
    if not torch.is_tensor(q) or not q.is_floating_point() or q.dim() not in (2, 3) or 0 in q.shape:
        raise ValueError(f"q must be a non-empty floating-point (N, K) or (G, N, K) tensor, got {getattr(q, 'shape', type(q))}")
    check_finite("q", q)
    if bool((q < 0).any()):
        raise ValueError("q must be non-negative (cluster probabilities)")
    p = q.float() if q.dtype in (torch.float16, torch.bfloat16) else q
    freq = p.sum(-2, keepdim=True)
    t = p / freq.sqrt() if normalisation == "paper" else p.square() / freq
    return (t / t.sum(-1, keepdim=True)).to(q.dtype)


class OTKMeans:
    """Balanced k-means: entropic OT assignments during the fit, exact OT for the final labels.

    Lloyd's iterations with the assignment step replaced by balanced entropic OT from the
    points (mass 1/n each) to the centroids (masses ``cluster_weights``) on squared Euclidean
    distances, solved to marginal error ``tol``: centroids are the plan-weighted means. The
    assignments are ``sinkhorn_codes`` of the scores -C (the same problem, with k columns:
    ~30x faster here than ``otcore.sinkhorn``, whose per-iteration overhead dominates at k = 10).
    At the end, hard labels solve the exact transport (``otcore.emd``) from the points (mass 1) to
    integer cluster sizes, so ``labels_`` has exactly those sizes: n/k each for uniform weights
    when k divides n; otherwise floor(n w_k), plus one for the clusters with the largest
    remainders n w_k - floor(n w_k) (the first ones by index on ties). ``cluster_centers_`` are
    then the means of the labelled clusters.

    Inputs are torch tensors (float32/float64, any device) or NumPy arrays; NumPy inputs give
    NumPy outputs, as in scikit-learn. Initialisation is k-means++ drawn from a local
    ``torch.Generator`` (the global RNG is never touched); with ``cluster_weights``, the seeds
    are then matched to the weights by rank (the seed nearest to the most points gets the
    largest weight), since cluster k is the one of weight ``cluster_weights[k]``.

    Args:
        n_clusters: k >= 1.
        eps: entropic regularisation relative to the mean squared distance to the centroids at
            each step (scale-free).
        max_iter: cap on centroid updates; one ``ConvergenceWarning`` if reached before ``tol``.
        tol: stop when no centroid moves by more than ``tol`` times the data's RMS spread; also
            the L1 marginal tolerance of the inner Sinkhorn solves (looser solves leave centroid
            jitter above that threshold).
        cluster_weights: (k,) non-negative cluster proportions (normalised); None: uniform.
        seed: seed of the k-means++ initialisation (None: a fresh random one).

    Attributes:
        cluster_centers_: (k, d) centroids, after ``fit``.
        labels_: (n,) int64 labels, after ``fit``.
        inertia_: sum of squared distances to the assigned centroids, after ``fit``.
        n_iter_: centroid updates run, after ``fit``.
        converged_: bool, after ``fit``.
    """

    def __init__(self, n_clusters: int, *, eps: float = 0.05, max_iter: int = 100, tol: float = 1e-4,
                 cluster_weights: torch.Tensor | None = None, seed: int | None = None) -> None:
        self.n_clusters = check_max_iter("n_clusters", n_clusters)
        self.eps = check_positive("eps", eps)
        self.max_iter = check_max_iter("max_iter", max_iter)
        self.tol = check_tol(tol)
        if seed is not None and not float(_real("seed", seed, "an integer or None")).is_integer():
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        self.seed = seed
        if cluster_weights is not None:
            w = torch.as_tensor(cluster_weights, dtype=torch.float64)
            if w.shape != (self.n_clusters,) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or w.sum() <= 0:
                raise ValueError(f"cluster_weights must be ({self.n_clusters},) finite, >= 0 and of positive total, "
                                 f"got {cluster_weights!r}")
            cluster_weights = w / w.sum()
        self.cluster_weights = cluster_weights

    def fit(self, X) -> OTKMeans:
        """Fit to X: (n, d) tensor or array with n >= n_clusters; returns self."""
        x, _ = self._points("X", X)
        n, k = x.shape[0], self.n_clusters
        if n < k:
            raise ValueError(f"X has {n} points, fewer than n_clusters={k}")
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if self.cluster_weights is None else self.cluster_weights
        w = w.to(dtype=x.dtype, device=x.device)
        gen = torch.Generator()
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(int(self.seed))
        centers = _kmeans_plus_plus(x, k, gen)
        if self.cluster_weights is not None:  # the heaviest cluster starts from the most popular seed
            counts = _sqdist(x, centers).argmin(1).bincount(minlength=k)
            ranked = torch.empty_like(centers)
            ranked[torch.sort(w, descending=True, stable=True).indices.to(x.device)] = \
                centers[torch.sort(counts, descending=True, stable=True).indices]
            centers = ranked
        spread = (x - x.mean(0)).square().sum(1).mean().sqrt()
        logw = w.log().view(1, 1, k)
        converged, it = False, 0
        for it in range(1, self.max_iter + 1):
            C = _sqdist(x, centers)
            P, _ = _balanced_codes(-C.unsqueeze(0), eps=self.eps * float(C.mean()), logw=logw,
                                   n_iter=KMEANS_SINKHORN_MAX_ITER, tol=self.tol)
            P = P.squeeze(0)
            new = (P.T @ x) / P.sum(0).clamp_min(torch.finfo(x.dtype).tiny).unsqueeze(1)
            shift = (new - centers).norm(dim=1).max()
            centers = new
            if bool(shift <= self.tol * spread):
                converged = True
                break
        if not converged:
            warnings.warn(f"OTKMeans: centroids still moving after max_iter={self.max_iter} iterations; "
                          "raise max_iter or loosen tol.", ConvergenceWarning, stacklevel=2)
        C = _sqdist(x, centers)
        sizes = _integer_sizes(n, w.double().cpu())
        plan = emd(C, torch.ones(n, dtype=x.dtype, device=x.device), sizes.to(dtype=x.dtype, device=x.device)).plan
        labels = plan.argmax(1)
        one_hot = torch.nn.functional.one_hot(labels, k).to(x.dtype)
        centers = (one_hot.T @ x) / one_hot.sum(0).clamp_min(1).unsqueeze(1)
        self._centers, self._labels = centers, labels
        self.inertia_ = float((x - centers[labels]).square().sum())
        self.n_iter_, self.converged_ = it, converged
        self._numpy = isinstance(X, np.ndarray)
        return self

    @property
    def cluster_centers_(self):
        """(k, d) centroids (NumPy if ``fit`` was given NumPy)."""
        return self._centers.cpu().numpy() if self._fitted()._numpy else self._centers

    @property
    def labels_(self):
        """(n,) int64 balanced labels of the fitted points (NumPy if ``fit`` was given NumPy)."""
        return self._labels.cpu().numpy() if self._fitted()._numpy else self._labels

    def predict(self, X):
        """(n,) nearest-centroid labels of new points X (n, d) (not size-constrained: a new batch
        need not be balanced); NumPy in, NumPy out."""
        x, numpy = self._points("X", X)
        centers = self._fitted()._centers
        if x.shape[1] != centers.shape[1]:
            raise ValueError(f"X has {x.shape[1]} features, the model was fitted on {centers.shape[1]}")
        labels = _sqdist(x, centers.to(dtype=x.dtype, device=x.device)).argmin(1)
        return labels.cpu().numpy() if numpy else labels

    def fit_predict(self, X):
        """``fit(X)`` and return ``labels_`` (the balanced labels, not ``predict(X)``)."""
        return self.fit(X).labels_

    def _fitted(self) -> OTKMeans:
        if not hasattr(self, "_centers"):
            raise ValueError("this OTKMeans is not fitted yet: call fit(X) first")
        return self

    @staticmethod
    def _points(name: str, X) -> tuple[torch.Tensor, bool]:
        """X as a floating (n, d) tensor (NumPy arrays converted, float64 unless float32)."""
        numpy = isinstance(X, np.ndarray)
        if numpy:
            X = torch.from_numpy(X if X.dtype == np.float32 else X.astype(np.float64))
        if not torch.is_tensor(X) or not X.is_floating_point() or X.dtype in (torch.float16, torch.bfloat16):
            raise ValueError(f"{name} must be a float32/float64 tensor or a NumPy array, got {getattr(X, 'dtype', type(X))}")
        if X.dim() != 2 or X.shape[0] == 0 or X.shape[1] == 0:
            raise ValueError(f"{name} must be a non-empty (n, d) array, got shape {tuple(X.shape)}")
        check_finite(name, X)
        return X.detach(), numpy


def _sqdist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(n, k) squared Euclidean distances (>= 0), expanded as |x|^2 - 2 x.y + |y|^2 around the
    mean of y (translation-invariant; centring limits the cancellation)."""
    o = y.mean(0)
    x, y = x - o, y - o
    return (x.square().sum(1, keepdim=True) - 2 * x @ y.T + y.square().sum(1)).clamp_min_(0)


def _kmeans_plus_plus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): (k, d) centres drawn with probability
    proportional to the squared distance to the nearest centre chosen so far."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centers = [x[first]]
    d2 = (x - x[first]).square().sum(1)
    for _ in range(1, k):
        p = d2.double().cpu()
        p = p / p.sum() if float(p.sum()) > 0 else torch.full((n,), 1.0 / n, dtype=torch.float64)
        nxt = int(torch.multinomial(p, 1, generator=gen))
        centers.append(x[nxt])
        d2 = torch.minimum(d2, (x - x[nxt]).square().sum(1))
    return torch.stack(centers)


def _integer_sizes(n: int, w: torch.Tensor) -> torch.Tensor:
    """(k,) integer sizes summing to n closest to n w: floors, plus one for the largest remainders."""
    exact = n * w
    sizes = exact.floor()
    extra = n - int(sizes.sum())
    order = torch.sort(exact - sizes, descending=True, stable=True).indices
    sizes[order[:extra]] += 1
    return sizes
