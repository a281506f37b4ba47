"""Transport plans as linear operators: entropic (through a geometry) or dense.

Both expose the same small interface, used by ``OTResult`` and by the implicit-differentiation
solve: ``matmul(v, transpose)``, ``marginals()``, ``marginal_error()``, ``dense()`` and
``transport_cost()``. Shapes are batched: weights (B, n) / (B, m), v (B, m, k) (or (B, n, k)
with ``transpose``). Sums over points go through the geometry (``Geometry.total``).
"""

from __future__ import annotations

import torch

from otcore.geometry import Geometry
from otcore.kernels.softmin.blocked import weighted_exp


class _Plan:
    geom: Geometry
    a: torch.Tensor
    b: torch.Tensor

    def marginals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column sums of the plan, (B, n) and (B, m)."""
        raise NotImplementedError

    def marginal_error(self) -> torch.Tensor:
        """|P 1 - a|_1 + |P^T 1 - b|_1 per problem: (B,)."""
        r, c = self.marginals()
        return self.geom.total((r - self.a).abs(), 0) + self.geom.total((c - self.b).abs(), 1)


def all_positive(*weights: torch.Tensor) -> bool:
    """Whether every entry of every tensor is > 0 (one host read)."""
    return bool(torch.stack([(w > 0).all() for w in weights]).all())


class EntropicPlan(_Plan):
    """``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``, applied block by block through ``geom``."""

    def __init__(self, geom: Geometry, a: torch.Tensor, b: torch.Tensor, f: torch.Tensor, g: torch.Tensor, eps: float):
        self.geom, self.a, self.b, self.f, self.g, self.eps = geom, a, b, f, g, eps

    def matmul(self, v: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``P v`` (v: (B, m, k)) or ``P^T v`` (v: (B, n, k) with ``transpose``)."""
        if transpose:
            return self.geom.kernel_apply(self.g, self.f, self.eps, self.a, v, axis=0, row_weights=self.b)
        return self.geom.kernel_apply(self.f, self.g, self.eps, self.b, v, axis=1, row_weights=self.a)

    def marginals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(P 1, P^T 1): (B, n), (B, m)."""
        ones_m = torch.ones_like(self.b).unsqueeze(-1)
        ones_n = torch.ones_like(self.a).unsqueeze(-1)
        return self.matmul(ones_m).squeeze(-1), self.matmul(ones_n, transpose=True).squeeze(-1)

    def dense(self, cost: torch.Tensor | None = None, *, positive: bool | None = None) -> torch.Tensor:
        """The plan as a (B, n, m) tensor (allocates n x m); ``cost``: the materialised C, if at hand.

        When every weight is positive (``positive``, if the caller knows; else ``all_positive``,
        one host read, or False for a geometry built with ``validate=False``), the weights join
        the potentials, f_i + eps log a_i and g_j + eps log b_j, and the plan is one exponential
        of n x m terms (four passes over it; its exponent rounds at the scale of |f| + |g| as
        (f + g - C) / eps does); otherwise ``weighted_exp`` of the n x m weights a_i b_j keeps
        exact zeros and finite derivatives at zero weights (about ten passes, three of them
        transcendental)."""
        cost = self.geom.materialize() if cost is None else cost
        a, b = self.a, self.b
        if positive is None:
            positive = self.geom.validate and all_positive(a, b)
        if positive:
            rows, cols = self.f + self.eps * a.log(), self.g + self.eps * b.log()
            return torch.add(rows.unsqueeze(-1), cols.unsqueeze(-2)).sub_(cost).div_(self.eps).exp_()
        logits = (self.f.unsqueeze(-1) + self.g.unsqueeze(-2) - cost) / self.eps
        return weighted_exp(logits, a.unsqueeze(-1) * b.unsqueeze(-2))

    def transport_cost(self) -> torch.Tensor:
        """<P, C> per problem: (B,)."""
        return self.geom.total(self.geom.kernel_cost(self.f, self.g, self.eps, self.b, row_weights=self.a), 0)

    def for_products(self) -> EntropicPlan | DensePlan:
        """The cheaper operator for many products: dense when the geometry holds its costs anyway."""
        if not self.geom.holds_costs:
            return self
        cost = self.geom.materialize()
        return DensePlan(self.geom, self.a, self.b, self.dense(cost), cost)


class DensePlan(_Plan):
    """A plan held as a (B, n, m) tensor, with the cost it is evaluated against."""

    def __init__(self, geom: Geometry, a: torch.Tensor, b: torch.Tensor, plan: torch.Tensor, cost: torch.Tensor):
        self.geom, self.a, self.b, self.plan, self.cost = geom, a, b, plan, cost

    def matmul(self, v: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        return torch.matmul(self.plan.mT if transpose else self.plan, v.to(self.plan.dtype))

    def marginals(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.plan.sum(-1), self.plan.sum(-2)

    def dense(self) -> torch.Tensor:
        return self.plan

    def transport_cost(self) -> torch.Tensor:
        return self.geom.total((self.plan * self.cost).sum(-1), 0)
