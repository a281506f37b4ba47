"""Sharded solves where a rank's own data would otherwise decide a branch: unbalanced problems
(the translation and the tame-plan test take maxima over every rank's points), default weights
(1/n over every rank's points), bad weights on one rank, a non-finite iterate on one rank and the
float32 re-judgement in float64 when only one rank's potentials are large. Every rank must take
the same branches (no hang) and give one process's answer (float64, 2 gloo processes)."""

import os

import torch
from conftest import run_gloo, shard_slice

import otcore
import otcore.distributed
from otcore.geometry import CostMatrix, PointCloud

TIMEOUT_S = 90
ROWS, COLS = [3, 6], [5, 2]
CLOSE = {"rtol": 0, "atol": 1e-10}
UNBALANCED = {"eps": 0.3, "rho_a": 0.7, "rho_b": 1.2, "tol": 1e-12, "max_iter": 5000}


def _problem():
    g = torch.Generator().manual_seed(7)
    n, m = sum(ROWS), sum(COLS)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = torch.randn(m, 2, generator=g, dtype=torch.float64) + 0.5
    a = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    b = torch.rand(m, generator=g, dtype=torch.float64) + 0.5
    return {"x": x, "y": y, "a": a / a.sum() * 1.5, "b": b / b.sum()}


def _worker(rank, world, p, path):
    rows, cols = shard_slice(ROWS, rank), shard_slice(COLS, rank)
    x, y, a, b = p["x"][rows], p["y"][cols], p["a"][rows], p["b"][cols]
    out = {}
    row_sharded = otcore.distributed.RowSharded(PointCloud(x, p["y"]))
    both = otcore.distributed.BothSharded(x, y)
    for name, geom, b_here in (("row", row_sharded, p["b"]), ("both", both, b)):
        res = otcore.sinkhorn(geom, a, b_here, **UNBALANCED)
        out[f"{name}_unbalanced"] = (res.value, res.f, res.g)
        # an iterate cut short: potentials far from the optimum, the translation at work
        out[f"{name}_cut_short"] = otcore.sinkhorn(geom, a, b_here, **{**UNBALANCED, "max_iter": 2, "tol": 0.0}).value
    res = otcore.sinkhorn(both, eps=0.5, tol=1e-12)
    out["uniform"] = (res.value, res.f, res.g)
    errors = []
    negative = a.clone()
    if rank == 1:
        negative[0] = -1.0
    try:  # only rank 1's weights are bad: every rank raises
        otcore.sinkhorn(row_sharded, negative, p["b"], eps=0.5)
    except ValueError as e:
        errors.append(str(e))
    out["errors"] = errors
    # a cost row of +inf on rank 1 only, unchecked: the iterates go non-finite there alone
    cost = torch.cdist(x, p["y"]) ** 2
    if rank == 1:
        cost[0] = float("inf")
    out["nonfinite"] = otcore.sinkhorn(otcore.distributed.RowSharded(CostMatrix(cost, validate=False)), eps=0.5,
                                       validate=False, tol=1e-9, max_iter=50, warn=False).converged
    # float32 with large potentials on rank 0's rows only: the float64 re-judgement runs on all
    cost32 = (torch.cdist(x, p["y"]) ** 2 + (60.0 if rank == 0 else 0.0)).float()
    res32 = otcore.sinkhorn(otcore.distributed.RowSharded(CostMatrix(cost32)), a.float() / 1.5, p["b"].float(),
                            eps=0.05, tol=1e-4, max_iter=3000)
    out["float32"] = (res32.value, res32.n_iter, res32.converged, "error_float64" in res32.info)
    torch.save(out, os.path.join(path, f"rank{rank}.pt"))


def test_ranks_agree_where_their_data_differ(tmp_path):
    p = _problem()
    run_gloo(_worker, 2, p, str(tmp_path), timeout=TIMEOUT_S)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    whole = otcore.sinkhorn(PointCloud(p["x"], p["y"]), p["a"], p["b"], **UNBALANCED)
    cut_short = otcore.sinkhorn(PointCloud(p["x"], p["y"]), p["a"], p["b"], **{**UNBALANCED, "max_iter": 2,
                                                                               "tol": 0.0}).value
    uniform = otcore.sinkhorn(PointCloud(p["x"], p["y"]), eps=0.5, tol=1e-12)
    cost32 = torch.cdist(p["x"], p["y"]) ** 2
    cost32[shard_slice(ROWS, 0)] += 60.0
    whole32 = otcore.sinkhorn(cost32.float(), p["a"].float() / 1.5, p["b"].float(), eps=0.05, tol=1e-4,
                              max_iter=3000)
    for rank, r in enumerate(ranks):
        rows, cols = shard_slice(ROWS, rank), shard_slice(COLS, rank)
        for name, g_slice in (("row", slice(None)), ("both", cols)):
            value, f, g = r[f"{name}_unbalanced"]  # unbalanced: no gauge freedom
            torch.testing.assert_close(value, whole.value, **CLOSE)
            torch.testing.assert_close(f, whole.f[rows], **CLOSE)
            torch.testing.assert_close(g, whole.g[g_slice], **CLOSE)
            torch.testing.assert_close(r[f"{name}_cut_short"], cut_short, **CLOSE)
        value, f, g = r["uniform"]
        torch.testing.assert_close(value, uniform.value, **CLOSE)
        gauge = (uniform.g[cols] - g).mean()
        torch.testing.assert_close(f, uniform.f[rows] + gauge, **CLOSE)
        (error,) = r["errors"]
        assert "a has negative entries" in error if rank == 1 else "another process" in error
        assert not bool(r["nonfinite"])
        value32, n_iter32, converged32, judged = r["float32"]
        assert judged and bool(converged32)  # rank 1's potentials alone would not have asked
        assert int(n_iter32) == int(ranks[0]["float32"][1])
        torch.testing.assert_close(value32, whole32.value, rtol=1e-5, atol=0)
