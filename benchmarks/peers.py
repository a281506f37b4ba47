"""Peer registry: otcore and the implementations a user would otherwise pick, behind one interface.

A peer turns a task's torch inputs into its own format in ``prepare`` (outside the timings),
solves in ``run`` (timed) and summarises in ``report``. A peer that is not installed, or that
does not do a task or run on a device, raises ``NotImplementedError``, which asv reports as a
skip, never a failure.

Tasks: ``sinkhorn`` (dense cost, to a marginal tolerance, or a fixed number of iterations with
``tol=0``), ``sinkhorn_cloud`` (points), ``emd`` (exact), ``divergence`` (debiased, points;
``grad=True``: followed by its gradient w.r.t. x),
``sinkhorn_iterations`` (points, a fixed eps and number of iterations, optionally followed by
the gradient of the value w.r.t. x; ``iterations(iters)`` says how many a run really did).
"""

from __future__ import annotations

import importlib
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

import otcore


def require(module: str):
    """Import ``module`` or raise NotImplementedError (asv skip)."""
    try:
        return importlib.import_module(module)
    except Exception as err:  # ImportError, or a broken optional install
        raise NotImplementedError(f"{module} is not available: {err}") from err


@dataclass
class Summary:
    """What the track_ benchmarks read: <P, C> (or the loss value), iterations, marginal error."""

    value: float
    n_iter: float = math.nan
    marginal_error: float = math.nan


def marginal_error(P: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(P.sum(1) - a).sum() + np.abs(P.sum(0) - b).sum())


def sqdist_np(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x * x).sum(1)[:, None] + (y * y).sum(1)[None] - 2 * x @ y.T


class Peer:
    name = "peer"
    devices = ("cpu",)

    def check(self, task: str, device: torch.device) -> None:
        if device.type not in self.devices:
            raise NotImplementedError(f"{self.name} does not run on {device.type}")
        if not hasattr(self, task):
            raise NotImplementedError(f"{self.name} does not do {task}")

    def run(self, task: str, inputs, **options):
        return getattr(self, task)(*inputs, **options)

    def iterations(self, iters: int) -> float:
        """Sinkhorn iterations (two half-steps each) one ``sinkhorn_iterations`` run performs."""
        return iters


def _value_and_grad(loss_fn, x: torch.Tensor, grad: bool) -> torch.Tensor:
    """``loss_fn(x)``, and its gradient w.r.t. x when ``grad`` (the forward + backward case)."""
    xs = x.detach().requires_grad_(grad)
    value = loss_fn(xs)
    if grad:
        torch.autograd.grad(value, xs)
    return value.detach()


class Otcore(Peer):
    name = "otcore"
    devices = ("cpu", "cuda")

    def prepare(self, inputs):
        return inputs

    def sinkhorn(self, C, a, b, *, eps, tol, max_iter):
        res = otcore.sinkhorn(C, a, b, eps=eps, tol=tol, max_iter=max_iter, warn=False)
        return res

    def sinkhorn_cloud(self, x, y, a, b, *, eps, tol, max_iter):
        return otcore.sinkhorn(otcore.PointCloud(x, y), a, b, eps=eps, tol=tol, max_iter=max_iter,
                               warn=False)

    def emd(self, C, a, b):
        return otcore.emd(C, a, b)

    backend = "auto"

    def sinkhorn_iterations(self, x, y, *, eps, iters, grad):
        def loss(xs):
            geom = otcore.PointCloud(xs, y, backend=self.backend)
            return otcore.sinkhorn(geom, eps=eps, tol=0, max_iter=iters, grad="envelope", warn=False).value

        return _value_and_grad(loss, x, grad)

    def divergence(self, x, y, *, eps, tol, grad=False):
        return _value_and_grad(lambda xs: otcore.sinkhorn_divergence(xs, y, eps=eps, tol=tol, warn=False), x, grad)

    def summarize(self, out) -> Summary:
        if torch.is_tensor(out):
            return Summary(float(out))
        return Summary(float(out.transport_cost), float(out.n_iter), float(out.marginal_error))


