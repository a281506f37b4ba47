"""Property-based robustness campaign (hypothesis) over the entropic core and exact OT.

Draws problems over dtype (float16, bfloat16, float32, float64) x eps in [1e-4, 1] x cost scale in
[1e-3, 1e4] (so eps / scale spans 1e-8 to 1e3) x offsets {0, 1e3} (added to a dense cost, or a
translation of both clouds) x zero weights x duplicated points x unbalanced marginals x batches,
for ``sinkhorn``, ``sns``, ``sinkhorn_divergence`` and ``emd``, and checks:

* no NaN/inf in any output: value, potentials, plan, transport cost, ``marginal_error``,
  ``apply`` (both ways) and the gradients of each of them in every grad mode;
* ``converged`` is honest: where it is True, the float64 re-evaluation of the returned potentials
  on the float64 problem (the inputs as given, cast to float64) meets ``tol``;
* float64 values (plan, transport cost, value) equal POT's on well-conditioned draws
  (eps / cost scale in [0.05, 1e3]) where both converge; ``emd``'s value equals ``ot.emd2``'s.

Non-convergence is allowed (small eps): solvers run with ``warn=False`` (or their
``ConvergenceWarning`` is caught) and only the properties above are checked then.

Budget: the default hypothesis profile runs a bounded campaign (under 2 minutes on a 2-core CPU);
``pytest tests/test_fuzz.py --hypothesis-profile=deep`` (registered in conftest.py) multiplies
every test's examples by the loaded profile's ``max_examples / 100`` and lets Sinkhorn run longer.

Every drawn problem is a ``Spec`` of plain numbers (printed by hypothesis on failure) that
``build`` turns into tensors deterministically, so a falsifying example reproduces with
``build(Spec(...))``.

Convention: ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import ot
import torch
from conftest import F64, sqdist
from hypothesis import HealthCheck, Phase, event, example, given, note, settings
from hypothesis import strategies as st

import otcore
from otcore.warnings import PrecisionWarning

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": F64}
HALF = (torch.float16, torch.bfloat16)
GRAD_MODES = ("implicit", "unroll", "envelope")

#: 1 under the default profile (CI budget); max_examples / 100 under a bigger one ("deep").
SCALE = max(1, settings.default.max_examples // 100)
DEEP = SCALE > 1
SINKHORN_ITERS = (1, 2, 30, 300) + ((3000,) if DEEP else ())


#: The bounded (CI) campaign does not shrink: shrinking a slow failing example can take minutes. A
#: failure is reported as drawn (a ``Spec`` that ``build`` reproduces) and saved in the example
#: database; a run under a bigger profile ("deep") replays and shrinks it.
PHASES = tuple(Phase) if DEEP else (Phase.explicit, Phase.reuse, Phase.generate, Phase.target)


def fuzz(n: int) -> settings:
    """Settings of a test that runs ``n`` examples under the default profile."""
    return settings(max_examples=n * SCALE, deadline=None, phases=PHASES,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])


# ----------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class Spec:
    """A problem as plain numbers; ``build`` makes the tensors."""

    seed: int
    dtype: str
    n: int
    m: int
    batch: int  # 0: unbatched
    geometry: str  # "dense" cost tensor or "cloud" (PointCloud, squared Euclidean)
    d: int
    scale: float  # cost scale
    offset: float  # added to the dense cost, or to every coordinate of both clouds
    eps: float
    weights: str  # "uniform" (None), "random" or "zeros" (some zero entries)
    shared_weights: bool  # batched problems: (n,) weights shared by the batch, else (B, n)
    duplicates: bool  # some points (rows / columns of C) repeated
    tau_a: float = 1.0
    tau_b: float = 1.0
    mass_b: float = 1.0  # total mass of b (unbalanced problems only)

    @property
    def balanced(self) -> bool:
        return self.tau_a == 1.0 and self.tau_b == 1.0


@dataclass
class Problem:
    """Tensors of a ``Spec``: the inputs as passed to the solver and their float64 copies."""

    cost: object  # tensor or PointCloud
    C: torch.Tensor | None  # dense input cost (leaf)
    x: torch.Tensor | None  # cloud inputs (leaves)
    y: torch.Tensor | None
    a: torch.Tensor | None
    b: torch.Tensor | None
    C64: torch.Tensor  # (B, n, m) float64 costs of the inputs as given
    a64: torch.Tensor  # (B, n) float64 weights as given (uniform for None)
    b64: torch.Tensor  # (B, m), rescaled to a's mass when balanced (as the solvers do)

    @property
    def leaves(self) -> dict[str, torch.Tensor]:
        named = {"C": self.C, "x": self.x, "y": self.y, "a": self.a, "b": self.b}
        return {k: t for k, t in named.items() if t is not None and t.requires_grad}


def _weights(k: int, kind: str, gen: torch.Generator, batch: int) -> torch.Tensor | None:
    """(batch, k) float64 weights on the simplex; ``zeros``: 1 to k - 1 zero entries."""
    if kind == "uniform":
        return None
    w = torch.rand(batch, k, generator=gen, dtype=F64) + 0.05
    if kind == "zeros" and k > 1:
        for row in w:
            zeros = int(torch.randint(1, k, (1,), generator=gen))
            row[torch.randperm(k, generator=gen)[:zeros]] = 0
    return w / w.sum(-1, keepdim=True)


def _duplicate(t: torch.Tensor, dim: int, gen: torch.Generator) -> None:
    """Copy one slice of ``t`` along ``dim`` (a point, or a row / column of C) over another, in place."""
    k = t.shape[dim]
    if k < 2:
        return
    i, j = torch.randperm(k, generator=gen)[:2].tolist()
    t.select(dim, i).copy_(t.select(dim, j))


def build(spec: Spec, requires_grad: bool = False) -> Problem:
    gen = torch.Generator().manual_seed(spec.seed)
    dtype = DTYPES[spec.dtype]
    B = max(spec.batch, 1)
    n, m = spec.n, spec.m
    C = x = y = None
    if spec.geometry == "dense":
        C64 = spec.scale * torch.rand(B, n, m, generator=gen, dtype=F64)
        if spec.duplicates:
            _duplicate(C64, 1, gen)
            _duplicate(C64, 2, gen)
        C = (C64 + spec.offset).to(dtype)
        C64 = C.to(F64, copy=True)  # the cost as given
        C = C if spec.batch else C[0]
        C.requires_grad_(requires_grad)
        cost = C
    else:
        sigma = math.sqrt(spec.scale / (2 * spec.d))  # E|x - y|^2 = scale
        x = sigma * torch.randn(B, n, spec.d, generator=gen, dtype=F64)
        y = sigma * torch.randn(B, m, spec.d, generator=gen, dtype=F64) + sigma
        if spec.duplicates:
            _duplicate(x, 1, gen)
            _duplicate(y, 1, gen)
        x, y = (x + spec.offset).to(dtype), (y + spec.offset).to(dtype)
        C64 = sqdist(x.to(F64, copy=True), y.to(F64, copy=True))
        x, y = (x, y) if spec.batch else (x[0], y[0])
        x.requires_grad_(requires_grad)
        y.requires_grad_(requires_grad)
        cost = otcore.PointCloud(x, y)
    a64, b64 = _weights(n, spec.weights, gen, B), _weights(m, spec.weights, gen, B)
    a = b = None
    if a64 is not None:
        b64 = spec.mass_b * b64
        if spec.shared_weights:
            a64, b64 = a64[:1].expand(B, n), b64[:1].expand(B, m)
        a, b = a64.to(dtype), b64.to(dtype)
        a64, b64 = a.to(F64, copy=True), b.to(F64, copy=True)  # as given
        if not spec.batch or spec.shared_weights:
            a, b = a[0], b[0]
        a.requires_grad_(requires_grad)
        b.requires_grad_(requires_grad)
    else:
        a64, b64 = torch.full((B, n), 1 / n, dtype=F64), torch.full((B, m), 1 / m, dtype=F64)
    if spec.balanced:
        b64 = b64 * (a64.sum(-1, keepdim=True) / b64.sum(-1, keepdim=True))
    return Problem(cost=cost, C=C, x=x, y=y, a=a, b=b, C64=C64, a64=a64, b64=b64)


seeds = st.integers(0, 2**31 - 1)


@st.composite
def specs(draw, *, dtypes=tuple(DTYPES), geometries=("dense", "cloud"), max_size=10, batches=(0, 2, 3),
          unbalanced=False, rel_eps=None):
    """A ``Spec``: eps log-uniform in [1e-4, 1], or eps / scale log-uniform in ``rel_eps`` (lo, hi)."""
    scale = 10 ** draw(st.floats(-3, 4))
    if rel_eps is None:
        eps = 10 ** draw(st.floats(-4, 0))
    else:  # log-uniform eps / scale
        eps = 10 ** draw(st.floats(math.log10(rel_eps[0]), math.log10(rel_eps[1]))) * scale
    tau_a = tau_b = mass_b = 1.0
    if unbalanced and draw(st.booleans()):
        taus = st.one_of(st.just(1.0), st.floats(0.01, 0.999))
        tau_a, tau_b = draw(taus), draw(taus)
        if tau_a < 1.0 or tau_b < 1.0:
            mass_b = draw(st.floats(0.25, 4.0))
    return Spec(
        seed=draw(seeds), dtype=draw(st.sampled_from(dtypes)), n=draw(st.integers(1, max_size)),
        m=draw(st.integers(1, max_size)), batch=draw(st.sampled_from(batches)),
        geometry=draw(st.sampled_from(geometries)), d=draw(st.integers(1, 3)), scale=scale,
        offset=draw(st.sampled_from([0.0, 1e3])), eps=eps,
        weights=draw(st.sampled_from(["uniform", "random", "zeros"])), shared_weights=draw(st.booleans()),
        duplicates=draw(st.booleans()), tau_a=tau_a, tau_b=tau_b, mass_b=mass_b,
    )


# ----------------------------------------------------------------------------- checks
def finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def default_tol(dtype: torch.dtype) -> float:
    return 1e-6 if dtype == F64 else 1e-4


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in HALF else dtype


def probes(spec: Spec, gen_seed: int):
    """Vectors to multiply the plan by: (v for P v, u for P^T u), in the input dtype."""
    gen = torch.Generator().manual_seed(gen_seed)
    B = (spec.batch,) if spec.batch else ()
    dtype = DTYPES[spec.dtype]
    v = torch.randn(*B, spec.m, 2, generator=gen, dtype=F64).to(dtype)
    u = torch.randn(*B, spec.n, generator=gen, dtype=F64).to(dtype)
    return v, u


def residual64(spec: Spec, p: Problem, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The stopping residual of potentials (B, n), (B, m), re-evaluated in float64: (B,).

    Balanced: |P1 - a|_1 + |P^T 1 - b|_1 of the log-domain plan
    exp(log a_i + log b_j + (f_i + g_j - C_ij)/eps) (zero weights give 0).
    Unbalanced: the same L1 residual of the fixed point f = tau_a softmin(g), g = tau_b softmin(f),
    i.e. sum_i a_i |expm1((f_i - tau_a softmin(g)_i)/eps)| + the same over the columns.
    """
    f, g, C, a, b, eps = f.to(F64), g.to(F64), p.C64, p.a64, p.b64, spec.eps
    la, lb = torch.log(a), torch.log(b)
    if spec.balanced:
        L = la[:, :, None] + lb[:, None, :] + (f[:, :, None] + g[:, None, :] - C) / eps
        rows, cols = torch.logsumexp(L, -1).exp(), torch.logsumexp(L, -2).exp()
        return (rows - a).abs().sum(-1) + (cols - b).abs().sum(-1)
    s_row = -eps * torch.logsumexp(lb[:, None, :] + (g[:, None, :] - C) / eps, -1)
    s_col = -eps * torch.logsumexp(la[:, :, None] + (f[:, :, None] - C) / eps, -2)
    r = torch.where(a > 0, a * torch.expm1((f - spec.tau_a * s_row) / eps), 0).abs().sum(-1)
    c = torch.where(b > 0, b * torch.expm1((g - spec.tau_b * s_col) / eps), 0).abs().sum(-1)
    return r + c


