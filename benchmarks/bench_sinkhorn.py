"""Entropic OT: otcore.sinkhorn vs POT (log / kernel domain, NumPy / torch), GeomLoss, FlashSinkhorn.

``SinkhornDense``: a dense cost solved to a marginal tolerance (time, iterations, marginal error,
error of <P, C> against a float64 reference). ``SinkhornSmall``: histograms of at most 256 bins
to 1e-9. ``SinkhornIteration``: a fixed number of
iterations, for time per iteration at larger n. ``SinkhornCloud``: points, otcore's PointCloud vs
peers that build the cost matrix (or stream it), time and peak memory.
"""

from __future__ import annotations

import torch

from . import peers, problems

DTYPES = {"float64": torch.float64, "float32": torch.float32}
TOL = 1e-5
MAX_ITER = 3000


def dense_inputs(n, dtype, device):
    x, y = problems.clouds(n)
    a, b = problems.weighted_histograms(n)
    C = torch.cdist(x, y) ** 2
    return [t.to(device=device, dtype=DTYPES[dtype]) for t in (C, a, b)], float(C.max())


class SinkhornDense(peers.PeerCase):
    params = (["otcore", "pot_log", "pot_log_torch", "pot_kernel", "pot_kernel_torch"], problems.by_profile([500], [500, 2000]),
              ["float64", "float32"], [1e-1, 1e-2], problems.DEVICES)  # eps >= 1e-2: the kernel-domain reference stays finite
    param_names = ("impl", "n", "dtype", "eps", "device")
    timeout = 600

    task = "sinkhorn"

    def setup(self, impl, n, dtype, eps, device):
        device = problems.device_or_skip(device)
        inputs, scale = dense_inputs(n, dtype, device)
        self.prepare_case(impl, device, inputs, eps=eps * scale, tol=TOL, max_iter=MAX_ITER)
        self.run()  # warm-up (and Triton JIT once kernels land)

    def time_solve(self, *params):
        self.run()

    def track_iterations(self, *params):
        return self.peer.summarize(self.run()).n_iter

    def track_marginal_error(self, *params):
        return self.peer.summarize(self.run()).marginal_error

    def track_cost_error(self, impl, n, dtype, eps, device):
        """|<P, C> - reference| / reference; reference = POT's float64 kernel Sinkhorn at 1e-12."""
        import ot

        C, a, b = (t.double().cpu().numpy() for t in dense_inputs(n, "float64", "cpu")[0])
        P = ot.sinkhorn(a, b, C, self.options["eps"], stopThr=1e-12, numItermax=100_000)
        ref = float((P * C).sum())
        return abs(self.peer.summarize(self.run()).value - ref) / ref

    track_iterations.unit = "iterations"
    track_marginal_error.unit = "L1"
    track_cost_error.unit = "relative"


class SinkhornSmall(peers.PeerCase):
    """Small histograms (n bins, weighted, squared-Euclidean costs between 2-D points) solved to
    a marginal tolerance of 1e-9 in float64: where per-iteration overhead, not the products,
    decides (otcore against POT's ``sinkhorn_log``, each stopping by its own criterion)."""

    params = (["otcore", "pot_log"], problems.by_profile([64, 256], [64, 150, 256]),
              problems.by_profile([1e-2], [1e-2, 1e-3]))
    param_names = ("impl", "n", "eps")
    timeout = 600

    task = "sinkhorn"

    def setup(self, impl, n, eps):
        inputs, scale = dense_inputs(n, "float64", torch.device("cpu"))
        self.prepare_case(impl, torch.device("cpu"), inputs, eps=eps * scale, tol=1e-9, max_iter=50_000)
        self.run()  # warm-up

    def time_solve(self, *params):
        self.run()

    def track_best_seconds(self, *params):
        """Best of 10 solves: ``make bench``'s quick profile times ``time_solve`` once, where one
        cold call of a few milliseconds (threads waking up) can take twice as long."""
        return self.best_seconds(repeats=10)

    def track_iterations(self, *params):
        return self.peer.summarize(self.run()).n_iter

    track_best_seconds.unit = "seconds"
    track_iterations.unit = "iterations"


class SinkhornIteration(peers.PeerCase):
    """Time of ITERS iterations (no early stop), and the time of one more iteration (the slope
    between ITERS and ITERS + SLOPE_ITERS iterations, setup excluded): per-iteration cost at
    larger n."""

    ITERS = 5
    SLOPE_ITERS = 50
    params = (["otcore", "pot_log", "pot_log_torch", "pot_kernel", "pot_kernel_torch"], problems.by_profile([500, 2000], [500, 2000, 5000]),
              ["float64", "float32"], problems.by_profile([1e-2], [1e-2, 1e-3]), problems.DEVICES)
    param_names = ("impl", "n", "dtype", "eps", "device")
    timeout = 600
    number = 1
    repeat = 3

    task = "sinkhorn"

    def setup(self, impl, n, dtype, eps, device):
        device = problems.device_or_skip(device)
        inputs, scale = dense_inputs(n, dtype, device)
        self.prepare_case(impl, device, inputs, eps=eps * scale, tol=0.0, max_iter=self.ITERS)
        self.run()

    def time_iterations(self, *params):
        self.run()

    def track_seconds_per_iteration(self, *params):
        """(best time of ITERS + SLOPE_ITERS iterations - best time of ITERS) / SLOPE_ITERS, best of 3."""
        short = self.best_seconds(max_iter=self.ITERS)
        return (self.best_seconds(max_iter=self.ITERS + self.SLOPE_ITERS) - short) / self.SLOPE_ITERS

    track_seconds_per_iteration.unit = "seconds"


class _CloudCase(peers.PeerCase):
    """Point clouds (d = 3): otcore's PointCloud never builds n x m; peers may."""

    IMPLS = ("otcore", "pot_log_torch", "geomloss", "geomloss_online", "flash_sinkhorn")
    param_names = ("impl", "n", "device")
    timeout = 600

    task = "sinkhorn_cloud"

    def setup(self, impl, n, device):
        device = problems.device_or_skip(device)
        x, y = problems.clouds(n, d=3)
        u = torch.full((n,), 1.0 / n, dtype=torch.float64)
        inputs = [t.float().to(device) for t in (x, y, u, u)]
        self.prepare_case(impl, device, inputs, eps=0.5, tol=1e-4, max_iter=MAX_ITER)  # ~1e-2 of max cost
        self.run()


class SinkhornCloud(_CloudCase):
    params = (list(_CloudCase.IMPLS), problems.by_profile([1000], [1000, 3000]), problems.DEVICES)

    def time_solve(self, *params):
        self.run()

    def peakmem_solve(self, *params):
        self.run()


class SinkhornCloudGPUMemory(_CloudCase):
    """Peak CUDA memory of the same solves (a class of its own: on a CPU machine it skips in setup)."""

    params = problems.gpu_params(list(_CloudCase.IMPLS), [1000, 3000], ["cuda"])

    def track_gpu_peak_bytes(self, *params):
        torch.cuda.reset_peak_memory_stats()
        self.run()
        return torch.cuda.max_memory_allocated()

    track_gpu_peak_bytes.unit = "bytes"
