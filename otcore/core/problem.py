"""Turning user inputs (cost or geometry, optional weights) into one validated batched problem,
and a solver's batched outputs back into an ``OTResult`` of the user's shapes and dtype."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from otcore._validation import check_equal_mass, check_weight_values, mass_rtol, prepare_weights
from otcore.core.plan import DensePlan, EntropicPlan
from otcore.core.result import OTResult
from otcore.geometry import Geometry, as_geometry
from otcore.warnings import ConvergenceWarning


@dataclass(frozen=True, kw_only=True)
class Problem:
    """A batch of B problems: geometry (B, n, m), weights a (B, n) and b (B, m)."""

    geom: Geometry
    a: torch.Tensor
    b: torch.Tensor
    batched: bool
    out_dtype: torch.dtype

    def without_overflow(
        self, converged: torch.Tensor, *outputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``converged`` (B,) cleared where a batched output (B, ...) overflows the output dtype
        (half inputs are computed in float32 and cast back), and the (B,) mask of those; None, and
        ``converged`` as given, when the dtypes agree (nothing can overflow)."""
        if self.out_dtype == self.geom.dtype:
            return converged, None
        B, limit = converged.shape[0], torch.finfo(self.out_dtype).max
        over = torch.stack([(t.detach().abs() > limit).reshape(B, -1).any(-1) for t in outputs]).any(0)
        return converged & ~over, over

    def result(
        self, *, f: torch.Tensor, g: torch.Tensor, value: torch.Tensor, n_iter: torch.Tensor,
        converged: torch.Tensor, operator: EntropicPlan | DensePlan, eps: float | None = None,
        info: dict | None = None,
    ) -> OTResult:
        """An ``OTResult`` from batched (B, ...) outputs: cast to the input's dtype, and the
        batch dimension dropped for unbatched inputs."""

        def out(t: torch.Tensor) -> torch.Tensor:
            return t if self.batched else t.squeeze(0)

        cast = self.out_dtype
        return OTResult(
            f=out(f.to(cast)), g=out(g.to(cast)), value=out(value.to(cast)), n_iter=out(n_iter),
            converged=out(converged), operator=operator, eps=eps, info=info or {},
        )


def prepare_problem(cost, a, b, *, balanced: bool, validate: bool = True, sharded: bool = False) -> Problem:
    """Validate and broadcast; half-precision inputs are computed in float32.

    A balanced problem's b is rescaled to the mass of a (a factor within the weights' rounding,
    held constant in autograd), so that the marginal constraints are exactly compatible.

    Weights are not normalised: their mass is kept. Balanced weights of total mass k transport k
    units, so the plan is k times that of the normalised weights and ``transport_cost`` scales
    by k (``value`` also changes through its entropy term, eps KL(P || a x b)). Normalise them
    (``a / a.sum()``) for probability measures.

    ``validate=False`` keeps the shape checks but skips every check that reads tensor values
    (finiteness, signs, masses): no host synchronisation. ``sharded``: whether the solver
    accepts a geometry sharded across processes (``otcore.distributed``); the others refuse it,
    since their local sums would silently cover this process's points only.

    Raises:
        ValueError: bad shapes, negative or non-finite weights or costs, (when ``balanced``)
            unequal total masses, and a sharded geometry where ``sharded`` is False.
    """
    geom = as_geometry(cost, validate=validate)
    if geom.sharded and not sharded:
        raise ValueError("cost: a geometry sharded across processes (otcore.distributed) runs only in otcore.sinkhorn, "
                         "otcore.sns and otcore.sinkhorn_divergence; this solver would sum over this process's points "
                         "alone")
    out_dtype = geom.dtype
    compute = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    geom = geom.to_dtype(compute)
    Bg, n, m = geom.shape
    batch = Bg
    batched = geom.batched
    for name, w in (("a", a), ("b", b)):
        if torch.is_tensor(w) and w.dim() == 2:
            batched = True
            if Bg != 1 and w.shape[0] not in (1, Bg):
                raise ValueError(f"{name} has batch size {w.shape[0]} but the cost has {Bg}")
            batch = max(batch, w.shape[0])
    geom = geom.broadcast_to(batch)
    rtol = mass_rtol(compute, *(w.dtype for w in (a, b) if torch.is_tensor(w) and w.is_floating_point()))  # the weights' own precision
    if geom.sharded:
        a, b = _sharded_weights(geom, a, b, batch=batch, dtype=compute, validate=validate)
        if balanced:  # masses over every process's points
            ma, mb = geom.total(a, 0), geom.total(b, 1)
            if validate:
                check_equal_mass(ma.tolist(), mb.tolist(), rtol)
            b = _to_mass(b, ma, mb)
    else:
        a = prepare_weights("a", a, n=n, batch=batch, dtype=compute, device=geom.device)
        b = prepare_weights("b", b, n=m, batch=batch, dtype=compute, device=geom.device)
        if validate or balanced:
            ma, mb = geom.total(a, 0), geom.total(b, 1)
        if validate:
            check_weight_values((("a", a, ma), ("b", b, mb)), equal_mass_rtol=rtol if balanced else None)
        if balanced:
            b = _to_mass(b, ma, mb)
    return Problem(geom=geom, a=a, b=b, batched=batched, out_dtype=out_dtype)