def dishonest(spec: Spec, p: Problem, res: otcore.OTResult, tol: float) -> list[str]:
    """Problems that report ``converged`` whose float64 residual exceeds ``tol``.

    Potentials: the returned ones, except for half inputs, whose outputs are rounded to half
    precision: there, the float32 potentials the solver computed (``res.operator``).
    Slack: 8 rounding units of the compute dtype times the total mass, the accumulation error of
    the solver's own residual (1e-6 of tol in float32, 1e-9 in float64).
    """
    dtype = DTYPES[spec.dtype]
    B = max(spec.batch, 1)
    if dtype in HALF:
        f, g = res.operator.f, res.operator.g
    else:
        f, g = res.f.reshape(B, spec.n), res.g.reshape(B, spec.m)
    if not (finite(f) and finite(g)):
        return []  # reported by the finiteness properties
    converged = res.converged.reshape(B)
    resid = residual64(spec, p, f.detach(), g.detach())
    mass = p.a64.sum(-1) + p.b64.sum(-1)
    bound = tol + 8 * torch.finfo(compute_dtype(dtype)).eps * mass
    return [f"problem {k}: residual {float(resid[k]):.3e} > tol {tol:g} (n_iter "
            f"{int(res.n_iter.reshape(B)[k])})" for k in range(B) if bool(converged[k]) and not resid[k] <= bound[k]]


