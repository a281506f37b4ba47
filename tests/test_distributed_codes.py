"""otcore.nn.sinkhorn_codes(group=...): the codes of the ranks' concatenated batches over 2 and 3
gloo processes on the CPU, against one process on the concatenation and an independent float64
log-domain Sinkhorn-Knopp (SwAV's order: columns, then rows)."""

import math
import os

import pytest
import torch
import torch.distributed as dist
from conftest import run_gloo, shard_slice

from otcore.nn import clustering, sinkhorn_codes

F64 = torch.float64
K = 7
TIMEOUT_S = 60  # a hung collective fails the test after this long
CLOSE = {"rtol": 0, "atol": 1e-12}


def _cases(sizes):
    """name -> (scores of all ranks (G, B, K) or (B, K), sinkhorn_codes keyword arguments)."""
    g = torch.Generator().manual_seed(len(sizes))
    B = sum(sizes)
    z = torch.nn.functional.normalize(torch.randn(B, 5, generator=g, dtype=F64), dim=1)
    c = torch.nn.functional.normalize(torch.randn(K, 5, generator=g, dtype=F64), dim=1)
    w = torch.rand(K, generator=g, dtype=F64) + 0.2
    w0 = w.clone()
    w0[2] = 0  # an empty cluster: an all-zero column (-inf in the log domain)
    spread = torch.randn(B, K, generator=g, dtype=F64)
    # one sample of the last rank far below the rest: exp(scores / eps - column max) < e^-400
    # underflows there only, so only that rank's local checks fail
    low = spread.clone()
    low[-1] = -80.0
    return {
        "swav": (z @ c.T, {"eps": 0.05, "n_iter": 3}),
        "tol": (spread, {"eps": 0.5, "n_iter": None, "tol": 1e-10, "cluster_weights": w}),
        "batched": (torch.randn(2, B, K, generator=g, dtype=F64), {"eps": 0.3, "n_iter": 3,
                                                                   "cluster_weights": torch.stack([w, w0])}),
        "fallback": (low, {"eps": 0.2, "n_iter": 3, "cluster_weights": w0}),
        "fallback_tol": (low, {"eps": 0.2, "n_iter": 200, "tol": 1e-9}),
    }


def _worker(rank, world, sizes, path):
    rows = shard_slice(sizes, rank)
    out = {}
    for name, (scores, kwargs) in _cases(sizes).items():
        out[name] = sinkhorn_codes(scores[..., rows, :], group="default", **kwargs)
    # the path decision of the fallback case, as every rank saw it
    S = _cases(sizes)["fallback"][0][rows].unsqueeze(0)
    w = torch.full((1, 1, K), 1.0 / K, dtype=F64)
    _, _, exact = clustering._scaled_sinkhorn(S, eps=0.2, w=w, n_iter=3, tol=None,
                                              ranks=clustering._Ranks(None, sum(sizes)))
    out["exact"] = bool(exact)
    scores = _cases(sizes)["swav"][0][rows]
    bad = {  # one rank's arguments differ (or are rejected): every rank must raise
        "K": (scores[:, :-1] if rank == 0 else scores, {}),
        "dtype": (scores.float() if rank == world - 1 else scores, {}),
        "nan": (torch.full_like(scores, math.nan) if rank == 1 else scores, {}),
        "n_iter": (scores, {"n_iter": 3 + rank}),
        "tol": (scores, {"tol": 1e-6 if rank == 0 else None}),
        "weights": (scores, {"cluster_weights": torch.arange(1.0, K + 1, dtype=F64) ** (rank == 1)}),
        "eps": (scores, {"eps": 0.05 * (1 + rank)}),
    }
    errors = {}
    for name, (s, kwargs) in bad.items():
        try:
            sinkhorn_codes(s, group=dist.group.WORLD if name == "eps" else "default", **kwargs)
        except ValueError as e:
            errors[name] = str(e)
    out["errors"] = errors
    out["after"] = sinkhorn_codes(scores, eps=0.05, group="default")  # no collective left dangling
    torch.save(out, os.path.join(path, f"rank{rank}.pt"))