def _to_mass(b: torch.Tensor, ma: torch.Tensor, mb: torch.Tensor) -> torch.Tensor:
    """b (B, m) rescaled from its masses mb (B,) to a's, ma: equal to the last bit, as a balanced
    problem needs (the factor is within the weights' rounding, and constant in autograd)."""
    return b * (ma / mb).detach().unsqueeze(-1)


def _sharded_weights(
    geom: Geometry, a, b, *, batch: int, dtype: torch.dtype, validate: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``prepare_weights`` for a geometry sharded across processes: every process raises when any
    one's weights are bad (no process is left waiting in a collective), None is uniform over every
    process's points (1 / the global count), and the mass checked is the global one."""
    _, n, m = geom.shape
    weights, failure = [], None
    for name, w, size in (("a", a, n), ("b", b, m)):
        try:
            local = prepare_weights(name, w, n=size, batch=batch, dtype=dtype, device=geom.device, shard=True)
            if validate:
                check_weight_values([(name, local, local.sum(-1))], shard=True)
        except ValueError as error:
            failure = failure or error
            local = torch.ones(batch, size, dtype=dtype, device=geom.device)
        weights.append(local)
    if not bool(geom.all_true(torch.tensor([failure is None], device=geom.device)).all()):
        raise failure or ValueError("a, b: another process's weights are invalid (its error names them)")
    for k, (name, given) in enumerate((("a", a), ("b", b))):
        mass = geom.total(weights[k], k)
        if given is None:
            weights[k] = weights[k] / mass.unsqueeze(-1)
        elif validate and bool((mass <= 0).any()):
            raise ValueError(f"{name} has zero total mass over every process; at least one weight must be > 0")
    return weights[0], weights[1]


def warn_not_converged(
    solver: str, *, converged: torch.Tensor, max_iter: int, causes: Mapping[str, torch.Tensor | None] = MappingProxyType({}),
) -> None:
    """One ``ConvergenceWarning`` when any problem did not converge (reads ``converged`` on the host).

    ``causes`` maps a description ("stopped on a non-finite iterate") to the (B,) mask of the
    problems it explains; the warning counts each.
    """
    if bool(converged.all()):
        return
    reasons = "".join(f"{int(mask.sum())} {text}, " for text, mask in causes.items()
                      if mask is not None and bool(mask.any()))
    warnings.warn(
        f"{solver}: {int((~converged).sum())} of {converged.numel()} problem(s) did not converge "
        f"({reasons}max_iter={max_iter}); result.converged is False for them. "
        "Raise max_iter, loosen tol or increase eps.",
        ConvergenceWarning,
        stacklevel=_user_stacklevel(),
    )


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def _user_stacklevel() -> int:
    """The ``stacklevel`` of ``warn_not_converged``'s caller's first frame outside otcore and torch
    (a module's ``forward`` runs under torch's ``__call__``): the warning points at the user's line."""
    level, frame = 2, sys._getframe(2)
    while frame.f_back is not None and frame.f_code.co_filename.startswith((_PACKAGE_DIR, _TORCH_DIR)):
        level, frame = level + 1, frame.f_back
    return level
