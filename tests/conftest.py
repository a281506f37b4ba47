"""Shared problem generators and float64 references for the tests."""

from __future__ import annotations

import os

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
