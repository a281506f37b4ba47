"""Every bad input raises a ValueError naming the argument."""

import pytest
import torch
from conftest import F64

import otcore

C = torch.rand(4, 3, dtype=F64)
U4, U3 = torch.full((4,), 0.25, dtype=F64), torch.full((3,), 1 / 3, dtype=F64)


@pytest.mark.parametrize("solver", [
    lambda c, a, b, **kw: otcore.sinkhorn(c, a, b, eps=kw.get("eps", 0.1)),
    lambda c, a, b, **kw: otcore.emd(c, a, b),
])
@pytest.mark.parametrize("a,b,match", [
    (torch.tensor([0.5, 0.5, 0.5, -0.5], dtype=F64), U3, "a"),
    (U4, torch.tensor([0.5, float("nan"), 0.5], dtype=F64), "b"),
    (U4, torch.tensor([0.5, float("inf"), 0.5], dtype=F64), "b"),
    (torch.full((5,), 0.2, dtype=F64), U3, "a"),
    (U4, torch.full((2,), 0.5, dtype=F64), "b"),
    (U4, 2 * U3, "mass"),
    (torch.zeros(4, dtype=F64), U3, "a"),
])
@pytest.mark.parametrize("numpy_entries", [0, 2**20])  # the checks' reductions on torch / on NumPy
def test_bad_weights(monkeypatch, solver, a, b, match, numpy_entries):
    from otcore import _arrays

    monkeypatch.setattr(_arrays, "NUMPY_REDUCTION_ENTRIES", numpy_entries)
    with pytest.raises(ValueError, match=match):
        solver(C, a, b)


def test_weights_are_checked_in_the_dtype_they_are_computed_in():
    """A float64 weight beyond float32's range, for a float32 cost, would be inf in the solve: it
    is refused, naming the weight and the dtype; the same values in float64 are accepted."""
    weights = torch.tensor([1e39, 1.0, 1.0, 1.0], dtype=F64)
    with pytest.raises(ValueError, match=r"a holds 1 non-finite value\(s\) \(NaN or inf\) in torch.float32"):
        otcore.sinkhorn(C.float(), weights, None, eps=0.1, tau_a=0.5)
    assert otcore.sinkhorn(C, weights, None, eps=0.1, tau_a=0.5, max_iter=5, warn=False).f.isfinite().all()


def test_joint_weight_check_names_each_weight():
    """``check_weight_values`` reads several weights at once: each error names its own weight,
    whatever the batch sizes of the others, and an empty one is refused unless it is a shard."""
    from otcore._validation import check_weight_values

    good = torch.full((3, 4), 0.25, dtype=F64)
    bad = torch.tensor([[0.5, 0.5], [0.5, -0.5]], dtype=F64)
    with pytest.raises(ValueError, match="b has negative entries"):
        check_weight_values([("a", good, good.sum(-1)), ("b", bad, bad.sum(-1))])
    zero_mass = torch.tensor([[0.5, 0.5], [0.0, 0.0]], dtype=F64)
    with pytest.raises(ValueError, match="b has zero total mass"):
        check_weight_values([("a", good, good.sum(-1)), ("b", zero_mass, zero_mass.sum(-1))])
    empty = torch.zeros(3, 0, dtype=F64)
    with pytest.raises(ValueError, match="b has zero total mass"):
        check_weight_values([("a", good, good.sum(-1)), ("b", empty, empty.sum(-1))])
    check_weight_values([("a", good, good.sum(-1)), ("b", empty, empty.sum(-1))], shard=True)


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        otcore.sinkhorn(C, eps=eps)


def test_bad_options():
    with pytest.raises(ValueError, match="grad"):
        otcore.sinkhorn(C, eps=0.1, grad="magic")
    with pytest.raises(ValueError, match="tau_a"):
        otcore.sinkhorn(C, eps=0.1, tau_a=1.5)
    with pytest.raises(ValueError, match="tol"):
        otcore.sinkhorn(C, eps=0.1, tol=-1)
    with pytest.raises(ValueError, match="max_iter"):
        otcore.sinkhorn(C, eps=0.1, max_iter=0)
    with pytest.raises(ValueError, match="eps_scaling"):
        otcore.sinkhorn(C, eps=0.1, eps_scaling=1.5)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="check_every"):
            otcore.sinkhorn(C, eps=0.1, check_every=bad)
        with pytest.raises(ValueError, match="check_every"):
            otcore.sinkhorn_divergence(torch.rand(4, 2), torch.rand(3, 2), eps=0.1, check_every=bad)
    with pytest.raises(ValueError, match="max_iter"):
        otcore.sinkhorn(C, eps=0.1, max_iter=1.5)


def test_bad_costs_and_points():
    with pytest.raises(ValueError, match="C"):
        otcore.sinkhorn(torch.tensor([[0.0, float("nan")], [1.0, 0.0]]), eps=0.1)
    with pytest.raises(ValueError, match="dimension"):
        otcore.sinkhorn_divergence(torch.zeros(3, 2), torch.zeros(3, 3), eps=0.1)
    with pytest.raises(ValueError, match="y"):
        otcore.sinkhorn_divergence(torch.zeros(3, 2), torch.tensor([[float("nan"), 0.0]]), eps=0.1)
    with pytest.raises(ValueError, match="batch"):
        otcore.sinkhorn(torch.rand(2, 4, 3), torch.rand(3, 4).softmax(-1), eps=0.1)


