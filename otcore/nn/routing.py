"""Mixture-of-experts routers: top-k softmax gating, balanced Sinkhorn routing, sparse-OT routing.

Every router maps a (tokens, experts) logit matrix, optionally with leading group dimensions
(..., tokens, experts), to one ``Routing``. The three differ only in the score matrix each token
ranks the experts by:

* ``topk_route``: the softmax of the logits (GShard / Switch gating);
* ``sinkhorn_route``: the balanced entropic plan of ``max <P, logits> + eps s H(P)`` (s the
  standard deviation of the group's logits) with rows summing to 1/tokens and columns to
  1/experts, by ``n_iter`` log-domain Sinkhorn iterations (BASE layers / S-BASE): experts every
  token prefers get fewer tokens than they would with softmax gating;
* ``sparse_route``: the sparsity-constrained OT plan (the semi-dual of ``otcore.sparse_ot``, Adam
  for a fixed number of steps: the V-MoE recipe) of cost ``-softmax(logits)`` with **tokens
  choosing** at most ``top_k`` experts: each token is a column of mass 1 with at most ``top_k``
  nonzeros, each expert a row of mass tokens/experts. Tokens-choose (rather than experts-choose
  with ``k = capacity``) because the semi-dual meets the column marginals exactly: every token
  gets an expert, at most ``top_k``, and the capacity step below is the only source of drops, as
  for the other routers. The expert potentials start from the optimum of the problem without
  the sparsity and sign constraints (closed form, below), not from zero.

Then, shared by all: each token takes its ``top_k`` best experts by that score; an expert keeps
at most ``capacity = ceil(capacity_factor * tokens * top_k / experts)`` (at most ``tokens``)
slots, filled first choices first, in token order within a choice (GShard); slots beyond
capacity are dropped (index -1, weight 0). Combine weights are the softmax of the logits
gathered at the chosen experts, so they carry the gradient; the routing scores and selection
are held fixed (no gradient through Sinkhorn or sparse OT). No host synchronisation, no
data-dependent Python control flow: ``torch.compile`` traces the top-k and Sinkhorn routers in
one graph. Routing runs in float32 at least (bf16/fp16 logits are upcast), so logits at any
scale stay finite; combine weights keep the logits' dtype.

References:
    Lepikhin et al., "GShard: scaling giant models with conditional computation", ICLR 2021.
    Lewis, Bhosale, Dettmers, Goyal, Zettlemoyer, "BASE layers", ICML 2021.
    Clark et al., "Unified scaling laws for routed language models" (S-BASE), ICML 2022.
    Liu, Puigcerver, Blondel, "Sparsity-constrained optimal transport", ICLR 2023.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from otcore._validation import _real, check_max_iter, check_positive
from otcore.solvers.projections import simplex_projection_sorted, top_k_by_max
from otcore.solvers.sparse import adam_ascent

SPARSE_INITS = ("softmax", "zero")


@dataclass(frozen=True)
class Routing:
    """Assignment of tokens to experts; shapes with optional leading group dimensions (...).

    Attributes:
        expert_index: (..., tokens, top_k) int64, the chosen experts, best first; -1 where the
            slot is dropped (expert over capacity, or no expert chosen).
        combine_weights: (..., tokens, top_k) softmax of the logits at ``expert_index`` (0 where
            dropped), differentiable w.r.t. the logits.
        position: (..., tokens, top_k) int64, the slot in the expert's buffer, in
            ``[0, capacity)``; -1 where dropped. With ``expert_index`` this is the dispatch.
        expert_load: (..., experts) int64, slots each expert received (<= capacity).
        scores: (..., tokens, experts) the matrix the experts were ranked by (softmax for
            top-k, the balanced plan for Sinkhorn, the sparse plan for sparse OT), detached, in
            the precision it was ranked in (float32 for bf16/fp16 logits: rounding it back
            would create ties).
        capacity: slots per expert (per group).
    """

    expert_index: torch.Tensor
    combine_weights: torch.Tensor
    position: torch.Tensor
    expert_load: torch.Tensor
    scores: torch.Tensor
    capacity: int

    @property
    def dispatch_mask(self) -> torch.Tensor:
        """(..., tokens, experts, capacity) bool: token t fills slot c of expert e."""
        return self._dense(torch.ones_like(self.combine_weights, dtype=torch.int64)) > 0

    @property
    def combine_tensor(self) -> torch.Tensor:
        """(..., tokens, experts, capacity): the combine weight at (t, e, c), 0 elsewhere."""
        return self._dense(self.combine_weights)

    def _dense(self, values: torch.Tensor) -> torch.Tensor:
        """Scatter per-slot ``values`` (..., tokens, top_k) to (..., tokens, experts, capacity)."""
        E = self.expert_load.shape[-1]
        kept = self.expert_index >= 0
        slot = torch.where(kept, self.expert_index * self.capacity + self.position, 0)
        onehot = torch.nn.functional.one_hot(slot, E * self.capacity).to(values.dtype)
        dense = (onehot * (values * kept).unsqueeze(-1)).sum(-2)
        return dense.unflatten(-1, (E, self.capacity))

    @property
    def load_imbalance(self) -> torch.Tensor:
        """(...) max expert load / mean expert load (1 = perfectly balanced)."""
        load = self.expert_load.float()
        return load.amax(-1) / load.mean(-1).clamp(min=torch.finfo(load.dtype).tiny)

    @property
    def dropped_fraction(self) -> torch.Tensor:
        """(...) fraction of the tokens * top_k slots that were dropped."""
        return (self.expert_index < 0).float().mean((-2, -1))


# ------------------------------------------------------------------------------ functional routers
def topk_route(logits: torch.Tensor, *, top_k: int = 1, capacity_factor: float = 1.25) -> Routing:
    """Top-k softmax gating: each token takes its ``top_k`` largest softmax probabilities.

    Args:
        logits: (tokens, experts) or (..., tokens, experts) floating tensor.
        top_k: experts per token (1 <= top_k <= experts).
        capacity_factor: slots per expert = ceil(capacity_factor * tokens * top_k / experts).

    Returns:
        ``Routing``; its ``scores`` is the softmax of the logits.
    """
    top_k, capacity_factor = _check_options(logits, top_k, capacity_factor)
    probs = _softmax(logits)
    return _dispatch(logits, probs, probs, top_k=top_k, capacity_factor=capacity_factor)


def sinkhorn_route(
    logits: torch.Tensor, *, top_k: int = 1, capacity_factor: float = 1.25, eps: float = 0.3, n_iter: int = 5,
) -> Routing:
    """Balanced routing: top-k experts per token on the entropic balanced plan of the logits.

    The plan ``P = exp((logits + f 1^T + 1 g^T) / (eps s))`` maximises ``<P, logits> + eps s H(P)``
    over plans with rows summing to 1/tokens and columns to 1/experts, where s is the standard
    deviation of the group's logits (computed on the device, detached): the temperature is
    relative, so routing does not change when the router's logits grow or shrink during
    training. ``n_iter`` log-domain Sinkhorn iterations from ``g = 0`` (each: a row update of f,
    then a column update of g, so the columns are exact and the rows approximate). A fixed
    count, no tolerance test: a test would read the error on the host every iteration.

    Defaults (eps 0.3, 5 iterations), measured on 512 tokens in six clusters of unequal sizes
    routed to 8 experts, logit scales 0.1 to 10: 0.4-2 % of tokens dropped at capacity factor
    1.25 (softmax gating: 56 %); an absolute eps = 1 (Megatron, S-BASE) dropped 16 % at every
    scale, and eps 0.1 needs ~10 iterations. The plan is computed directly (not by
    ``otcore.sinkhorn``): one exponential pass per iteration, no input validation, no gradient
    (the selection is discrete); at 4096 x 64 on one CPU thread 4.8 ms against 13.5 ms for
    ``otcore.sinkhorn(-logits, max_iter=5, tol=0, validate=False)``, and the whole router
    forward + backward 2 to 3 times softmax gating's.

    Args:
        logits: (tokens, experts) or (..., tokens, experts) floating tensor.
        top_k: experts per token (1 <= top_k <= experts).
        capacity_factor: slots per expert = ceil(capacity_factor * tokens * top_k / experts).
        eps: entropic temperature (> 0) in units of the standard deviation of the group's
            logits; small eps approaches the exact balanced assignment of BASE layers and needs
            more iterations.
        n_iter: Sinkhorn iterations (>= 1).

    Returns:
        ``Routing``; its ``scores`` is the balanced plan P.
    """
    top_k, capacity_factor = _check_options(logits, top_k, capacity_factor)
    eps = check_positive("eps", eps)
    n_iter = check_max_iter("n_iter", n_iter)
    probs = _softmax(logits)
    with torch.no_grad():
        plan = balanced_plan(logits.detach(), eps=eps, n_iter=n_iter)
    return _dispatch(logits, plan, probs, top_k=top_k, capacity_factor=capacity_factor)


def sparse_route(
    logits: torch.Tensor, *, top_k: int = 1, capacity_factor: float = 1.25, gamma: float = 1.0,
    n_steps: int = 10, lr: float = 1e-2, init: str = "softmax",
) -> Routing:
    """Sparsity-constrained OT routing (V-MoE recipe, tokens choose at most ``top_k`` experts).

    Maximises the semi-dual of ``otcore.sparse_ot`` on the (experts, tokens) cost
    ``-softmax(logits)^T`` with expert masses tokens/experts, token masses 1 and ``k = top_k``
    nonzeros per token (gamma-weighted quadratic term) by ``n_steps`` Adam steps of size ``lr``,
    then ranks each token's experts by its column of the plan; experts with zero plan mass are
    not chosen (index -1). With ``init="zero", n_steps=20`` this is ``sparse_ot(...,
    method="adam")``, the V-MoE recipe (20 steps, lr 1e-2, gamma 1). The default starts instead
    from ``alpha_e = 1/experts - mean_t softmax(logits)_te`` (``init="softmax"``), the maximiser
    of the semi-dual without the sparsity and sign constraints (the token rows of the plan are
    then ``softmax + alpha - mean(alpha)``, which gives every expert tokens/experts): exact when
    that plan is nonnegative and top_k = experts, a far better start otherwise, and takes 10
    steps. Measured on 4096 tokens x 64 experts, capacity factor 1.25, 3 seeds: where every token
    prefers expert 0 (logit +4), 14 % of the top-1 slots dropped (7 % of top-2) against 35 %
    (18 %) for the V-MoE recipe; 20 steps from the softmax start drop 3 % (1 %). On random
    logits at most 0.2 % are dropped (the recipe: none). Forward + backward at that size, one
    CPU thread: 2 to 3 times top-k softmax gating (the V-MoE recipe: about 4 times, with the
    same solver).

    Each step's top-k over experts is ``top_k`` passes of a maximum (``top_k_by_max``) and the
    plan stays on its (tokens, top_k) support: no sort, no dense plan until the end, no host
    synchronisation.

    Args:
        logits: (tokens, experts) or (..., tokens, experts) floating tensor.
        top_k: most experts per token (1 <= top_k <= experts).
        capacity_factor: slots per expert = ceil(capacity_factor * tokens * top_k / experts).
        gamma: weight of the quadratic term (> 0), in softmax-probability units.
        n_steps: Adam steps (>= 0; 0 gives the plan of the initial potentials).
        lr: Adam step size (> 0).
        init: ``"softmax"`` or ``"zero"`` initial expert potentials.

    Returns:
        ``Routing``; its ``scores`` is the sparse plan (tokens, experts), rows summing to 1.
    """
    top_k, capacity_factor = _check_options(logits, top_k, capacity_factor)
    gamma = check_positive("gamma", gamma)
    n_steps = check_max_iter("n_steps", n_steps, minimum=0)
    lr = check_positive("lr", lr)
    init = _check_init(init)
    probs = _softmax(logits)
    T, E = logits.shape[-2:]
    with torch.no_grad():
        plan, weights, index = sparse_plan(probs.detach().reshape(-1, T, E), top_k=top_k, gamma=gamma,
                                           n_steps=n_steps, lr=lr, init=init)
        shape = probs.shape[:-1] + (top_k,)
    return _dispatch(logits, plan.view(probs.shape), probs, top_k=top_k, capacity_factor=capacity_factor,
                     choice=(weights.view(shape), index.view(shape)))


def sparse_plan(
    probs: torch.Tensor, *, top_k: int, gamma: float, n_steps: int, lr: float, init: str = "softmax",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tokens-choose sparse plan of ``sparse_route`` for softmax probabilities (groups, tokens,
    experts), no input checks: the plan (groups, tokens, experts), and its support: weights
    (groups, tokens, top_k), non-increasing along the last axis and summing to 1, and the experts
    they go to (int64; lower index first among equal scores).

    With ``u = (alpha + probs_t) / gamma`` on token t's experts, its row of the plan is the
    projection of ``u`` onto the simplex restricted to its ``top_k`` largest entries, and the
    semi-dual's gradient in alpha is ``tokens/experts - (plan column sums)``. Two (groups,
    tokens, experts) buffers serve every step.
    """
    G, T, E = probs.shape
    scaled = probs if gamma == 1 else probs / gamma
    u, scratch = torch.empty_like(scaled), torch.empty_like(scaled)

    def support(alpha):
        torch.add(scaled, (alpha if gamma == 1 else alpha / gamma).unsqueeze(-2), out=u)
        values, index = top_k_by_max(u, top_k, scratch=scratch)  # (G, T, k) each
        return simplex_projection_sorted(values)[0], index

    def gradient(alpha):
        weights, index = support(alpha)
        return T / E - alpha.new_zeros(G, E).scatter_add_(-1, index.flatten(-2), weights.flatten(-2))

    alpha = 1 / E - probs.mean(-2) if init == "softmax" else probs.new_zeros(G, E)
    weights, index = support(adam_ascent(gradient, alpha, steps=n_steps, lr=lr))
    return u.zero_().scatter_(-1, index, weights), weights, index