class PotNumpy(Peer):
    """POT on NumPy arrays: ``method`` is "sinkhorn_log" or "sinkhorn" (kernel domain)."""

    def __init__(self, method: str):
        self.method = method
        self.name = "pot_log" if method == "sinkhorn_log" else "pot_kernel"

    def prepare(self, inputs):
        require("ot")
        return [t.detach().cpu().numpy() for t in inputs]

    def sinkhorn(self, C, a, b, *, eps, tol, max_iter):
        import ot

        P, log = ot.sinkhorn(a, b, C, eps, method=self.method, stopThr=tol, numItermax=max_iter, log=True,
                             warn=False)
        return P, C, a, b, log.get("niter", max_iter)

    def sinkhorn_cloud(self, x, y, a, b, *, eps, tol, max_iter):
        return self.sinkhorn(sqdist_np(x, y), a, b, eps=eps, tol=tol, max_iter=max_iter)

    def emd(self, C, a, b):
        import ot

        return ot.emd2(a, b, C)

    def divergence(self, x, y, *, eps, tol, grad=False):
        import ot

        if grad:
            raise NotImplementedError("POT's NumPy divergence has no gradient")
        return ot.bregman.empirical_sinkhorn_divergence(x, y, eps, stopThr=tol, numIterMax=10_000, method=self.method)

    def summarize(self, out) -> Summary:
        if not isinstance(out, tuple):
            return Summary(float(out))
        P, C, a, b, n_iter = out
        return Summary(float((P * C).sum()), float(n_iter), marginal_error(P, a, b))


class PotTorch(PotNumpy):
    """POT's Sinkhorn through its torch backend (tensors in, tensors out): ``method`` as for
    ``PotNumpy``."""

    devices = ("cpu", "cuda")

    def __init__(self, method: str):
        super().__init__(method)
        self.name += "_torch"

    def prepare(self, inputs):
        require("ot")
        return list(inputs)

    def sinkhorn_cloud(self, x, y, a, b, *, eps, tol, max_iter):
        return self.sinkhorn(torch.cdist(x, y) ** 2, a, b, eps=eps, tol=tol, max_iter=max_iter)

    emd = None
    divergence = None

    def check(self, task, device):
        super().check(task, device)
        if getattr(self, task) is None:
            raise NotImplementedError(f"{self.name} does not do {task}")

    def summarize(self, out) -> Summary:
        P, C, a, b, n_iter = out
        return Summary(float((P * C).sum()), float(n_iter),
                       marginal_error(P.cpu().numpy(), a.cpu().numpy(), b.cpu().numpy()))


class SamplesLossPeer(Peer):
    """A GeomLoss-style ``SamplesLoss("sinkhorn")`` (eps-scaling, scaling 0.5).

    GeomLoss's squared-Euclidean cost is |x - y|^2 / 2 (``cost_scale`` 0.5), so otcore's eps maps
    to blur^2 = eps / 2 and its values are halved; ``summarize`` converts back. FlashSinkhorn uses
    |x - y|^2 by default (``cost_scale`` 1) and runs on CUDA only.
    """

    def __init__(self, name: str, module: str, devices, cost_scale: float, backend: str | None = None):
        self.name, self.module, self.devices, self.cost_scale, self.backend = name, module, devices, cost_scale, backend

    def prepare(self, inputs):
        require(self.module)
        if self.backend == "online":
            require("pykeops")
        return list(inputs)

    def _loss(self, eps, debias):
        samples_loss = require(self.module).SamplesLoss
        extra = {} if self.backend is None else {"backend": self.backend}
        return samples_loss("sinkhorn", p=2, blur=math.sqrt(eps * self.cost_scale), debias=debias, scaling=0.5,
                            **extra)

    def sinkhorn_cloud(self, x, y, a, b, *, eps, tol, max_iter):
        return self._loss(eps, debias=False)(a, x, b, y)

    def divergence(self, x, y, *, eps, tol, grad=False):
        loss = self._loss(eps, debias=True)
        return _value_and_grad(lambda xs: loss(xs, y), x, grad)

    def summarize(self, out) -> Summary:
        return Summary(float(out) / self.cost_scale)


class OtcoreTorch(Otcore):
    """otcore forced onto its blocked pure-torch backend (the path the Triton kernels replace)."""

    name = "otcore_torch"
    backend = "torch"


