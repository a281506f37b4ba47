"""otcore.sns on sharded point clouds over 2 and 3 gloo processes (uneven shards) against one
process on the whole problem (float64): RowSharded and BothSharded with the Hessian-free Newton
systems ("dense") and the sparsified Hessian ("sparse": RowSharded assembles it from each rank's
rows of the plan, BothSharded from each rank's blocks against the column shards passing around
its ring). Checked: the value on every rank, the f and g shards up to one gauge common to every
rank, the Newton iteration count, the implicit gradient in each rank's points, and for
BothSharded "sparse" the products with its kept plan against the one process's thresholded
plan; "auto" choosing by the whole problem's sizes; the Hessian no rank holds refused on every
rank."""

import os
import sys

import pytest
import torch
from conftest import run_gloo, shard_slice, sqdist

import otcore
import otcore.distributed
from otcore.geometry import PointCloud
from otcore.solvers.entropic import scaling

TIMEOUT_S = 120
#: rows and columns of each rank, uneven (columns: BothSharded's shards of the targets)
SIZES = {2: ([13, 20], [17, 11]), 3: ([9, 14, 11], [12, 7, 9])}
#: sns's default Sinkhorn warm-up (the reference's runs in the log domain, as the shards' does)
OPTIONS = {"eps": 0.05, "tol": 1e-10, "max_iter": 200}
#: "auto" is only watched choosing: one Newton step after one Sinkhorn iteration
AUTO_OPTIONS = {"eps": 0.05, "max_iter": 2, "sinkhorn_iter": 1, "warn": False}
CLOSE = {"rtol": 0, "atol": 1e-10}


