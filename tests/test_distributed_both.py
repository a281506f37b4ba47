"""otcore.distributed.BothSharded: Sinkhorn with both point clouds sharded over 2 and 3 gloo
processes on the CPU (uneven shards) against one process solving the whole problem in float64."""

import os

import pytest
import torch
import torch.distributed as dist
from conftest import run_gloo, shard_slice

import otcore
import otcore.distributed
from otcore.geometry import PointCloud

EPS = 0.5
SOLVE = {"eps": EPS, "tol": 1e-12, "max_iter": 5000, "domain": "log"}  # shards iterate in the log domain
TIMEOUT_S = 90  # a hung collective or transfer fails the test after this long
GRAD_MODES = ("implicit", "unroll", "envelope")
CLOSE = {"rtol": 0, "atol": 1e-10}


def _problem(rows, columns):
    """Points far from the origin against their spread (so that a point cloud centres them: the
    ranks must share one frame), weights and two test vectors."""
    g = torch.Generator().manual_seed(len(rows))
    n, m, d = sum(rows), sum(columns), 3
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + 40.0
    y = torch.randn(m, d, generator=g, dtype=torch.float64) + 40.5
    a = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    b = torch.rand(m, generator=g, dtype=torch.float64) + 0.5
    return {"x": x, "y": y, "a": a / a.sum(), "b": b / b.sum(), "c": torch.randn(n, generator=g, dtype=torch.float64),
            "d": torch.randn(m, generator=g, dtype=torch.float64)}


def _solves(geom, p, rows, cols):
    """Everything the test compares, for the sharded geometry (rows, cols: this rank's) or the
    whole problem's (slices of everything)."""
    a, b, c, d = p["a"][rows], p["b"][cols], p["c"][rows], p["d"][cols]
    out = {"cost_range": geom.cost_range(), "max_cost": geom.max_cost(), "mean_cost": geom.mean_cost()}
    with torch.no_grad():
        res = otcore.sinkhorn(geom, a, b, **SOLVE)
    out.update(value=res.value, f=res.f, g=res.g, n_iter=res.n_iter, transport_cost=res.transport_cost,
               marginal_error=res.marginal_error, apply=res.apply(d), apply_T=res.apply(c, transpose=True))
    for mode in GRAD_MODES:
        leaves = [t.detach().clone().requires_grad_() for t in (geom.tensors[0][0], geom.tensors[1][0], a, b)]
        solved = otcore.sinkhorn(geom.with_tensors(leaves[0][None], leaves[1][None]), leaves[2], leaves[3],
                                 grad=mode, **SOLVE)
        out[f"grad_value_{mode}"] = torch.autograd.grad(solved.value, leaves, retain_graph=mode == "implicit")
        if mode == "implicit":  # losses on the potentials and the plan: the adjoint CG and kernel_cost's ring
            loss = geom.total((c * solved.f)[None], 0)[0] + geom.total((d * solved.g)[None], 1)[0]
            out["grad_potentials"] = torch.autograd.grad(loss + solved.transport_cost, leaves)
    return out


def _errors(rank, rows, cols, p):
    """The messages of the ValueErrors every rank must raise (none may hang)."""
    geom = otcore.distributed.BothSharded(p["x"][rows], p["y"][cols])
    x, y = p["x"][rows], p["y"][cols]
    bad = [
        lambda: otcore.sinkhorn(geom, p["a"][rows], p["b"][cols], **{**SOLVE, "domain": "scaling"}),
        lambda: otcore.sinkhorn(geom, p["a"][rows], p["b"][cols], **SOLVE).plan,
        lambda: otcore.distributed.BothSharded(x[:, : 2 + min(rank, 1)], y[:, : 2 + min(rank, 1)]),  # d differs
        lambda: otcore.distributed.BothSharded(x.float() if rank == 0 else x, y.float() if rank == 0 else y),
        lambda: otcore.distributed.BothSharded(x, y if rank != 1 else torch.full_like(y, float("nan"))),
        lambda: otcore.sparse_ot(geom, k=2),
    ]
    errors = []
    for call in bad:
        with pytest.raises(ValueError) as info:
            call()
        errors.append(str(info.value))
    return errors


def _worker(rank, world, rows_by_rank, cols_by_rank, p, path):
    rows, cols = shard_slice(rows_by_rank, rank), shard_slice(cols_by_rank, rank)
    out = _solves(otcore.distributed.BothSharded(p["x"][rows], p["y"][cols]), p, rows, cols)
    out["errors"] = _errors(rank, rows, cols, p)
    torch.save(out, os.path.join(path, f"rank{rank}.pt"))


@pytest.mark.parametrize(("rows", "cols"), [([4, 7], [6, 3]), ([2, 5, 4], [3, 1, 5])])
def test_both_sharded_sinkhorn_matches_one_process(rows, cols, tmp_path):
    p = _problem(rows, cols)
    run_gloo(_worker, len(rows), rows, cols, p, str(tmp_path), timeout=TIMEOUT_S)
    whole = _solves(PointCloud(p["x"], p["y"]), p, slice(None), slice(None))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(len(rows))]
    gauge = (torch.cat([r["g"] for r in ranks]) - whole["g"]).mean()
    sharded = {  # the ranks' shards, concatenated
        "f": (torch.cat([r["f"] for r in ranks]), whole["f"] - gauge),
        "g": (torch.cat([r["g"] for r in ranks]), whole["g"] + gauge),
        "apply": (torch.cat([r["apply"] for r in ranks]), whole["apply"]),
        "apply_T": (torch.cat([r["apply_T"] for r in ranks]), whole["apply_T"]),
    }
    for key in [f"grad_value_{mode}" for mode in GRAD_MODES] + ["grad_potentials"]:
        for k, name in enumerate("xyab"):  # x, a: by rows; y, b: by columns
            sharded[f"{key} {name}"] = (torch.cat([r[key][k] for r in ranks]), whole[key][k])
    for key, (got, want) in sharded.items():
        torch.testing.assert_close(got, want, **CLOSE, msg=lambda s, k=key: f"{k}: {s}")
    for rank, r in enumerate(ranks):  # global on every rank
        for key in ("value", "transport_cost", "marginal_error", "max_cost", "mean_cost"):
            torch.testing.assert_close(r[key], whole[key], **CLOSE, msg=lambda s, k=key: f"{k}: {s}")
        assert r["cost_range"] == pytest.approx(whole["cost_range"], rel=1e-12)
        assert int(r["n_iter"]) == int(ranks[0]["n_iter"])  # every rank stopped at the same iteration
        scaling, plan, dimension, dtype, invalid, other = r["errors"]
        assert "sharded" in scaling
        assert "no whole row" in plan
        assert "dimension d" in dimension and "x, y" in dimension
        assert "dtype" in dtype
        assert ("y holds" in invalid and "non-finite" in invalid) if rank == 1 else "rank(s) [1]" in invalid
        assert "runs only in otcore.sinkhorn" in other


def test_both_sharded_needs_an_initialised_group():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="group: torch.distributed is not initialised"):
        otcore.distributed.BothSharded(torch.randn(3, 2), torch.randn(4, 2))
