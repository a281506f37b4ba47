"""Sinkhorn half-steps at matrix-vector speed: the scaling domain with absorption.

The iterate stays a pair of log potentials (f, g), as in the log domain. A stabilised kernel

    K~_ij = exp((f0_i + g0_j - C_ij) / eps)

is built once at reference potentials (f0, g0); a softmin is then one matrix-vector product:

    softmin_eps(C, g; b)_i = f0_i - eps log sum_j K~_ij b_j exp((g_j - g0_j) / eps)

(and the same with K~^T for the columns). The scalings exp((g - g0)/eps) are *absorbed*, i.e.
(f0, g0) <- (f, g) and K~ rebuilt, before they leave [e^-T, e^T] (T = ``threshold``): then
every product is a sum of positive terms of bounded range, with no overflow and no underflow
that matters, at any eps. A half-step whose result is not finite anyway (a row of K~ that
underflows entirely, far from the fixed point), or whose sums are so small that they may rest on
subnormal entries of K~ (below tiny / u: a few significant bits), is recomputed by the geometry's
log-domain softmin, and the kernel is rebuilt before the next one. A solve that keeps absorbing (eps small
against the costs: the potentials move by many eps per iteration) goes back to the log domain,
where an iteration costs about what an absorption does.

Costs: a rebuild is one exponential per entry of C, as is every log-domain half-step; a
scaling half-step is a product with K~ and O(n + m) exponentials. On a CPU, where the
exponential dominates the log-domain iteration, this is 5 to 15 times faster per iteration. The
kernel is held densely, (B, n, m) in the compute dtype, beside the costs (a ``PointCloud``'s are
built for each rebuild and dropped), so it is used only below ``DENSE_BUDGET_BYTES``.

These per-half-step softmins serve the solves ``scaling_loop`` does not take (unbalanced
problems, callbacks, annealing) and those it hands back; balanced solves run there, on the sums
themselves, with checks every few iterations.

References:
    Schmitzer, "Stabilized sparse scaling algorithms for entropy regularized transport
    problems", SIAM J. Sci. Comput. 2019 (absorption, Algorithm 2).
    Cuturi, "Sinkhorn distances", NeurIPS 2013 (the scaling iterations).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from otcore._arrays import TORCH_GRAIN, as_arrays, as_tensors
from otcore._precision import exp_above_tiny_
from otcore.geometry import Geometry

DOMAINS = ("auto", "log", "scaling")

#: Largest stabilised kernel (bytes, B * n * m entries of the compute dtype) that ``sinkhorn``'s
#: ``domain="auto"`` builds; above it the iterations stay in the log domain. Module-level, so a
#: program may raise or lower it (0 turns the scaling domain off).
DENSE_BUDGET_BYTES = 2**28

#: Range of the scalings, |f - f0| / eps and |g - g0| / eps, before absorption: e^T stays far
#: inside the dtype's range, and a term lost to underflow in K~ (below e^-87 in float32) weighs
#: less than e^(T - 87) against a row sum that is at least about e^-T.
THRESHOLDS = {torch.float32: 24.0, torch.float64: 200.0}

#: A solve that needed more than this many rebuilds per iteration (after ``_PATIENCE``
#: iterations) returns to the log domain.
_REBUILDS_PER_ITER = 0.5
_PATIENCE = 8


#: A NumPy matrix-vector product of a problem of at least this many entries runs on several
#: OpenBLAS threads (measured with NumPy's OpenBLAS 0.3.31: 678 x 678 on one, 679 x 679 on two),
#: which spin for a while after it.
BLAS_THREADED_ENTRIES = 460_800


def iteration_module(geom: Geometry) -> Any:
    """The module a kernel of ``geom`` is iterated on (``StabilisedKernel.xp``): NumPy for CPU
    tensors (``as_arrays`` makes views, no copies; NumPy's BLAS computes a matrix-vector product
    1.2 to 8 times faster than torch's on a CPU, and its small element-wise operations cost
    less), torch elsewhere.

    A float32 problem of ``BLAS_THREADED_ENTRIES`` or more stays on torch while torch runs
    several threads: its iterations alone run twice as fast on NumPy, but whole solves, where
    torch's threads step in beside OpenBLAS's (checks in float64, values), do not gain (700 x 700
    at eps = 0.002, tol = 1e-5: 29 to 44 ms against 29 to 36 ms on torch; 2000 x 2000 at eps =
    0.01: 37 to 52 against 45 to 70 ms at tol = 1e-4, 127 to 156 against 103 to 136 ms at tol =
    1e-5). Below it, NumPy's products run on one thread, beside nothing (600 x 600, eps = 0.002
    to 0.01, tol = 1e-4 and 1e-5: 1.1 to 1.6 times faster than on torch). A float64 kernel of any
    size runs on NumPy (measured 600 x 600 to 3000 x 3000 at eps = 0.002 and 0.01, absorptions
    included: 1.1 to 2.1 times faster)."""
    _, n, m = geom.shape
    if geom.device.type == "cpu" and (
            torch.get_num_threads() == 1 or geom.dtype == torch.float64 or n * m < BLAS_THREADED_ENTRIES):
        return np
    return torch


def build_module(geom: Geometry, xp: Any) -> Any:
    """The module K~ is built on: the iteration module ``xp``, but torch where NumPy's products
    run on one thread and torch's element-wise operations on several (``TORCH_GRAIN`` to
    ``BLAS_THREADED_ENTRIES`` entries). Medians of a rebuild after ten products, float64
    (float32): 64 x 64, NumPy 1.3 (1.6) times faster than torch (dispatch); 256 x 256 to
    500 x 500, torch 1.4 (1.0 to 1.2) times faster (two threads against one); 700 x 700 to
    2000 x 2000, NumPy 1.5 to 2.5 (2.2 to 3.6 to 1000 x 1000) times faster (torch's threads
    wait for OpenBLAS's, which spin after its products)."""
    B, n, m = geom.shape
    if xp is np and torch.get_num_threads() > 1 and TORCH_GRAIN <= B * n * m and n * m < BLAS_THREADED_ENTRIES:
        return torch
    return xp


def stabilised_kernel(geom: Geometry, eps: float, domain: str) -> StabilisedKernel | None:
    """The kernel a solve at ``eps`` iterates with, or None for log-domain iterations.

    ``domain``: ``"log"`` (None), ``"scaling"`` (a kernel, or ValueError saying why it cannot
    run) or ``"auto"``: a kernel on the CPU when ``scaling_unavailable`` finds no reason
    against it. Not on CUDA by default: there the log-domain kernels stream the costs at memory
    speed, which a product with K~ does not beat, and absorption reads the host.
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    if domain == "log" or (domain == "auto" and geom.device.type != "cpu"):
        return None
    reason = scaling_unavailable(geom, eps, grad_enabled=torch.is_grad_enabled())
    if reason is None:
        return StabilisedKernel(geom, eps)
    if domain == "scaling":
        raise ValueError(f"domain='scaling' cannot run: {reason}")
    return None


def scaling_unavailable(geom: Geometry, eps: float, *, grad_enabled: bool) -> str | None:
    """Why the scaling domain cannot run this solve (None when it can).

    It needs a geometry held whole by this process (not ``sharded``), no autograd graph (the
    kernel is built without gradients), a float32 or float64 geometry, eps below the costs'
    range (``cost_range``: above it the log domain's centred softmin keeps digits a product
    with K~ rounds away; never with ``validate=False``, which reads nothing on the host, while
    absorption reads one number per half-step) and a kernel within ``DENSE_BUDGET_BYTES``.
    """
    if torch.compiler.is_compiling():
        return "torch.compile is tracing the solve (absorption's host reads would specialise the graph)"
    if geom.sharded:
        return "the geometry is sharded across processes (a product with K~ would sum over this process's rows only)"
    if grad_enabled:
        return "gradients are recorded (grad='unroll')"
    if geom.dtype not in THRESHOLDS:
        return f"the compute dtype is {geom.dtype} (the scaling domain needs float32 or float64)"
    B, n, m = geom.shape
    size = B * n * m * torch.finfo(geom.dtype).bits // 8
    if size > DENSE_BUDGET_BYTES:
        return f"the kernel would take {size} bytes (DENSE_BUDGET_BYTES = {DENSE_BUDGET_BYTES})"
    if not geom.validate:
        return "the geometry was built with validate=False (no host reads)"
    if not eps < geom.cost_range():
        return "eps is not below the costs' range"
    return None


class StabilisedKernel:
    """The kernel K~ of the module docstring, rebuilt at the iterate when needed.

    Args:
        geom: the problem's geometry (its costs are materialised, without gradients, at each
            rebuild).
        eps: the regularisation the kernel is built for.
    """

    def __init__(self, geom: Geometry, eps: float):
        self.geom, self.eps = geom, eps
        self.xp = iteration_module(geom)  # the module K~ is iterated on ...
        self.build_xp = build_module(geom, self.xp)  # ... and built on
        self.threshold = THRESHOLDS[geom.dtype]
        # a sum below tiny / u may rest on subnormal kernel entries (a few significant bits): such a
        # half-step is recomputed in the log domain, as a non-finite one is
        self.full_precision = torch.finfo(geom.dtype).tiny / torch.finfo(geom.dtype).eps
        self.kernel: torch.Tensor | None = None  # (B, n, m)
        self.f0: torch.Tensor | None = None  # (B, n)
        self.g0: torch.Tensor | None = None  # (B, m)
        self.rebuilds = 0
        self.half_steps = 0
        self.retired = False  # True once the solve is back in the log domain

    def softmin(
        self, f: torch.Tensor, g: torch.Tensor, weights: torch.Tensor, axis: int, eps: float,
    ) -> torch.Tensor:
        """``geom.softmin`` of the current iterate: of g over the columns (``axis=1``, the
        f-update, (B, n)) or of f over the rows (``axis=0``, the g-update, (B, m)).

        ``weights``: b (B, m) for ``axis=1``, a (B, n) for ``axis=0``. At an ``eps`` other than
        the kernel's (annealing), or once the solve is back in the log domain, this is
        ``geom.softmin`` itself. No gradients. Reads three numbers on the host (the scalings'
        range, whether the result is finite).
        """
        h = g if axis == 1 else f
        if eps != self.eps or self._retire():
            return self.geom.softmin(h, eps, weights, axis=axis)
        self.half_steps += 1
        kernel, f0, g0 = self.kernel, self.f0, self.g0
        if kernel is not None and f0 is not None and g0 is not None:
            exponent = (h - (g0 if axis == 1 else f0)).div_(self.eps)
            low, high = torch.aminmax(exponent)
        if kernel is None or f0 is None or g0 is None or max(-float(low), float(high)) > self.threshold:
            kernel, f0, g0 = self.rebuild(f, g)
            scaled = weights
        else:
            scaled = exponent.exp_().mul_(weights)
        if axis == 1:
            sums = torch.bmm(kernel, scaled.unsqueeze(-1)).squeeze(-1)
        else:
            sums = torch.bmm(scaled.unsqueeze(-2), kernel).squeeze(-2)
        smallest = sums.amin()
        out = torch.add(f0 if axis == 1 else g0, sums.log_(), alpha=-self.eps)
        total, smallest = torch.stack((out.sum(), smallest)).tolist()  # one host read
        if math.isfinite(total) and smallest >= self.full_precision:
            return out
        self.kernel = None  # rebuilt at the next half-step, from an iterate the log domain made
        return self.geom.softmin(h, self.eps, weights, axis=axis)

    def absorbing_too_often(self) -> bool:
        """Whether the solve rebuilt the kernel so often that log-domain iterations would cost
        no more (more than ``_REBUILDS_PER_ITER`` per iteration, after ``_PATIENCE``)."""
        iterations = self.half_steps / 2
        return iterations >= _PATIENCE and self.rebuilds > _REBUILDS_PER_ITER * iterations

    def _retire(self) -> bool:
        """Whether the solve is (now) back in the log domain (``absorbing_too_often``)."""
        if not self.retired and self.absorbing_too_often():
            self.retired, self.kernel = True, None
        return self.retired

    def rebuild(self, f: torch.Tensor | None, g: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K~ at (f0, g0) = (f, g); returns (K~, f0, g0).

        (None, None): at the hard c-transforms of g = 0, f0_i = min_j C_ij and
        g0_j = min_i (C_ij - f0_i), a start with f0 + g0 <= C whose every row and column of K~
        holds a 1 (no row or column underflows, whatever eps), for a warm start gone wrong.
        """
        self.rebuilds += 1
        self.kernel = None  # free the old kernel before the new one is built
        with torch.no_grad():
            C = self.geom.materialize()
            if f is None or g is None:
                f = C.amin(-1)
                g = (C - f.unsqueeze(-1)).amin(-2)
        self.f0, self.g0 = f.clone(), g.clone()
        f_, g_, C_ = as_arrays(self.build_xp, self.f0, self.g0, C)
        with np.errstate(all="ignore"):  # an entry that overflows is for the sums' checks to find
            exponent = f_[..., :, None] + g_[..., None, :]
            exponent -= C_
            exponent /= self.eps
            # entries below e tiny are 0: a subnormal exponential or product is many times slower
            (self.kernel,) = as_tensors(exp_above_tiny_(exponent, zero=True))
        return self.kernel, self.f0, self.g0

