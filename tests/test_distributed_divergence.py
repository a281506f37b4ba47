"""sinkhorn_divergence on RowSharded and BothSharded point clouds over 2 and 3 gloo processes
against one process on the whole clouds (float64): the value on every rank and the gradients in
each rank's points and weights. The clouds sit far from the origin, so that each rank's
``PointCloud`` centres its points differently (the self-transport problems must share a frame)."""

import os

import pytest
import torch
from conftest import run_gloo, shard_slice

import otcore
import otcore.distributed
from otcore.geometry import PointCloud
from otcore.solvers.entropic import scaling

TIMEOUT_S = 90
OPTIONS = {"eps": 0.4, "tol": 1e-12, "max_iter": 5000}
CLOSE = {"rtol": 0, "atol": 1e-10}


def _problem(rows, cols):
    g = torch.Generator().manual_seed(len(rows))
    n, m = sum(rows), sum(cols)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64) + 30.0
    y = torch.randn(m, 2, generator=g, dtype=torch.float64) + 30.5
    a = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    b = torch.rand(m, generator=g, dtype=torch.float64) + 0.5
    return {"x": x, "y": y, "a": a / a.sum() * 1.2, "b": b / b.sum()}


def _value_and_gradients(make_geom, x, y, a, b, rho):
    leaves = [t.clone().requires_grad_() for t in (x, y, a, b)]
    scale = 1.0 if rho is not None else 1 / 1.2  # balanced problems need equal masses
    value = otcore.sinkhorn_divergence(make_geom(leaves[0], leaves[1]), a=leaves[2] * scale, b=leaves[3], rho=rho,
                                       **OPTIONS)
    return value.detach(), torch.autograd.grad(value, leaves)


def _worker(rank, world, rows, cols, p, path):
    r, c = shard_slice(rows, rank), shard_slice(cols, rank)
    out = {}
    for rho in (None, 0.8):
        out["row", rho] = _value_and_gradients(
            lambda x, y: otcore.distributed.RowSharded(PointCloud(x, y)), p["x"][r], p["y"], p["a"][r], p["b"], rho)
        out["both", rho] = _value_and_gradients(
            otcore.distributed.BothSharded, p["x"][r], p["y"][c], p["a"][r], p["b"][c], rho)
    torch.save(out, os.path.join(path, f"rank{rank}.pt"))


@pytest.mark.parametrize(("rows", "cols"), [([4, 7], [6, 3]), ([2, 5, 4], [3, 1, 5])])
def test_sharded_divergence_matches_one_process(rows, cols, tmp_path, monkeypatch):
    # the reference iterates in the log domain, as the shards do: the same path, so the same gauge of
    # the cross potential f, which the gradient in a is (balanced: defined up to a constant)
    monkeypatch.setattr(scaling, "DENSE_BUDGET_BYTES", 0)
    p = _problem(rows, cols)
    run_gloo(_worker, len(rows), rows, cols, p, str(tmp_path), timeout=TIMEOUT_S)
    ranks = [torch.load(tmp_path / f"rank{k}.pt") for k in range(len(rows))]
    for rho in (None, 0.8):
        value, (gx, gy, ga, gb) = _value_and_gradients(PointCloud, p["x"], p["y"], p["a"], p["b"], rho)
        assert float(value) > 0.1
        for k, out in enumerate(ranks):
            r, c = shard_slice(rows, k), shard_slice(cols, k)
            for kind, y_part in (("row", slice(None)), ("both", c)):
                got_value, (gx_k, gy_k, ga_k, gb_k) = out[kind, rho]
                torch.testing.assert_close(got_value, value, **CLOSE)
                torch.testing.assert_close(gx_k, gx[r], **CLOSE)
                torch.testing.assert_close(ga_k, ga[r], **CLOSE)
                torch.testing.assert_close(gy_k, gy[y_part], **CLOSE)
                torch.testing.assert_close(gb_k, gb[y_part], **CLOSE)
