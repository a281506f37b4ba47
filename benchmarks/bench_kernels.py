"""GPU point-cloud Sinkhorn: the Triton softmin kernels against FlashSinkhorn, GeomLoss and torch.

``SinkhornIterationGPU``: time per iteration (two half-steps) at a fixed eps on n = m points in
d dimensions, in strict fp32, TF32 (``torch.set_float32_matmul_precision("high")``; FlashSinkhorn
gets ``allow_tf32``) and bf16 points, plus the fraction of the hardware floor it reaches
(``hardware.py``) and the peak GPU memory. ``SinkhornGradientGPU``: the same iterations followed
by the gradient of the value w.r.t. x (forward + backward). CUDA only: elsewhere every case is
an asv skip. ``benchmarks/run_gpu.sh`` runs them and writes ``RESULTS_gpu.md``.
"""

from __future__ import annotations

import torch

from . import hardware, peers, problems

ITERS = 20
IMPLS = ["otcore", "flash_sinkhorn_alt", "torch_tensorized", "geomloss_iter", "otcore_torch"]
SIZES = [10_000, 50_000, 100_000, 1_000_000]
PRECISIONS = ["fp32", "tf32", "bf16"]


class _GPUIterations(peers.PeerCase):
    task = "sinkhorn_iterations"
    grad = False
    timeout = 1800
    number = 1
    repeat = 3

    def setup(self, impl, n, d, precision):
        device = problems.device_or_skip("cuda")
        if impl == "otcore_torch" and n > 100_000:
            raise NotImplementedError("the blocked torch path takes minutes per iteration at this size")
        self._matmul_precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest" if precision == "fp32" else "high")
        x, y = problems.clouds(n, d=d)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        eps = 0.05 * d  # ~ 1e-2 of the mean squared distance 4.5 d between the clouds
        self.prepare_case(impl, device, [x.to(device, dtype), y.to(device, dtype)], eps=eps, iters=ITERS, grad=self.grad)
        try:
            self.run()  # Triton JIT and autotuning
        except Exception as err:
            if impl == "otcore":
                raise
            raise NotImplementedError(f"{impl} failed on this case: {type(err).__name__}: {err}") from err

    def teardown(self, *params):
        torch.set_float32_matmul_precision(getattr(self, "_matmul_precision", "highest"))

    def track_gpu_peak_bytes(self, *params):
        torch.cuda.reset_peak_memory_stats()
        self.run()
        return torch.cuda.max_memory_allocated()

    track_gpu_peak_bytes.unit = "bytes"


class SinkhornIterationGPU(_GPUIterations):
    params = problems.gpu_params(IMPLS, SIZES, [3, 64], PRECISIONS)
    param_names = ("impl", "n", "d", "precision")

    def track_seconds_per_iteration(self, impl, n, d, precision):
        return self.best_seconds() / self.peer.iterations(ITERS)

    def track_floor_fraction(self, impl, n, d, precision):
        """Hardware floor of one iteration / measured time per iteration (1 = at the floor)."""
        floor = hardware.sinkhorn_iteration_floor(n, n, d, precision, torch.cuda.get_device_name())
        return floor / self.track_seconds_per_iteration(impl, n, d, precision)

    track_seconds_per_iteration.unit = "seconds"
    track_floor_fraction.unit = "fraction"


class SinkhornGradientGPU(_GPUIterations):
    """ITERS iterations, then d value / d x (envelope gradient: one more fused pass)."""

    params = problems.gpu_params(IMPLS[:3], SIZES, [3, 64], ["fp32", "bf16"])
    param_names = ("impl", "n", "d", "precision")
    grad = True

    def track_seconds_forward_backward(self, *params):
        return self.best_seconds()

    track_seconds_forward_backward.unit = "seconds"