def report(res: otcore.OTResult) -> None:
    """Note the outcome (printed with a failing example; counted by --hypothesis-show-statistics)."""
    note(f"converged={res.converged.tolist()} n_iter={res.n_iter.tolist()}")
    converged = res.converged.reshape(-1)
    event("converged: " + ("all" if bool(converged.all()) else "some" if bool(converged.any()) else "none"))


def grad_failures(outputs: dict[str, torch.Tensor], leaves: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """For each output, the leaves whose gradient (of the output's sum) is not finite.

    A half-precision leaf's gradient may overflow its dtype (float16 ends at 65504): allowed
    where the backward pass said so with a ``PrecisionWarning``.
    """
    bad = {}
    for name, out in outputs.items():
        if not out.requires_grad:
            bad[name] = []
            continue
        with warnings.catch_warnings(record=True) as caught:  # the implicit CG may stop short: allowed here
            warnings.simplefilter("ignore", otcore.ConvergenceWarning)
            warnings.simplefilter("always", PrecisionWarning)
            grads = torch.autograd.grad(out.sum(), list(leaves.values()), retain_graph=True, allow_unused=True)
        warned = any(issubclass(w.category, PrecisionWarning) for w in caught)
        bad[name] = [leaf for (leaf, t), gr in zip(leaves.items(), grads) if gr is not None and not finite(gr)
                     and not (warned and t.dtype in HALF and not gr.isnan().any())]
    return bad


def plan_outputs(res: otcore.OTResult, spec: Spec, probe_seed: int) -> dict[str, torch.Tensor]:
    """Differentiable scalar-ish outputs of a result, one per entry point."""
    v, u = probes(spec, probe_seed)
    W = torch.linspace(-1, 1, spec.n * spec.m, dtype=res.plan.dtype).reshape(spec.n, spec.m)
    return {
        "value": res.value,
        "transport_cost": res.transport_cost,
        "plan": res.plan * W,
        "apply": res.apply(v),
        "apply_transpose": res.apply(u, transpose=True),
        "potentials": res.f.sum(-1) - 0.5 * res.g.sum(-1),
    }


# ----------------------------------------------------------------------------- sinkhorn
def check_gradients(spec, p, res, probe_seed) -> None:
    """The gradient of every entry point of ``res`` is finite in every leaf (``grad_failures``)."""
    bad = grad_failures(plan_outputs(res, spec, probe_seed), p.leaves)
    assert not any(bad.values()), bad


def finite_or_flagged(spec: Spec, res: otcore.OTResult, t: torch.Tensor) -> bool:
    """Whether an output ``t`` of ``res`` is finite, or, for half-precision inputs, overflows
    its dtype (float16 ends at 65504: +-inf, never NaN) only in problems reported not
    converged (the solvers flag them)."""
    if finite(t):
        return True
    if DTYPES[spec.dtype] not in HALF or bool(t.isnan().any()):
        return False
    converged = res.converged.reshape(-1)  # per problem (one when unbatched)
    overflowed = (~torch.isfinite(t)).reshape(converged.numel(), -1).any(-1)
    return not bool((overflowed & converged).any())


def check_outputs(spec, p, res, probe_seed) -> None:
    """Every output of ``res`` is finite (``finite_or_flagged``), and ``converged`` is honest
    (float64 re-evaluation)."""
    report(res)
    v, u = probes(spec, probe_seed)
    for name in ("f", "g", "value", "plan", "transport_cost", "marginal_error"):
        assert finite_or_flagged(spec, res, getattr(res, name)), (name, getattr(res, name))
    assert finite_or_flagged(spec, res, res.apply(v)), res.apply(v)
    assert finite_or_flagged(spec, res, res.apply(u, transpose=True)), res.apply(u, transpose=True)
    bad = dishonest(spec, p, res, default_tol(compute_dtype(DTYPES[spec.dtype])))
    assert not bad, bad


@fuzz(300)
@given(specs(unbalanced=True), st.sampled_from(SINKHORN_ITERS), st.sampled_from([None, 0.5]), seeds)
def test_sinkhorn_outputs_are_finite_and_convergence_is_honest(spec, max_iter, eps_scaling, probe_seed):
    p = build(spec)
    res = otcore.sinkhorn(p.cost, p.a, p.b, eps=spec.eps, tau_a=spec.tau_a, tau_b=spec.tau_b, max_iter=max_iter,
                          eps_scaling=eps_scaling, warn=False)
    check_outputs(spec, p, res, probe_seed)


@fuzz(150)
@given(specs(max_size=6, batches=(0, 2), unbalanced=True), st.sampled_from(GRAD_MODES), st.sampled_from([1, 3, 40]),
       seeds)
def test_sinkhorn_gradients_are_finite(spec, mode, max_iter, probe_seed):
    p = build(spec, requires_grad=True)
    res = otcore.sinkhorn(p.cost, p.a, p.b, eps=spec.eps, tau_a=spec.tau_a, tau_b=spec.tau_b, max_iter=max_iter,
                          grad=mode, warn=False)
    report(res)
    check_gradients(spec, p, res, probe_seed)


# ----------------------------------------------------------------------------- sns
@fuzz(50)
@given(specs(max_size=8), st.sampled_from(["sparse", "dense", "direct", "auto"]), st.sampled_from(["implicit", "envelope"]),
       st.sampled_from([1, 5, 30]), st.sampled_from([0, 5, 20]), seeds)
def test_sns_outputs_and_gradients_are_finite_and_convergence_is_honest(spec, hessian, mode, max_iter,
                                                                        sinkhorn_iter, probe_seed):
    p = build(spec, requires_grad=True)
    res = otcore.sns(p.cost, p.a, p.b, eps=spec.eps, max_iter=max_iter, sinkhorn_iter=sinkhorn_iter, hessian=hessian,
                     grad=mode, warn=False)
    check_outputs(spec, p, res, probe_seed)
    check_gradients(spec, p, res, probe_seed)


# ----------------------------------------------------------------------------- divergence
@fuzz(120)
@given(specs(geometries=("cloud",), max_size=8), st.sampled_from(GRAD_MODES), st.sampled_from([1, 3, 40]),
       st.booleans())
def test_divergence_and_its_gradients_are_finite(spec, mode, max_iter, same):
    p = build(spec, requires_grad=True)
    y, b = (p.x, p.a) if same and spec.n == spec.m else (p.y, p.b)  # also the identical-measure shortcut
    S = otcore.sinkhorn_divergence(p.x, y, p.a, b, eps=spec.eps, max_iter=max_iter, grad=mode, warn=False)
    assert finite(S), S
    bad = grad_failures({"divergence": S}, p.leaves)
    assert not bad["divergence"], bad


# ----------------------------------------------------------------------------- emd
@fuzz(300)
@given(specs(max_size=8), seeds)
@example(Spec(seed=57328229, dtype="float16", n=3, m=2, batch=2, geometry="cloud", d=1, scale=9900.360044803405,
              offset=1000.0, eps=0.15812896962921197, weights="uniform", shared_weights=True, duplicates=False,
              tau_a=1.0, tau_b=1.0, mass_b=1.0), 66161125)  # a potential beyond float16's range: flagged
def test_emd_outputs_and_gradients_are_finite_and_float64_values_equal_pots(spec, probe_seed):
    p = build(spec, requires_grad=True)
    res = otcore.emd(p.cost, p.a, p.b, warn=False)
    v, u = probes(spec, probe_seed)
    for name in ("f", "g", "value", "plan", "transport_cost", "marginal_error"):
        assert finite_or_flagged(spec, res, getattr(res, name)), (name, getattr(res, name))
    assert finite_or_flagged(spec, res, res.apply(v)), res.apply(v)
    assert finite_or_flagged(spec, res, res.apply(u, transpose=True)), res.apply(u, transpose=True)
    bad = grad_failures({"value": res.value, "transport_cost": res.transport_cost}, p.leaves)
    assert not bad["value"], bad
    assert not bad["transport_cost"], bad
    if DTYPES[spec.dtype] == F64:
        B = max(spec.batch, 1)
        ref = [ot.emd2(p.a64[k].numpy(), p.b64[k].numpy(), p.C64[k].numpy(), numItermax=1_000_000) for k in range(B)]
        ref = torch.tensor(ref, dtype=F64)
        tol = 1e-12 * float(p.C64.abs().max() + 1)
        torch.testing.assert_close(res.value.detach().reshape(B), ref, rtol=1e-12, atol=tol)


# ----------------------------------------------------------------------------- float64 vs POT
POT_TOL, POT_ITERS = 1e-10, 2000
WELL_CONDITIONED = (0.05, 1e3)  # eps / cost scale


def pot_plan(a, b, C, eps):
    """POT's log-domain Sinkhorn plan of a float64 problem, on the points of positive weight,
    scattered back into an (n, m) plan; None if it did not reach POT_TOL."""
    ia, ib = a > 0, b > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        P = ot.sinkhorn(a[ia].numpy(), b[ib].numpy(), C[ia][:, ib].numpy(), eps, method="sinkhorn_log",
                        stopThr=POT_TOL / 10, numItermax=POT_ITERS)
    P = torch.as_tensor(P)
    error = (P.sum(1) - a[ia]).abs().sum() + (P.sum(0) - b[ib]).abs().sum()
    if not error <= POT_TOL:
        return None
    full = torch.zeros(len(a), len(b), dtype=F64)
    full[ia.nonzero(), ib.nonzero().T] = P
    return full


def pot_unbalanced(a, b, C, eps, tau_a, tau_b):
    """POT's unbalanced Sinkhorn plan (entropic term KL(P || a x b), KL marginal penalties
    rho = eps tau / (1 - tau)) on the points of positive weight, scattered back into an (n, m)
    plan; None if POT warned (not converged, or its scalings under/overflowed)."""
    ia, ib = a > 0, b > 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        P = ot.unbalanced.sinkhorn_unbalanced(a[ia].numpy(), b[ib].numpy(), C[ia][:, ib].numpy(), eps,
                                              (rho(tau_a, eps), rho(tau_b, eps)), method="sinkhorn", reg_type="kl",
                                              numItermax=POT_ITERS, stopThr=1e-13)
    if caught or not np.isfinite(P).all():
        return None
    full = torch.zeros(len(a), len(b), dtype=F64)
    full[ia.nonzero(), ib.nonzero().T] = torch.as_tensor(P)
    return full


def rho(tau: float, eps: float) -> float:
    """The KL penalty of a marginal relaxed by tau = rho / (rho + eps)."""
    return math.inf if tau == 1.0 else eps * tau / (1.0 - tau)


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Generalised KL(p || q) = sum p log(p/q) - p + q, with 0 log 0 = 0."""
    return (torch.special.xlogy(p, p) - torch.special.xlogy(p, q) - p + q).sum()


def entropic_objective(P, a, b, C, eps, tau_a=1.0, tau_b=1.0):
    """<P, C> + eps KL(P || a x b) + rho_a KL(P1 || a) + rho_b KL(P^T 1 || b) (generalised KL;
    no marginal term for tau = 1)."""
    value = (P * C).sum() + eps * kl(P, a[:, None] * b[None, :])
    for tau, marginal, w in ((tau_a, P.sum(1), a), (tau_b, P.sum(0), b)):
        if tau < 1.0:
            value = value + rho(tau, eps) * kl(marginal, w)
    return value


def check_against_pot(spec: Spec, p: Problem, res: otcore.OTResult) -> int:
    """Compare transport cost, value and plan with POT's per problem; returns how many were compared."""
    B = max(spec.batch, 1)
    compared = 0
    for k in range(B):
        if not bool(res.converged.reshape(B)[k]):
            continue
        a, b, C = p.a64[k], p.b64[k], p.C64[k]
        if spec.balanced:
            P = pot_plan(a, b, C, spec.eps)
        else:
            P = pot_unbalanced(a, b, C, spec.eps, spec.tau_a, spec.tau_b)
        if P is None:
            continue
        objective = entropic_objective(P, a, b, C, spec.eps, spec.tau_a, spec.tau_b)
        compared += 1
        size = float(C.abs().max())
        plan = res.plan.detach().reshape(B, spec.n, spec.m)[k]
        torch.testing.assert_close(plan, P, rtol=0, atol=1e-7)
        torch.testing.assert_close(res.transport_cost.detach().reshape(B)[k], (P * C).sum(), rtol=1e-7,
                                   atol=1e-7 * size)
        torch.testing.assert_close(res.value.detach().reshape(B)[k], objective, rtol=1e-7, atol=1e-7 * size)
    return compared


@fuzz(150)
@given(specs(dtypes=("float64",), rel_eps=WELL_CONDITIONED, unbalanced=True), st.booleans())
def test_sinkhorn_float64_values_equal_pots(spec, sns):
    p = build(spec)
    if sns and spec.balanced:
        res = otcore.sns(p.cost, p.a, p.b, eps=spec.eps, tol=POT_TOL, max_iter=100, warn=False)
    else:
        res = otcore.sinkhorn(p.cost, p.a, p.b, eps=spec.eps, tau_a=spec.tau_a, tau_b=spec.tau_b, tol=POT_TOL,
                              max_iter=POT_ITERS, warn=False)
    report(res)
    compared = check_against_pot(spec, p, res)
    note(f"compared {compared} problem(s) with POT")
    event(f"compared with POT: {'balanced' if spec.balanced else 'unbalanced'} {'all' if compared == max(spec.batch, 1) else 'some' if compared else 'none'}")


@fuzz(80)
@given(specs(dtypes=("float64",), geometries=("cloud",), max_size=8, rel_eps=WELL_CONDITIONED))
def test_divergence_float64_value_equals_pots(spec):
    p = build(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error", otcore.ConvergenceWarning)
        try:
            S = otcore.sinkhorn_divergence(p.x, p.y, p.a, p.b, eps=spec.eps, tol=POT_TOL, max_iter=POT_ITERS)
        except otcore.ConvergenceWarning:
            return  # not converged: nothing to compare
    B = max(spec.batch, 1)
    S = S.reshape(B)
    x64 = p.x.detach().to(F64).reshape(B, spec.n, spec.d)
    y64 = p.y.detach().to(F64).reshape(B, spec.m, spec.d)
    for k in range(B):
        terms = []
        for (u, wu), (w, ww) in (((x64[k], p.a64[k]), (y64[k], p.b64[k])), ((x64[k], p.a64[k]), (x64[k], p.a64[k])),
                                 ((y64[k], p.b64[k]), (y64[k], p.b64[k]))):
            C = sqdist(u, w)
            P = pot_plan(wu, ww, C, spec.eps)
            if P is None:
                break
            terms.append(entropic_objective(P, wu, ww, C, spec.eps))
        else:
            ref = terms[0] - 0.5 * terms[1] - 0.5 * terms[2]
            size = float(sqdist(torch.cat([x64[k], y64[k]]), torch.cat([x64[k], y64[k]])).max())
            torch.testing.assert_close(S[k], ref, rtol=1e-7, atol=1e-7 * size)
            event("compared with POT")
