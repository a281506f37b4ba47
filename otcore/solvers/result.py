"""The one result type every solver returns."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from otcore.solvers.plan import DensePlan, EntropicPlan


@dataclass(frozen=True, eq=False)
class OTResult:
    """Solution of a (batch of) OT problem(s); immutable.

    Tensors below are shown unbatched; batched problems carry a leading (B,) dimension.

    Attributes:
        f: (n,) dual potential on the sources.
        g: (m,) dual potential on the targets.
        value: () the objective the solver minimised. For entropic solvers this is
            <P, C> + eps KL(P || a x b) (balanced; unbalanced adds the KL marginal penalties),
            evaluated through the dual, which equals the primal at convergence; for ``emd`` it is
            <P, C>. Its gradient in C is the plan.
        n_iter: () iterations run (int64).
        converged: () bool.
        eps: the regularisation (None for exact OT).

    Properties ``plan`` (n, m), ``transport_cost`` () = <P, C> and ``marginal_error`` () =
    |P1 - a|_1 + |P^T 1 - b|_1 are computed on request; ``apply`` multiplies by the plan without
    materialising it.
    """

    _f: torch.Tensor
    _g: torch.Tensor
    _value: torch.Tensor
    _n_iter: torch.Tensor
    _converged: torch.Tensor
    _operator: EntropicPlan | DensePlan
    _a: torch.Tensor
    _b: torch.Tensor
    batched: bool
    eps: float | None = None
    info: dict | None = None

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.batched else t.squeeze(0)

    @property
    def f(self) -> torch.Tensor:
        return self._out(self._f)

    @property
    def g(self) -> torch.Tensor:
        return self._out(self._g)

    @property
    def value(self) -> torch.Tensor:
        return self._out(self._value)

    @property
    def n_iter(self) -> torch.Tensor:
        return self._out(self._n_iter)

    @property
    def converged(self) -> torch.Tensor:
        return self._out(self._converged)

    @cached_property
    def plan(self) -> torch.Tensor:
        """The transport plan (n, m); materialised (n x m memory) on first access."""
        return self._out(self._operator.dense())

    @cached_property
    def transport_cost(self) -> torch.Tensor:
        """<P, C>, differentiable, without materialising the plan."""
        return self._out(self._operator.transport_cost())

    @cached_property
    def marginal_error(self) -> torch.Tensor:
        """|P 1 - a|_1 + |P^T 1 - b|_1 (not differentiated)."""
        with torch.no_grad():
            r, c = self._operator.marginals()
            return self._out((r - self._a).abs().sum(-1) + (c - self._b).abs().sum(-1))

    def apply(self, v: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``P @ v`` (v: (m,) or (m, k)) or ``P^T @ v`` (v: (n,) or (n, k)) with ``transpose``.

        Batched results take v of shape (B, m) or (B, m, k). Differentiable; never builds P.
        """
        B, n, m = self._f.shape[0], self._f.shape[-1], self._g.shape[-1]
        length = n if transpose else m
        vector = v.dim() == (2 if self.batched else 1)
        vb = v.unsqueeze(-1) if vector else v
        vb = vb if self.batched else vb.unsqueeze(0)
        if vb.dim() != 3 or vb.shape[1] != length or vb.shape[0] not in (1, B):
            raise ValueError(f"v has shape {tuple(v.shape)}; expected its first (non-batch) axis to have length {length}")
        out = self._operator.matmul(vb.expand(B, -1, -1), transpose=transpose)
        out = out.squeeze(-1) if vector else out
        return self._out(out)
