"""otcore.distributed.RowSharded: sharded Sinkhorn over 2 and 3 gloo processes on the CPU
against one process solving the whole problem in float64 (log domain)."""

import os

import pytest
import torch
import torch.distributed as dist
from conftest import run_gloo, shard_slice

import otcore
import otcore.distributed
from otcore.geometry import CostMatrix, PointCloud

EPS = 0.5
SOLVE = {"eps": EPS, "tol": 1e-12, "max_iter": 5000, "domain": "log"}  # shards iterate in the log domain
TIMEOUT_S = 90  # a hung collective fails the test after this long
GRAD_MODES = ("implicit", "unroll", "envelope")


def _problem(sizes):
    g = torch.Generator().manual_seed(len(sizes))
    n, m, d = sum(sizes), 9, 3
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(m, d, generator=g, dtype=torch.float64) + 0.5
    a = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    b = torch.rand(m, generator=g, dtype=torch.float64) + 0.5
    return {"x": x, "y": y, "a": a / a.sum(), "b": b / b.sum(), "c": torch.randn(n, generator=g, dtype=torch.float64),
            "d": torch.randn(m, generator=g, dtype=torch.float64)}


def _solves(geom, a, b, p, rows):
    """Value, potentials and gradients of the solves the test compares (sharded or whole)."""
    out = {}
    with torch.no_grad():
        res = otcore.sinkhorn(geom, a, b, **SOLVE)
    out["value"], out["f"], out["g"], out["n_iter"] = res.value, res.f, res.g, res.n_iter
    out["transport_cost"], out["marginal_error"] = res.transport_cost, res.marginal_error
    out["apply_T"] = res.apply(p["c"][rows].unsqueeze(-1), transpose=True)
    for mode in GRAD_MODES:
        x, y = geom.inner.x if geom.sharded else geom.x, geom.inner.y if geom.sharded else geom.y
        leaves = [t.detach().clone().requires_grad_() for t in (x[0], y[0], a, b)]
        solved = otcore.sinkhorn(geom.with_tensors(leaves[0][None], leaves[1][None]), leaves[2], leaves[3],
                                 grad=mode, **SOLVE)
        out[f"grad_value_{mode}"] = torch.autograd.grad(solved.value, leaves)
        if mode == "implicit":  # a loss on both potentials: the adjoint CG across ranks
            loss = geom.total((p["c"][rows] * solved.f)[None], 0)[0] + (p["d"] * solved.g).sum()
            out["grad_potentials"] = torch.autograd.grad(loss, leaves[:2])
    return out


def _worker(rank, world, sizes, p, path):
    rows = shard_slice(sizes, rank)
    geom = otcore.distributed.RowSharded(PointCloud(p["x"][rows], p["y"]))
    out = _solves(geom, p["a"][rows], p["b"], p, rows)
    cost = torch.cdist(p["x"][rows], p["y"]) ** 2
    out["cost_matrix_value"] = otcore.sinkhorn(otcore.distributed.RowSharded(CostMatrix(cost)), p["a"][rows], p["b"],
                                               **SOLVE).value
    errors = []
    try:
        otcore.sinkhorn(geom, p["a"][rows], p["b"], **{**SOLVE, "domain": "scaling"})
    except ValueError as e:
        errors.append(str(e))
    for bad in ({"y": p["y"][: 5 + rank]}, {"dtype": torch.float32 if rank == 0 else torch.float64}):
        y = bad.get("y", p["y"]).to(bad.get("dtype", torch.float64))
        try:
            otcore.distributed.RowSharded(PointCloud(p["x"][rows].to(y.dtype), y))
        except ValueError as e:
            errors.append(str(e))
    for other in (lambda: otcore.emd(geom),
                  lambda: otcore.sparse_ot(geom, k=2)):  # solvers that would sum over this rank alone
        try:
            other()
        except ValueError as e:
            errors.append(str(e))
    out["errors"] = errors
    torch.save(out, os.path.join(path, f"rank{rank}.pt"))