def balanced_plan(logits: torch.Tensor, *, eps: float, n_iter: int) -> torch.Tensor:
    """``n_iter`` log-domain Sinkhorn iterations at temperature ``eps`` times the standard deviation
    of each group's logits; the plan (..., tokens, experts) in float32 at least.

    Rows of the plan sum (approximately) to 1/tokens, columns (exactly, up to rounding) to 1/experts.
    One exponential pass per iteration: the row update is a log-sum-exp shifted by the row
    maximum (exact, no overflow; f is implicit, as ``f = -log T - logsumexp(L + g)``), and the
    row-normalised plan it yields gives the column sums of the column update by one
    matrix-vector product. That update is exact unless a column's mass underflows (its
    log-mass below ``log(finfo.tiny)``, -87 in float32: logit spreads beyond ~80 temperatures);
    then the column potential moves by at most 87 temperatures per iteration, staying finite.
    """
    L = logits.to(torch.promote_types(logits.dtype, torch.float32))
    T, E = L.shape[-2:]
    L = L - L.mean(dim=(-2, -1), keepdim=True)
    # the (population) standard deviation of the centred logits: a norm is 5x faster than std_mean
    spread = torch.linalg.vector_norm(L, dim=(-2, -1), keepdim=True) / math.sqrt(T * E)
    L = L.div_((eps * spread).clamp_(min=torch.finfo(L.dtype).tiny))
    tiny = torch.finfo(L.dtype).tiny
    floor = math.log(tiny)
    g = L.new_zeros(L.shape[:-2] + (1, E))
    P = torch.empty_like(L)  # one buffer for every iteration: fresh memory costs page faults
    for _ in range(n_iter):
        # row update: f = -log T - logsumexp_j(L + g), shifted by the row maximum of L + g
        P = torch.add(L, g, out=P)
        P = P.sub_(P.amax(-1, keepdim=True)).clamp_(min=floor).exp_()  # below floor exp underflows, slowly
        rows = P.sum(-1, keepdim=True).mul_(T)  # >= T: the row maximum contributes 1
        # column update on the row-normalised plan exp(L + f + g) = P / rows
        cols = (P.mT @ rows.reciprocal()).mT.mul_(E).clamp_(min=tiny)
        g = g - cols.log()
    return P.div_(rows).div_(cols)