def _reference(S, eps, n_iter, tol=None, cluster_weights=None):
    """Float64 log-domain Sinkhorn-Knopp in SwAV's order on (B, K) or (G, B, K) scores: columns
    normalised to B w (zero-weight columns to 0), then rows to 1; with ``tol``, stop once |Q^T 1 / B - w|_1 <= tol."""
    L = S.to(F64) / eps
    B, K_ = L.shape[-2:]
    w = torch.full((K_,), 1.0 / K_, dtype=F64) if cluster_weights is None else cluster_weights.to(F64)
    w = (w / w.sum(-1, keepdim=True)).unsqueeze(-2)
    for _ in range(n_iter or clustering.CODES_MAX_ITER):
        L = torch.where(w > 0, L - torch.logsumexp(L, dim=-2, keepdim=True) + (B * w).log(), -math.inf)
        L = L - torch.logsumexp(L, dim=-1, keepdim=True)
        if tol is not None and float((L.exp().sum(-2, keepdim=True) / B - w).abs().sum(-1).max()) <= tol:
            break
    return L.exp()


@pytest.mark.parametrize("sizes", [[5, 9], [3, 8, 6]])
def test_distributed_codes_match_one_process(sizes, tmp_path):
    run_gloo(_worker, len(sizes), sizes, str(tmp_path), timeout=TIMEOUT_S)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(len(sizes))]
    for name, (scores, kwargs) in _cases(sizes).items():
        whole = sinkhorn_codes(scores, **kwargs)
        codes = torch.cat([r[name] for r in ranks], dim=-2)
        assert codes.dtype == F64 and codes.shape == scores.shape
        torch.testing.assert_close(codes, whole, **CLOSE, msg=lambda s, n=name: f"{n}: {s}")
        want = _reference(scores, kwargs["eps"], kwargs["n_iter"], kwargs.get("tol"), kwargs.get("cluster_weights"))
        torch.testing.assert_close(codes, want, rtol=0, atol=1e-10, msg=lambda s, n=name: f"{n} vs reference: {s}")
        if kwargs.get("tol") is not None:  # converged on the concatenation, not per rank
            w = kwargs.get("cluster_weights")
            w = torch.full((K,), 1.0 / K, dtype=F64) if w is None else w / w.sum()
            assert float((codes.sum(0) / sum(sizes) - w).abs().sum()) <= kwargs["tol"]
    # the fallback was decided for all: the last rank's underflow sends every rank to the log
    # domain, although the other ranks' samples alone would stay in the kernel scalings
    assert [r["exact"] for r in ranks] == [False] * len(sizes)
    first = _cases(sizes)["fallback"][0][shard_slice(sizes, 0)].unsqueeze(0)
    assert bool(clustering._scaled_sinkhorn(first, eps=0.2, w=torch.full((1, 1, K), 1.0 / K, dtype=F64), n_iter=3,
                                            tol=None)[2])
    for rank, r in enumerate(ranks):
        e = r["errors"]
        assert set(e) == {"K", "dtype", "nan", "n_iter", "tol", "weights", "eps"}, f"rank {rank} did not raise"
        assert "number of clusters K" in e["K"] and "[6, 7" in e["K"]
        assert "dtype" in e["dtype"] and "torch.float32" in e["dtype"]
        assert ("non-finite" in e["nan"]) if rank == 1 else ("rank(s) [1]" in e["nan"])
        assert "n_iter" in e["n_iter"] and "tol" in e["tol"] and "eps" in e["eps"]
        assert e["weights"].startswith("cluster_weights")
    torch.testing.assert_close(torch.cat([r["after"] for r in ranks]), sinkhorn_codes(_cases(sizes)["swav"][0], eps=0.05),
                               **CLOSE)


def test_distributed_codes_need_an_initialised_group():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="group: torch.distributed is not initialised"):
        sinkhorn_codes(torch.randn(4, 3), group="default")
    with pytest.raises(ValueError, match="group must be None, 'default' or a torch.distributed ProcessGroup"):
        sinkhorn_codes(torch.randn(4, 3), group=0)