class FlashSinkhornAlternating(Peer):
    """FlashSinkhorn's OTT-style alternating backend at a fixed eps and iteration count (CUDA)."""

    name = "flash_sinkhorn_alt"
    devices = ("cuda",)

    def prepare(self, inputs):
        require("flash_sinkhorn")
        return list(inputs)

    def sinkhorn_iterations(self, x, y, *, eps, iters, grad):
        loss = require("flash_sinkhorn").SamplesLoss(
            "sinkhorn", p=2, backend="alternating", use_epsilon_scaling=False, eps=eps, n_iters=iters,
            debias=False, allow_tf32=torch.get_float32_matmul_precision() != "highest",
        )
        return _value_and_grad(lambda xs: loss(xs, y), x, grad)


class TorchTensorized(Peer):
    """Textbook log-domain Sinkhorn on a materialised cost: torch.logsumexp over (n, m).

    The cost matrix is built in ``prepare`` (outside the timing), so this measures the
    iterations alone; the gradient is the envelope one, through the final softmin.
    """

    name = "torch_tensorized"
    devices = ("cpu", "cuda")

    def prepare(self, inputs):
        x, y = inputs
        try:
            sq = torch.cdist(x.float(), y.float()) ** 2
        except torch.cuda.OutOfMemoryError as err:
            raise NotImplementedError(f"the {x.shape[0]} x {y.shape[0]} cost does not fit: {err}") from err
        return [x, y, sq]

    def sinkhorn_iterations(self, x, y, C, *, eps, iters, grad):
        n, m = C.shape
        log_a, log_b = -math.log(n), -math.log(m)
        g = torch.zeros(m, device=C.device)
        for _ in range(iters):
            f = -eps * torch.logsumexp((g - C) / eps + log_b, dim=1)
            g = -eps * torch.logsumexp((f[:, None] - C) / eps + log_a, dim=0)

        def value(xs):
            cost = torch.cdist(xs.float(), y.float()) ** 2 if grad else C
            return (f.mean() + g.mean()) - eps * torch.exp((f[:, None] + g - cost) / eps + log_a + log_b).sum() + eps

        return _value_and_grad(value, x, grad)


class GeomLossIterations(SamplesLossPeer):
    """GeomLoss's ``SamplesLoss`` timed per iteration: its eps-scaling schedule from the cloud's
    diameter down to eps has ``iterations`` steps (per-iteration cost does not depend on eps).
    Its initial and final extrapolation softmins are not counted, which favours GeomLoss."""

    SCALING = 0.5

    def __init__(self):
        super().__init__("geomloss", "geomloss", ("cpu", "cuda"), 0.5, backend="tensorized")
        self.name = "geomloss_iter"

    def prepare(self, inputs):
        x, y = super().prepare(inputs)
        self.diameter = float(torch.cdist(x[:512].float(), y[:512].float()).max()) * 2
        return [x, y]

    def sinkhorn_iterations(self, x, y, *, eps, iters, grad):
        self.eps = eps
        samples_loss = require(self.module).SamplesLoss
        loss = samples_loss("sinkhorn", p=2, blur=math.sqrt(eps * self.cost_scale), debias=False,
                            scaling=self.SCALING, diameter=self.diameter, backend=self.backend)
        return _value_and_grad(lambda xs: loss(xs, y), x, grad)

    def iterations(self, iters):
        blur = math.sqrt(self.eps * self.cost_scale)
        return 2 + math.ceil(math.log(self.diameter / blur) / math.log(1 / self.SCALING))


class OtcoreSns(Otcore):
    name = "otcore_sns"

    def sinkhorn(self, C, a, b, *, eps, tol, max_iter):
        return otcore.sns(C, a, b, eps=eps, tol=tol, max_iter=max_iter, warn=False)


class OtcoreScaled(Otcore):
    """otcore's divergence with eps-scaling (eps halved per iteration; GeomLoss's default halves blur, eps / 4)."""

    name = "otcore_scaled"

    def divergence(self, x, y, *, eps, tol, grad=False):
        return _value_and_grad(
            lambda xs: otcore.sinkhorn_divergence(xs, y, eps=eps, tol=tol, eps_scaling=0.5, warn=False), x, grad)


