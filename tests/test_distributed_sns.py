"""otcore.sns on RowSharded and BothSharded point clouds over 2 gloo processes (Hessian-free
Newton: plan products and CG's dot products reduced across the ranks) against one process
(float64): value, potentials up to the common gauge, the implicit gradient in each rank's points;
the Hessians that need the whole plan are refused on every rank."""

import os

import torch
from conftest import run_gloo, shard_slice

import otcore
import otcore.distributed
from otcore.geometry import PointCloud

TIMEOUT_S = 90
ROWS, COLS = [5, 8], [7, 4]
OPTIONS = {"eps": 0.05, "tol": 1e-10, "max_iter": 200}
CLOSE = {"rtol": 0, "atol": 1e-9}


def _problem():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(sum(ROWS), 2, generator=g, dtype=torch.float64)
    y = torch.randn(sum(COLS), 2, generator=g, dtype=torch.float64) + 0.5
    return {"x": x, "y": y}


def _solve(geom_of, x, y):
    leaf = x.clone().requires_grad_()
    res = otcore.sns(geom_of(leaf, y), **OPTIONS)
    (grad,) = torch.autograd.grad(res.value, leaf)
    return res.value.detach(), res.f.detach(), res.g.detach(), bool(res.converged), grad


def _worker(rank, world, p, path):
    r, c = shard_slice(ROWS, rank), shard_slice(COLS, rank)
    out = {"row": _solve(lambda x, y: otcore.distributed.RowSharded(PointCloud(x, y)), p["x"][r], p["y"]),
           "both": _solve(otcore.distributed.BothSharded, p["x"][r], p["y"][c])}
    errors = []
    for hessian in ("direct", "sparse"):
        try:
            otcore.sns(otcore.distributed.BothSharded(p["x"][r], p["y"][c]), hessian=hessian, **OPTIONS)
        except ValueError as e:
            errors.append(str(e))
    out["errors"] = errors
    torch.save(out, os.path.join(path, f"rank{rank}.pt"))


def test_sharded_sns_matches_one_process(tmp_path):
    p = _problem()
    run_gloo(_worker, 2, p, str(tmp_path), timeout=TIMEOUT_S)
    value, f, g, converged, grad = _solve(PointCloud, p["x"], p["y"])
    assert converged
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        r, c = shard_slice(ROWS, rank), shard_slice(COLS, rank)
        for kind, cols in (("row", slice(None)), ("both", c)):
            value_k, f_k, g_k, converged_k, grad_k = out[kind]
            assert converged_k
            torch.testing.assert_close(value_k, value, **CLOSE)
            gauge = (g[cols] - g_k).mean()
            torch.testing.assert_close(g_k, g[cols] - gauge, **CLOSE)
            torch.testing.assert_close(f_k, f[r] + gauge, **CLOSE)
            torch.testing.assert_close(grad_k, grad[r], **CLOSE)
        assert len(out["errors"]) == 2 and all("hessian='dense'" in e for e in out["errors"])
