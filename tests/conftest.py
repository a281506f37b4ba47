"""Shared problem generators and float64 references for the tests."""

from __future__ import annotations

import datetime
import math
import os
import socket
import time
import warnings

import numpy as np
import pytest
import torch

F64 = torch.float64
#: Where the Triton kernels run: the GPU when there is one, else the CPU under Triton's interpreter
#: (read when the kernels are first imported, so it must be set before any test uses them).
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if KERNEL_DEVICE.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


def simplex(k: int, gen: torch.Generator, zeros: int = 0) -> torch.Tensor:
    """Random weights on the simplex (float64); the first ``zeros`` entries set to 0."""
    w = torch.rand(k, generator=gen, dtype=F64) + 0.05
    w[:zeros] = 0
    return w / w.sum()


def clouds(n: int, m: int, d: int, gen: torch.Generator, dtype=F64, shift: float = 1.0):
    x = torch.randn(n, d, generator=gen, dtype=F64)
    y = torch.randn(m, d, generator=gen, dtype=F64) * 0.8 + shift
    return x.to(dtype), y.to(dtype)


def sqdist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared distances by explicit differences (independent of otcore's expansion)."""
    return ((x[..., :, None, :] - y[..., None, :, :]) ** 2).sum(-1)


def xlogy_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Generalised KL(p || q) = sum p log(p/q) - p + q, with 0 log 0 = 0."""
    return (torch.special.xlogy(p, p) - torch.special.xlogy(p, q) - p + q).sum()


def random_cov(d: int, gen: torch.Generator, low: float = 0.5, high: float = 2.0) -> torch.Tensor:
    """R diag(log-spaced in [low, high]) R^T with a random orthogonal R (the ENOT benchmark's recipe)."""
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    return Q @ torch.diag(torch.logspace(math.log10(low), math.log10(high), d, dtype=F64)) @ Q.T


def draw(mean: torch.Tensor, cov: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """n samples of N(mean, cov), float64."""
    return torch.randn(n, mean.shape[-1], generator=gen, dtype=F64) @ torch.linalg.cholesky(cov).T + mean


def gaussian_problem(d: int, gen: torch.Generator):
    """(m0, S0, m1, S1): random means and ``random_cov`` covariances, drawn in that order."""
    m0, S0 = torch.randn(d, generator=gen, dtype=F64), random_cov(d, gen)
    return m0, S0, torch.randn(d, generator=gen, dtype=F64), random_cov(d, gen)


def run_python_blocks(blocks: list[str], source: str) -> None:
    """Run documentation code blocks in order in one namespace, warnings as errors; blocks that
    mention "cuda" are skipped without a GPU (not all of them)."""
    namespace: dict = {"__name__": "docs"}
    skipped = []
    for k, block in enumerate(blocks):
        if "cuda" in block and not torch.cuda.is_available():
            skipped.append(k)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            exec(compile(block, f"{source} python block {k}", "exec"), namespace)  # noqa: S102
    assert len(skipped) < len(blocks), "every block was skipped"


def shard_slice(sizes: list[int], rank: int) -> slice:
    """The rows of ``rank`` when consecutive shards have the given sizes."""
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_entry(rank, world, port, timeout, fn, args):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_gloo(fn, world: int, *args, timeout: float) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned gloo processes on the CPU; fail the
    test (rather than hang CI) when they are still running after ``timeout`` seconds."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_gloo_entry, args=(world, _free_port(), timeout, fn, args), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed workers still running after {timeout} s (a hung collective?)")


@pytest.fixture
def one_thread():
    """Small batches gain nothing from threads and lose much to oversubscription on a loaded CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


# Hypothesis profiles. The default profile is not touched, so a plain run of the suite behaves as
# before (test_invariants.py sets its own max_examples and deadline). "deep" is for nightly runs
# of the fuzz campaign:
#     pytest tests/test_fuzz.py --hypothesis-profile=deep
# test_fuzz.py runs a bounded budget per test under the default profile (max_examples 100, under
# 2 minutes in all on a 2-core CPU) and multiplies it by the loaded profile's max_examples / 100
# (10 under "deep", which also shrinks failing examples).
from hypothesis import HealthCheck, settings

settings.register_profile("deep", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