def capacity_of(tokens: int, experts: int, *, top_k: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(capacity_factor * tokens * top_k / experts), between 1 and tokens."""
    return max(1, min(tokens, math.ceil(capacity_factor * tokens * top_k / experts)))


# ------------------------------------------------------------------------------ modules
class _Router(torch.nn.Module):
    """Shared constructor: the number of experts, top_k and capacity factor, checked once."""

    def __init__(self, n_experts: int, *, top_k: int, capacity_factor: float) -> None:
        super().__init__()
        self.n_experts = check_max_iter("n_experts", n_experts)
        self.top_k = _check_top_k(top_k, self.n_experts)
        self.capacity_factor = check_positive("capacity_factor", capacity_factor)

    def _check(self, logits: torch.Tensor) -> None:
        _check_logits(logits)
        if logits.shape[-1] != self.n_experts:
            raise ValueError(f"logits has {logits.shape[-1]} experts (last dimension), expected n_experts = "
                             f"{self.n_experts}")

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, top_k={self.top_k}, capacity_factor={self.capacity_factor}"


class TopKRouter(_Router):
    """Module twin of ``topk_route``: ``forward(logits (..., tokens, n_experts)) -> Routing``."""

    def __init__(self, n_experts: int, *, top_k: int = 1, capacity_factor: float = 1.25) -> None:
        super().__init__(n_experts, top_k=top_k, capacity_factor=capacity_factor)

    def forward(self, logits: torch.Tensor) -> Routing:
        self._check(logits)
        return topk_route(logits, top_k=self.top_k, capacity_factor=self.capacity_factor)


class SinkhornRouter(_Router):
    """Module twin of ``sinkhorn_route``: ``forward(logits (..., tokens, n_experts)) -> Routing``."""

    def __init__(self, n_experts: int, *, top_k: int = 1, capacity_factor: float = 1.25, eps: float = 0.3,
                 n_iter: int = 5) -> None:
        super().__init__(n_experts, top_k=top_k, capacity_factor=capacity_factor)
        self.eps = check_positive("eps", eps)
        self.n_iter = check_max_iter("n_iter", n_iter)

    def forward(self, logits: torch.Tensor) -> Routing:
        self._check(logits)
        return sinkhorn_route(logits, top_k=self.top_k, capacity_factor=self.capacity_factor, eps=self.eps,
                              n_iter=self.n_iter)


class SparseOTRouter(_Router):
    """Module twin of ``sparse_route``: ``forward(logits (..., tokens, n_experts)) -> Routing``."""

    def __init__(self, n_experts: int, *, top_k: int = 1, capacity_factor: float = 1.25, gamma: float = 1.0,
                 n_steps: int = 10, lr: float = 1e-2, init: str = "softmax") -> None:
        super().__init__(n_experts, top_k=top_k, capacity_factor=capacity_factor)
        self.gamma = check_positive("gamma", gamma)
        self.n_steps = check_max_iter("n_steps", n_steps, minimum=0)
        self.lr = check_positive("lr", lr)
        self.init = _check_init(init)

    def forward(self, logits: torch.Tensor) -> Routing:
        self._check(logits)
        return sparse_route(logits, top_k=self.top_k, capacity_factor=self.capacity_factor, gamma=self.gamma,
                            n_steps=self.n_steps, lr=self.lr, init=self.init)


# ------------------------------------------------------------------------------ shared steps
def _dispatch(
    logits: torch.Tensor, scores: torch.Tensor, probs: torch.Tensor, *, top_k: int, capacity_factor: float,
    choice: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Routing:
    """Top-k experts per token by ``scores``, then the capacity step (module docstring).

    ``scores`` and ``probs`` (..., T, E). ``choice``: the (..., T, K) top scores (descending) and
    their experts when the router has them already; experts of zero score are then not chosen.
    A slot's position in its expert's buffer is its rank among the slots sent to that expert,
    in (choice, token) order: one stable sort of the (group, expert) keys, O(T k log(T k)).
    """
    T, E = logits.shape[-2:]
    capacity = capacity_of(T, E, top_k=top_k, capacity_factor=capacity_factor)
    if choice is None:
        top, index = torch.topk(scores.detach(), top_k, dim=-1)  # (..., T, K)
        chosen = torch.ones_like(index, dtype=torch.bool)
    else:
        top, index = choice
        chosen = top > 0
    # key = (group, expert) bucket of each slot, choice-major; unchosen slots go to a spare bucket E
    buckets = torch.where(chosen, index, E).transpose(-2, -1).reshape(-1, top_k * T)  # (G, K*T)
    groups = torch.arange(buckets.shape[0], device=index.device).unsqueeze(-1)
    key = (buckets + (E + 1) * groups).flatten()
    counts = torch.zeros(key.numel() // (top_k * T) * (E + 1), dtype=torch.int64, device=index.device)
    counts = counts.scatter_add(0, key, torch.ones_like(key))
    start = counts.cumsum(0) - counts  # first flat rank of each bucket
    order = torch.sort(key, stable=True).indices
    ranks = torch.arange(key.numel(), device=index.device)
    rank = torch.empty_like(key).scatter(0, order, ranks - start[key[order]])
    position = rank.view(index.shape[:-2] + (top_k, T)).transpose(-2, -1)
    kept = chosen & (position < capacity)
    load = counts.view(index.shape[:-2] + (E + 1,))[..., :E].clamp(max=capacity)
    return Routing(expert_index=torch.where(kept, index, -1), combine_weights=(probs.gather(-1, index) * kept).to(
        logits.dtype), position=torch.where(kept, position, -1), expert_load=load, scores=scores, capacity=capacity)


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over experts in float32 at least (bf16/fp16 logits are upcast)."""
    return torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _check_logits(logits) -> None:
    """Shape and dtype checks (no value checks: they would synchronise with the host)."""
    if not torch.is_tensor(logits) or not logits.is_floating_point():
        kind = logits.dtype if torch.is_tensor(logits) else type(logits).__name__
        raise ValueError(f"logits must be a floating-point torch.Tensor, got {kind}")
    if logits.dim() < 2 or logits.shape[-2] == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape (tokens, experts) or (..., tokens, experts) with tokens, "
                         f"experts >= 1, got {tuple(logits.shape)}")


def _check_top_k(top_k, n_experts: int) -> int:
    """top_k as an int, or ValueError unless it is an integer in [1, n_experts]."""
    try:
        ok = _real("top_k", top_k, "an integer").is_integer() and 1 <= int(top_k) <= n_experts
    except (ValueError, OverflowError):
        ok = False
    if not ok:
        raise ValueError(f"top_k must be an integer in [1, n_experts = {n_experts}], got {top_k!r}")
    return int(top_k)


def _check_init(init) -> str:
    if init not in SPARSE_INITS:
        raise ValueError(f"init must be one of {SPARSE_INITS}, got {init!r}")
    return init


def _check_options(logits, top_k, capacity_factor) -> tuple[int, float]:
    """Check the logits and the options every router shares; return (top_k, capacity_factor)."""
    _check_logits(logits)
    top_k = _check_top_k(top_k, logits.shape[-1])
    return top_k, check_positive("capacity_factor", capacity_factor)