def test_unequal_masses_are_fine_when_unbalanced():
    res = otcore.sinkhorn(C, U4, 2 * U3, eps=0.1, tau_a=0.9, tau_b=0.9)
    assert bool(res.converged)


def test_mass_tolerance_scales_with_dtype():
    b32 = U3.float() * (1 + 1e-6)  # within float32 rounding of a sum
    otcore.sinkhorn(C.float(), U4.float(), b32, eps=0.1)
    with pytest.raises(ValueError, match="mass"):
        otcore.sinkhorn(C, U4, U3 * (1 + 1e-6), eps=0.1)


@pytest.mark.parametrize("name,value", [
    ("eps", "0.1"), ("eps", True), ("eps", None), ("eps", 1j),
    ("tau_a", "x"), ("tau_a", None), ("tau_b", float("nan")),
    ("max_iter", None), ("max_iter", "10"), ("max_iter", True),
    ("tol", "1e-3"), ("tol", float("nan")),
    ("implicit_rtol", -1e-6), ("implicit_rtol", 0.0), ("implicit_max_iter", -1), ("implicit_max_iter", None),
    ("eps_scaling", "0.5"),
])
def test_bad_numbers_name_the_argument(name, value):
    kwargs = {"eps": 0.1, name: value}
    with pytest.raises(ValueError, match=name):
        otcore.sinkhorn(C, **kwargs)


def test_bad_numbers_in_other_solvers():
    with pytest.raises(ValueError, match="cg_rtol"):
        otcore.sns(C, eps=0.1, cg_rtol=-1e-3)
    with pytest.raises(ValueError, match="max_iter"):
        otcore.emd(C, max_iter=-1)
    with pytest.raises(ValueError, match="eps"):
        otcore.sinkhorn_divergence(torch.rand(4, 2), torch.rand(3, 2), eps="0.1")
    with pytest.raises(ValueError, match="tol"):
        otcore.sinkhorn_divergence(torch.rand(4, 2), torch.rand(3, 2), eps=0.1, tol=-1)


@pytest.mark.parametrize("a,match", [
    (torch.tensor([1, 1, 1, 1]), "a"),
    (torch.full((4,), 0.25, dtype=torch.complex128), "a"),
])
def test_weights_must_be_real_floats(a, match):
    with pytest.raises(ValueError, match=match):
        otcore.sinkhorn(C, a, eps=0.1)


@pytest.mark.parametrize("init,match", [
    (torch.zeros(4), "init"),
    ((torch.zeros(4),), "init"),
    ((torch.zeros(3, 4, dtype=F64), torch.zeros(3, 3, dtype=F64)), r"init\[0\]"),
    ((torch.zeros(4, dtype=F64), [0.0, 0.0, 0.0]), r"init\[1\]"),
    ((torch.zeros(4, dtype=F64), torch.zeros(3, dtype=torch.int64)), r"init\[1\]"),
])
def test_bad_init(init, match):
    with pytest.raises(ValueError, match=match):
        otcore.sinkhorn(C, eps=0.1, init=init)


def test_batched_init_must_match_the_batch():
    Cb = torch.rand(2, 4, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"init\[0\]"):
        otcore.sinkhorn(Cb, eps=0.1, init=(torch.zeros(3, 4, dtype=F64), torch.zeros(2, 3, dtype=F64)))
    otcore.sinkhorn(Cb, eps=0.1, init=(torch.zeros(1, 4, dtype=F64), torch.zeros(2, 3, dtype=F64)))


def test_points_need_a_dimension():
    with pytest.raises(ValueError, match="x"):
        otcore.PointCloud(torch.zeros(4, 0), torch.zeros(3, 0))


def test_mass_tolerance_follows_the_weights_precision():
    """Weights rounded to their own dtype are accepted whatever dtype the problem computes in."""
    a, b = torch.full((3,), 1 / 3, dtype=torch.bfloat16), torch.full((7,), 1 / 7, dtype=torch.bfloat16)
    assert (a.double().sum() - b.double().sum()).abs() > 1e-3  # far beyond float32 rounding
    res = otcore.sinkhorn(torch.rand(3, 7), a, b, eps=0.1)
    assert bool(res.converged) and float(res.marginal_error) < 1e-4  # b rescaled to the mass of a
    a32 = torch.rand(1000).float()
    a32 = a32 / a32.sum()
    b32 = torch.full((5,), 0.2)
    otcore.sinkhorn(torch.rand(1000, 5, dtype=F64), a32, b32, eps=0.5)  # float32 weights on a float64 cost
    with pytest.raises(ValueError, match="mass"):
        otcore.sinkhorn(torch.rand(3, 7), a=torch.full((3,), 1 / 3, dtype=torch.bfloat16),
                        b=torch.full((7,), 1.1 / 7, dtype=torch.bfloat16), eps=0.1)


def test_apply_refuses_to_downcast():
    res = otcore.sinkhorn(C.float(), eps=0.1)
    with pytest.raises(ValueError, match="v has dtype"):
        res.apply(torch.rand(3, dtype=F64))
    with pytest.raises(ValueError, match="v must be"):
        res.apply(torch.ones(3, dtype=torch.int64))
    half = res.apply(torch.rand(3).half())  # widening is exact
    assert half.dtype == torch.float32