@pytest.mark.parametrize("sizes", [[4, 7], [2, 5, 4]])
def test_row_sharded_sinkhorn_matches_one_process(sizes, tmp_path):
    p = _problem(sizes)
    run_gloo(_worker, len(sizes), sizes, p, str(tmp_path), timeout=TIMEOUT_S)
    whole = _solves(PointCloud(p["x"], p["y"]), p["a"], p["b"], p, slice(None))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(len(sizes))]
    close = {"rtol": 0, "atol": 1e-10}
    f = torch.cat([r["f"] for r in ranks])
    gauge = (whole["g"] - ranks[0]["g"]).mean()
    torch.testing.assert_close(f, whole["f"] + gauge, **close)
    for rank, r in enumerate(ranks):
        rows = shard_slice(sizes, rank)
        # global on every rank: value, plan statistics and plan products over the rows
        for key in ("value", "transport_cost", "marginal_error", "apply_T", "cost_matrix_value"):
            torch.testing.assert_close(r[key], whole[key if key != "cost_matrix_value" else "value"], **close)
        torch.testing.assert_close(r["g"], whole["g"] - gauge, **close)
        assert int(r["n_iter"]) == int(ranks[0]["n_iter"])  # every rank stopped at the same iteration
        for key in [f"grad_value_{mode}" for mode in GRAD_MODES] + ["grad_potentials"]:
            # x and a: this rank's slice; y and b: the whole gradient on every rank
            want = whole[key]
            got = r[key]
            torch.testing.assert_close(got[0], want[0][rows], **close, msg=lambda s, k=key: f"{k} x: {s}")
            torch.testing.assert_close(got[1], want[1], **close, msg=lambda s, k=key: f"{k} y: {s}")
            if len(got) == 4:
                torch.testing.assert_close(got[2], want[2][rows], **close, msg=lambda s, k=key: f"{k} a: {s}")
                torch.testing.assert_close(got[3], want[3], **close, msg=lambda s, k=key: f"{k} b: {s}")
        scaling, columns, dtype, *others = r["errors"]
        assert len(others) == 2 and all("runs only in otcore.sinkhorn" in e for e in others)
        assert "sharded" in scaling
        assert "number of columns m" in columns and "geom" in columns
        assert "dtype" in dtype


def test_row_sharded_needs_an_initialised_group():
    assert not dist.is_initialized()
    geom = PointCloud(torch.randn(3, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="group: torch.distributed is not initialised"):
        otcore.distributed.RowSharded(geom)
    with pytest.raises(ValueError, match="geom must be a PointCloud or a CostMatrix"):
        otcore.distributed.RowSharded(torch.randn(3, 4))
    with pytest.raises(ValueError, match="not initialised"):
        otcore.distributed.shard(torch.randn(3, 2))


SIGNED_SIZES = [3, 6, 4]


def _signed_cost(x, y):
    """-<x, y>, a callable cost of either sign: (B, r, d), (B, L, d) -> (B, r, L)."""
    return -(x @ y.mT)


def _signed_problem():
    """Each rank's sources about a centre of its own on the line through (1, 1), the targets about
    (1, 1): every rank's costs span less than the whole problem's range, whose ends lie on
    different ranks (the first rank's costs > 0, the last's < 0)."""
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(k, 2, generator=g, dtype=torch.float64) * 0.2 + 2.0 * (r - 1)
                   for r, k in enumerate(SIGNED_SIZES)])
    y = torch.randn(8, 2, generator=g, dtype=torch.float64) * 0.2 + 1.0
    return {"x": x, "y": y}


def _signed_worker(rank, world, p, eps, path):
    rows = shard_slice(SIGNED_SIZES, rank)
    geom = otcore.distributed.RowSharded(PointCloud(p["x"][rows], p["y"], cost=_signed_cost))
    out = {"cost_range": geom.cost_range(), "value": otcore.sinkhorn(geom, **{**SOLVE, "eps": eps}).value}
    torch.save(out, os.path.join(path, f"rank{rank}.pt"))


def test_row_sharded_cost_range_of_a_signed_callable_cost(tmp_path):
    """``cost_range`` is max C - min C over every rank's rows, as one process computes it, where
    each rank's own range is smaller; the solve at an eps between the two agrees with one process."""
    p = _signed_problem()
    whole = PointCloud(p["x"], p["y"], cost=_signed_cost)
    C = _signed_cost(p["x"][None], p["y"][None])[0]
    true_range = float(C.max() - C.min())
    largest_local = max(float(C[shard_slice(SIGNED_SIZES, r)].max() - C[shard_slice(SIGNED_SIZES, r)].min())
                        for r in range(len(SIGNED_SIZES)))
    assert C.min() < 0 < C.max() and largest_local < 0.5 * true_range  # a per-rank range would be wrong
    eps = 0.75 * true_range  # above every rank's own range, below the whole one: the softmins' path differs
    run_gloo(_signed_worker, len(SIGNED_SIZES), p, eps, str(tmp_path), timeout=TIMEOUT_S)
    value = otcore.sinkhorn(whole, **{**SOLVE, "eps": eps}).value
    assert whole.cost_range() == true_range
    for rank in range(len(SIGNED_SIZES)):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out["cost_range"] == true_range
        torch.testing.assert_close(out["value"], value, rtol=0, atol=1e-10)
