"""The one result type every solver returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from otcore.core.plan import DensePlan, EntropicPlan


@dataclass(frozen=True, eq=False, kw_only=True)
class OTResult:
    """Solution of a (batch of) OT problem(s); immutable, built with keyword arguments only.

    Tensors are shown unbatched; batched problems carry a leading (B,) dimension.

    Attributes:
        f: (n,) dual potential on the sources.
        g: (m,) dual potential on the targets.
        value: () the objective the solver minimised. For entropic solvers this is
            <P, C> + eps KL(P || a x b) (balanced; unbalanced adds the KL marginal penalties),
            evaluated through the dual, which equals the primal at convergence; for ``emd`` it is
            <P, C>. Its gradient in C is the plan.
        n_iter: () iterations run (int64).
        converged: () bool.
        operator: the plan as a linear operator (batched, in the compute dtype); ``plan``,
            ``apply``, ``transport_cost`` and ``marginal_error`` read it.
        eps: the regularisation (None for exact OT).
        info: solver-specific diagnostics, (B,) tensors, e.g. ``{"error": ...}``.

    Properties ``plan`` (n, m), ``transport_cost`` () = <P, C> and ``marginal_error`` () =
    |P1 - a|_1 + |P^T 1 - b|_1 are computed on request; ``apply`` multiplies by the plan without
    materialising it.
    """

    f: torch.Tensor
    g: torch.Tensor
    value: torch.Tensor
    n_iter: torch.Tensor
    converged: torch.Tensor
    operator: EntropicPlan | DensePlan
    eps: float | None = None
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        """Value, potential shapes, iterations, convergence and the marginal error, e.g.
        ``OTResult(value=0.584, f: (50,), g: (40,), n_iter=338, converged=True, marginal_error=9.8e-07, eps=0.1)``.

        Shows only what the result holds: ``marginal_error`` once computed, else the solver's
        final residual ``info["error"]`` (shown as ``error``); it never runs a plan product. Batched results list B values (the first 4 of longer batches).
        """
        fields = [f"value={_numbers(self.value)}", f"f: {tuple(self.f.shape)}", f"g: {tuple(self.g.shape)}"]
        if self.batched:
            fields.insert(0, f"batch={self.value.shape[0]}")
        fields += [f"n_iter={_numbers(self.n_iter)}", f"converged={_numbers(self.converged)}"]
        if "marginal_error" in self.__dict__:  # cached_property already computed
            fields.append(f"marginal_error={_numbers(self.marginal_error)}")
        elif "error" in self.info:
            fields.append(f"error={_numbers(self._out(self.info['error']))}")
        if self.eps is not None:
            fields.append(f"eps={self.eps:.4g}")
        return f"OTResult({', '.join(fields)})"

    @property
    def batched(self) -> bool:
        """Whether the outputs keep a batch dimension (False for unbatched inputs)."""
        return self.value.dim() == 1

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.batched else t.squeeze(0)

    @cached_property
    def plan(self) -> torch.Tensor:
        """The transport plan (n, m); materialised (n x m memory) on first access."""
        return self._out(self.operator.dense())

    @cached_property
    def transport_cost(self) -> torch.Tensor:
        """<P, C>, differentiable, without materialising the plan."""
        return self._out(self.operator.transport_cost())

    @cached_property
    def marginal_error(self) -> torch.Tensor:
        """|P 1 - a|_1 + |P^T 1 - b|_1 (not differentiated)."""
        with torch.no_grad():
            return self._out(self.operator.marginal_error())

    def apply(self, v: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``P @ v`` (v: (m,) or (m, k)) or ``P^T @ v`` (v: (n,) or (n, k)) with ``transpose``.

        Batched results take v of shape (B, m) or (B, m, k). Differentiable; never builds P. The
        product is computed in the plan's dtype; a v of finer dtype raises (no silent downcast).
        """
        B, n, m = self.operator.geom.shape
        compute = self.operator.geom.dtype
        if not torch.is_tensor(v) or not v.is_floating_point():
            raise ValueError(f"v must be a real floating tensor, got {getattr(v, 'dtype', type(v).__name__)}")
        if torch.promote_types(v.dtype, compute) != compute:
            raise ValueError(f"v has dtype {v.dtype}, finer than the plan's {compute}: casting it would lose "
                             f"precision silently; pass v.to({compute}) or solve in {v.dtype}")
        length = n if transpose else m
        vector = v.dim() == (2 if self.batched else 1)
        vb = v.unsqueeze(-1) if vector else v
        vb = vb if self.batched else vb.unsqueeze(0)
        if vb.dim() != 3 or vb.shape[1] != length or vb.shape[0] not in (1, B):
            raise ValueError(f"v has shape {tuple(v.shape)}; expected its first (non-batch) axis to have length {length}")
        out = self.operator.matmul(vb.expand(B, -1, -1), transpose=transpose)
        out = out.squeeze(-1) if vector else out
        return self._out(out)


def _numbers(t: torch.Tensor, shown: int = 4) -> str:
    """A () or (B,) tensor as a short string: 0.584, or [0.584, 0.612, ...] for batches."""
    values = t.detach().reshape(-1).tolist()
    text = [str(v) if isinstance(v, (bool, int)) else f"{v:.4g}" for v in values[:shown]]
    if t.dim() == 0:
        return text[0]
    return "[" + ", ".join(text + (["..."] if len(values) > shown else [])) + "]"