class OtcoreAnnealed(Otcore):
    """GeomLoss's recipe spelled in otcore: eps annealed from max |C| by 0.5 per iteration, then two
    iterations at eps, no stopping test (``tol=0``). About GeomLoss's accuracy, not otcore's
    default one."""

    name = "otcore_annealed"

    def divergence(self, x, y, *, eps, tol, grad=False):
        max_cost = float((torch.cdist(x.detach(), y.detach()) ** 2).max())
        steps = max(0, math.ceil(math.log(max_cost / eps) / math.log(2.0)))
        return _value_and_grad(lambda xs: otcore.sinkhorn_divergence(
            xs, y, eps=eps, tol=0, eps_scaling=0.5, max_iter=steps + 2, warn=False), x, grad)


class OtcoreLoose(Otcore):
    """otcore's divergence at marginal error 1e-2 whatever the case asks: about GeomLoss's time,
    for comparisons at equal time (its error is then ~100x smaller than GeomLoss's)."""

    name = "otcore_tol1e-2"

    def divergence(self, x, y, *, eps, tol, grad=False):
        return _value_and_grad(lambda xs: otcore.sinkhorn_divergence(xs, y, eps=eps, tol=1e-2, warn=False), x, grad)


class RegOT(Peer):
    """RegOT's C++ solvers (``regot.sinkhorn_<method>``); its tol bounds the 2-norm of the dual gradient."""

    def __init__(self, method: str):
        self.method, self.name = method, f"regot_{method}"

    def prepare(self, inputs):
        require("regot")
        return [t.detach().cpu().double().numpy() for t in inputs]

    def sinkhorn(self, C, a, b, *, eps, tol, max_iter):
        solver = getattr(require("regot"), f"sinkhorn_{self.method}")
        res = solver(C, a, b, eps, tol=tol, max_iter=max_iter)
        return res.plan, C, a, b, res.niter

    summarize = PotNumpy.summarize


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Otcore(),
        OtcoreTorch(),
        FlashSinkhornAlternating(),
        TorchTensorized(),
        GeomLossIterations(),
        PotNumpy("sinkhorn_log"),
        PotTorch("sinkhorn_log"),
        PotNumpy("sinkhorn"),
        PotTorch("sinkhorn"),
        SamplesLossPeer("geomloss", "geomloss", ("cpu", "cuda"), 0.5, backend="tensorized"),
        SamplesLossPeer("geomloss_online", "geomloss", ("cpu", "cuda"), 0.5, backend="online"),
        SamplesLossPeer("flash_sinkhorn", "flash_sinkhorn", ("cuda",), 1.0),
        OtcoreSns(),
        OtcoreScaled(),
        OtcoreLoose(),
        OtcoreAnnealed(),
        RegOT("ssns"),
        RegOT("sparse_newton"),
        RegOT("bcd"),
    )
}


def get(name: str, task: str, device: torch.device) -> Peer:
    """The peer ``name`` ready for ``task`` on ``device``, or NotImplementedError (asv skip)."""
    peer = PEERS[name]
    peer.check(task, device)
    return peer


class PeerCase:
    """Base of the benchmark classes: one peer on one device, its prepared inputs and options.

    Subclasses set ``task`` and call ``prepare_case`` in ``setup``; ``run`` solves once and
    synchronises CUDA so that asv times the work, not its launch.
    """

    task: str

    def prepare_case(self, impl: str, device: torch.device, inputs, **options) -> None:
        self.device = device
        self.peer = get(impl, self.task, device)
        self.inputs = self.peer.prepare(inputs)
        self.options = options

    def run(self, **overrides):
        """One solve (``overrides`` replace prepared options, e.g. ``max_iter``)."""
        out = self.peer.run(self.task, self.inputs, **{**self.options, **overrides})
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return out

    def best_seconds(self, repeats: int = 3, **overrides) -> float:
        """Best wall time of ``repeats`` calls of ``run(**overrides)``: for ``track_`` benchmarks
        that derive a figure from timings."""
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            self.run(**overrides)
            best = min(best, time.perf_counter() - start)
        return best
