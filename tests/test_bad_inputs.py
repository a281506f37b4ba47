"""Bad-input campaign: every public solver, every option, a catalogue of bad values.

Each case passes one bad value to one argument of ``sinkhorn``, ``sns``, ``sinkhorn_divergence``
or ``emd`` (everything else valid) and checks the contract: a ``ValueError`` whose message names
the argument, raised before any solver work (the geometry's primitives are patched to fail if
they are reached first). The catalogue is small enough to run whole.
"""

from __future__ import annotations

import math

import pytest
import torch

import otcore
from otcore.geometry.base import Geometry

N, M = 5, 4

#: Values no numeric option accepts (None, the default of some, is added where it is not).
NOT_NUMBERS = ["0.1", True, 1 + 2j, [0.1], torch.tensor([0.1, 0.2])]
NON_FINITE = [math.nan, math.inf, -math.inf]

#: (solvers, argument, bad values): numeric options and their domains.
OPTIONS = [
    (("sinkhorn", "sns", "divergence"), "eps", [*NOT_NUMBERS, None, *NON_FINITE, 0.0, -0.1]),
    (("sinkhorn", "sns", "divergence"), "tol", [*NOT_NUMBERS, math.nan, -1e-3]),
    (("sinkhorn", "sns", "divergence", "emd"), "max_iter", [*NOT_NUMBERS, None, -1, math.nan]),
    (("sinkhorn",), "tau_a", [*NOT_NUMBERS, None, *NON_FINITE, 0.0, -0.5, 1.5]),
    (("sinkhorn",), "tau_b", [*NOT_NUMBERS, None, *NON_FINITE, 0.0, -0.5, 1.5]),
    (("sinkhorn", "divergence"), "check_every", [*NOT_NUMBERS, 0, -1]),
    (("sinkhorn", "divergence"), "eps_scaling", ["0.5", True, 0.0, 1.0, 1.5, -0.5, math.nan]),
    (("sinkhorn",), "implicit_rtol", [*NOT_NUMBERS, 0.0, -1e-6, math.nan]),
    (("sinkhorn",), "implicit_max_iter", [*NOT_NUMBERS, None, -1]),
    (("sns",), "cg_rtol", [*NOT_NUMBERS, 0.0, -1e-6, math.nan]),
    (("sns",), "sinkhorn_iter", [*NOT_NUMBERS, None, -1]),
    (("sinkhorn", "sns", "divergence"), "grad", ["implicitt", None, 3]),
    (("sns",), "hessian", ["sparsee", None]),
]


def _weights_catalogue(k: int) -> list[object]:
    good = torch.full((k,), 1.0 / k, dtype=torch.float64)
    negative = good.clone()
    negative[0] = -0.1
    nan = good.clone()
    nan[0] = math.nan
    return [
        negative, nan, torch.zeros(k, dtype=torch.float64), good[:-1], good.reshape(1, 1, k),
        torch.ones(k, dtype=torch.int64), good.to(torch.complex128), good.tolist(), "uniform",
    ]


def _call(solver: str, **overrides):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 2, generator=gen, dtype=torch.float64)
    y = torch.randn(M, 2, generator=gen, dtype=torch.float64)
    kwargs = {"eps": 0.5} if solver != "emd" else {}
    a, b = overrides.pop("a", None), overrides.pop("b", None)
    kwargs.update(overrides)
    if solver == "divergence":
        return otcore.sinkhorn_divergence(x, y, a, b, **kwargs)
    fn = {"sinkhorn": otcore.sinkhorn, "sns": otcore.sns, "emd": otcore.emd}[solver]
    return fn(otcore.PointCloud(x, y), a, b, **kwargs)


def _no_solver_work(*args, **kwargs):
    raise AssertionError("a solver reached the geometry before validating its inputs")


def _cases():
    for solvers, name, values in OPTIONS:
        for solver in solvers:
            for value in values:
                yield solver, name, value
    for solver in ("sinkhorn", "sns", "divergence", "emd"):
        for name, k in (("a", N), ("b", M)):
            for value in _weights_catalogue(k):
                yield solver, name, value


CASES = list(_cases())


@pytest.mark.parametrize(("solver", "name", "value"), CASES,
                         ids=[f"{s}-{n}-{i}" for i, (s, n, _) in enumerate(CASES)])
def test_every_bad_input_is_a_value_error_naming_its_argument(monkeypatch, solver, name, value):
    for primitive in ("softmin", "kernel_apply", "kernel_cost", "materialize"):
        monkeypatch.setattr(Geometry, primitive, _no_solver_work)
    with pytest.raises(ValueError, match=rf"^{name}\b"):  # the message opens with the argument
        _call(solver, **{name: value})


def test_the_catalogue_calls_are_valid_without_the_bad_value():
    """The baseline of every draw solves (so a ValueError can only come from the bad value)."""
    for solver in ("sinkhorn", "sns", "divergence", "emd"):
        out = _call(solver)
        value = out if torch.is_tensor(out) else out.value
        assert bool(torch.isfinite(value))