def _problem(world):
    rows, cols = SIZES[world]
    g = torch.Generator().manual_seed(world)
    x = torch.randn(sum(rows), 2, generator=g, dtype=torch.float64)
    y = torch.randn(sum(cols), 2, generator=g, dtype=torch.float64) + 0.5
    a = torch.rand(sum(rows), generator=g, dtype=torch.float64) + 0.5
    b = torch.rand(sum(cols), generator=g, dtype=torch.float64) + 0.5
    p = {"x": x, "y": y, "a": a / a.sum(), "b": b / b.sum()}
    # BothSharded's kept plan, batched (B = 2: its block-diagonal layout): other clouds and
    # potentials, vectors on both sides, and per problem a threshold halfway between two entries
    # of the plan (P by explicit differences), so that both plans keep the same entries
    p["xb"], p["yb"] = torch.stack([x, 1.5 * x.flip(0)]), torch.stack([y, 0.5 * y])
    n, m = sum(rows), sum(cols)
    for name, k in (("fb", n), ("gb", m), ("u", n), ("v", m)):
        p[name] = torch.randn(2, k, generator=g, dtype=torch.float64)
    plan = _plan(p)
    middle = plan.flatten(1).sort(dim=1).values[:, n * m // 2 - 1: n * m // 2 + 1]
    p["drop"] = middle.mean(dim=1)
    return p


def _plan(p):
    """The batched plan a_i b_j exp((f_i + g_j - C_ij)/eps) of the kept-plan check (B, n, m)."""
    logits = (p["fb"][:, :, None] + p["gb"][:, None, :] - sqdist(p["xb"], p["yb"])) / OPTIONS["eps"]
    return p["a"][:, None] * p["b"][None, :] * torch.exp(logits)


def _solve(geom_of, x, y, a, b, hessian):
    """Value, potentials, Newton iterations and the implicit gradient of the value in x and y."""
    leaves = [x.clone().requires_grad_(), y.clone().requires_grad_()]
    res = otcore.sns(geom_of(*leaves), a, b, hessian=hessian, **OPTIONS)
    grads = torch.autograd.grad(res.value, leaves)
    return {"value": res.value.detach(), "f": res.f.detach(), "g": res.g.detach(), "converged": bool(res.converged),
            "newton_iter": int(res.info["newton_iter"][0]), "grad_x": grads[0], "grad_y": grads[1]}


def _row_sharded(x, y):
    return otcore.distributed.RowSharded(PointCloud(x, y))


def _auto_choices(problems, direct_max):
    """Whether ``hessian="auto"`` took the sparse Hessian on each (geometry, a, b), with
    ``DIRECT_MAX`` set to ``direct_max``."""
    module = sys.modules["otcore.solvers.entropic.sns"]
    original, original_max, chosen = module._iterative_newton, module.DIRECT_MAX, []

    def recording(*args, **kwargs):
        chosen.append(kwargs["sparse"])
        return original(*args, **kwargs)

    module._iterative_newton, module.DIRECT_MAX = recording, direct_max
    try:
        for geom, a, b in problems:
            otcore.sns(geom, a, b, **AUTO_OPTIONS)
    finally:
        module._iterative_newton, module.DIRECT_MAX = original, original_max
    return chosen


def _kept_products(p, r, c):
    """(P v, P^T u) with this rank's shards of the batched plan of ``_plan`` (entries below ``drop``
    dropped): its rows of P v, its columns of P^T u."""
    geom = otcore.distributed.BothSharded(p["xb"][:, r], p["yb"][:, c])
    a, b = p["a"][r].expand(2, -1), p["b"][c].expand(2, -1)
    plan = geom.kept_plan(a, b, p["fb"][:, r], p["gb"][:, c], OPTIONS["eps"], p["drop"])
    return plan.matmul(p["v"][:, c]), plan.matmul(p["u"][:, r], transpose=True)


def _both_sparse(x, y, a, b):
    """``_solve`` of BothSharded with "sparse", with the share of the entries of its blocks of P
    that its kept blocks held, over every Newton step."""
    module = sys.modules["otcore.distributed.both_sharded"]
    original, counts = module.kept_entries, [0, 0]

    def recording(chunks, drop):
        K, KT = original(chunks, drop)
        counts[0] += K.values().numel()
        counts[1] += K.shape[0] * K.shape[1]  # one problem: the block's entries
        return K, KT

    module.kept_entries = recording
    try:
        out = _solve(otcore.distributed.BothSharded, x, y, a, b, "sparse")
    finally:
        module.kept_entries = original
    return {**out, "kept_share": counts[0] / counts[1]}


def _worker(rank, world, p, path):
    rows, cols = SIZES[world]
    r, c = shard_slice(rows, rank), shard_slice(cols, rank)
    x, y, a, b = p["x"][r], p["y"], p["a"][r], p["b"]
    out = {"row_" + h: _solve(_row_sharded, x, y, a, b, h) for h in ("dense", "sparse")}
    out["both_dense"] = _solve(otcore.distributed.BothSharded, x, y[c], a, b[c], "dense")
    out["both_sparse"] = _both_sparse(x, y[c], a, b[c])
    out["kept_products"] = _kept_products(p, r, c)
    row, both = (_row_sharded(x, y), a, b), (otcore.distributed.BothSharded(x, y[c]), a, b[c])
    # "auto" by the whole problem's n m min(n, m): a bound just below it (sparse, on both geometries)
    # and at it (direct: dense on shards); each rank's own sizes would give direct, hence dense, in both cases
    n, m = sum(rows), sum(cols)
    work = n * m * min(n, m)
    out["auto"] = [_auto_choices([row, both], direct_max) for direct_max in (work - 1, work)]
    errors = []
    for geom, a_k, b_k in (row, both):
        try:
            otcore.sns(geom, a_k, b_k, hessian="direct", **OPTIONS)
        except ValueError as e:
            errors.append(str(e))
    out["errors"] = errors
    torch.save(out, os.path.join(path, f"rank{rank}.pt"))


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_sns_matches_one_process(world, tmp_path, monkeypatch):
    # the reference's Sinkhorn warm-up iterates in the log domain, as the shards' does: the same path
    monkeypatch.setattr(scaling, "DENSE_BUDGET_BYTES", 0)
    p = _problem(world)
    run_gloo(_worker, world, p, str(tmp_path), timeout=TIMEOUT_S)
    rows, cols = SIZES[world]
    ranks = [torch.load(tmp_path / f"rank{k}.pt") for k in range(world)]
    wholes = {h: _solve(PointCloud, p["x"], p["y"], p["a"], p["b"], h) for h in ("dense", "sparse")}
    for kind in ("row_dense", "row_sparse", "both_dense", "both_sparse"):
        hessian = kind.split("_")[1]
        whole = wholes[hessian]
        assert whole["converged"]
        column = (lambda k: slice(None)) if kind.startswith("row") else (lambda k: shard_slice(cols, k))
        # one gauge (f + k, g - k) for every rank: the ranks' potentials are one solution
        gauge = (whole["g"][column(0)] - ranks[0][kind]["g"]).mean()
        for k, out in enumerate(ranks):
            got = out[kind]
            r = shard_slice(rows, k)
            assert got["converged"], kind
            assert got["newton_iter"] == whole["newton_iter"], kind  # the same arithmetic up to reduction order
            torch.testing.assert_close(got["value"], whole["value"], **CLOSE, msg=lambda s, q=kind: f"{q} value: {s}")
            torch.testing.assert_close(got["g"], whole["g"][column(k)] - gauge, **CLOSE,
                                       msg=lambda s, q=kind: f"{q} g: {s}")
            torch.testing.assert_close(got["f"], whole["f"][r] + gauge, **CLOSE, msg=lambda s, q=kind: f"{q} f: {s}")
            torch.testing.assert_close(got["grad_x"], whole["grad_x"][r], **CLOSE,
                                       msg=lambda s, q=kind: f"{q} grad x: {s}")
            # y: whole on every rank (RowSharded replicates it), else this rank's shard
            torch.testing.assert_close(got["grad_y"], whole["grad_y"][column(k)], **CLOSE,
                                       msg=lambda s, q=kind: f"{q} grad y: {s}")
    plan = _plan(p)
    kept = torch.where(plan >= p["drop"][:, None, None], plan, 0)
    assert 0 < int((kept > 0).sum()) < kept.numel()
    for k, out in enumerate(ranks):
        # BothSharded's Newton steps dropped most of its entries of P (they keep about 18 % here)
        assert 0 < out["both_sparse"]["kept_share"] < 0.5
        # the products of each rank's kept blocks against the whole thresholded plan's
        rows_v, columns_u = out["kept_products"]
        torch.testing.assert_close(rows_v, (kept @ p["v"][..., None])[:, shard_slice(rows, k), 0], rtol=1e-10, atol=0)
        torch.testing.assert_close(columns_u, (kept.mT @ p["u"][..., None])[:, shard_slice(cols, k), 0], rtol=1e-10,
                                   atol=0)
        # [RowSharded, BothSharded] under each bound: sparse on both below the whole size, else dense
        assert out["auto"] == [[True, True], [False, False]]
        direct_row, direct_both = out["errors"]
        assert "hessian='direct'" in direct_row and "hessian='sparse'" in direct_row
        assert "hessian='direct'" in direct_both
