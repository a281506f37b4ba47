"""Peer registry: otcore and the implementations a user would otherwise pick, behind one interface.

A peer turns a task's torch inputs into its own format in ``prepare`` (outside the timings),
solves in ``run`` (timed) and summarises in ``report``. A peer that is not installed, or that
does not do a task or run on a device, raises ``NotImplementedError``, which asv reports as a
skip, never a failure.

Tasks: ``sinkhorn`` (dense cost, to a marginal tolerance, or a fixed number of iterations with
``tol=0``), ``sinkhorn_cloud`` (points), ``emd`` (exact), ``divergence`` (debiased, points).
"""

from __future__ import annotations

import importlib
import math
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


class Otcore(Peer):
    name = "otcore"
    devices = ("cpu", "cuda")

    def prepare(self, inputs):
        return inputs

    def sinkhorn(self, C, a, b, *, eps, tol, max_iter):
        res = otcore.sinkhorn(C, a, b, eps=eps, tol=tol if tol > 0 else 1e-300, max_iter=max_iter, warn=False)
        return res

    def sinkhorn_cloud(self, x, y, a, b, *, eps, tol, max_iter):
        return otcore.sinkhorn(otcore.PointCloud(x, y), a, b, eps=eps, tol=tol if tol > 0 else 1e-300,
                               max_iter=max_iter, warn=False)

    def emd(self, C, a, b):
        return otcore.emd(C, a, b)

    def divergence(self, x, y, *, eps, tol):
        return otcore.sinkhorn_divergence(x, y, eps=eps, tol=tol, warn=False)

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

    def divergence(self, x, y, *, eps, tol):
        import ot

        return ot.bregman.empirical_sinkhorn_divergence(x, y, eps, stopThr=tol, numIterMax=10_000)

    def summarize(self, out) -> Summary:
        if not isinstance(out, tuple):
            return Summary(float(out))
        P, C, a, b, n_iter = out
        return Summary(float((P * C).sum()), float(n_iter), marginal_error(P, a, b))


class PotTorch(PotNumpy):
    """POT's log-domain Sinkhorn through its torch backend (tensors in, tensors out)."""

    devices = ("cpu", "cuda")

    def __init__(self):
        super().__init__("sinkhorn_log")
        self.name = "pot_log_torch"

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

    def divergence(self, x, y, *, eps, tol):
        return self._loss(eps, debias=True)(x, y)

    def summarize(self, out) -> Summary:
        return Summary(float(out) / self.cost_scale)


class OtcoreSns(Otcore):
    name = "otcore_sns"

    def sinkhorn(self, C, a, b, *, eps, tol, max_iter):
        return otcore.sns(C, a, b, eps=eps, tol=tol, max_iter=max_iter, warn=False)


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
        PotNumpy("sinkhorn_log"),
        PotTorch(),
        PotNumpy("sinkhorn"),
        SamplesLossPeer("geomloss", "geomloss", ("cpu", "cuda"), 0.5, backend="tensorized"),
        SamplesLossPeer("geomloss_online", "geomloss", ("cpu", "cuda"), 0.5, backend="online"),
        SamplesLossPeer("flash_sinkhorn", "flash_sinkhorn", ("cuda",), 1.0),
        OtcoreSns(),
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

    def run(self):
        out = self.peer.run(self.task, self.inputs, **self.options)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return out
