"""Balanced clustering: sinkhorn_codes (SwAV/SeLa), OTKMeans and DEPICT targets, against
independent float64 references (explicit Sinkhorn loops, SwAV's kernel recipe, scikit-learn)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import otcore
from otcore.nn import OTKMeans, clustering, depict_target, sinkhorn_codes

F64 = torch.float64


def reference_codes(S: torch.Tensor, eps: float, n_iter: int, w: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 log-domain Sinkhorn on potentials, g (clusters) then f (samples), n_iter times, for
    the plan exp((S + f + g) / eps) with marginals 1/B and w; the codes are B times the plan."""
    S = S.to(F64)
    B, K = S.shape
    logw = torch.full((K,), -math.log(K), dtype=F64) if w is None else (w / w.sum()).to(F64).log()
    loga = torch.full((B,), -math.log(B), dtype=F64)
    f = torch.zeros(B, dtype=F64)
    g = torch.zeros(K, dtype=F64)
    for _ in range(n_iter):
        g = eps * (logw - torch.logsumexp((S + f[:, None]) / eps, dim=0))
        f = eps * (loga - torch.logsumexp((S + g[None, :]) / eps, dim=1))
    return B * torch.exp((S + f[:, None] + g[None, :]) / eps)


def swav_recipe(S: torch.Tensor, eps: float, n_iter: int) -> torch.Tensor:
    """SwAV's distributed_sinkhorn (kernel domain, main_swav.py) on one process, float64."""
    Q = torch.exp(S.to(F64) / eps).t()
    Q /= Q.sum()
    K, B = Q.shape
    for _ in range(n_iter):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def ari(labels_a, labels_b) -> float:
    """Adjusted Rand index (Hubert & Arabie) from the contingency table."""
    a, b = np.asarray(labels_a), np.asarray(labels_b)
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)
    pairs = lambda t: (t * (t - 1) / 2).sum()
    index, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), len(a) * (len(a) - 1) / 2
    expected = rows * cols / total
    return float((index - expected) / ((rows + cols) / 2 - expected))


def planted(gen: torch.Generator, sizes=(50, 50, 50, 50), d: int = 5, spread: float = 10.0):
    """Gaussian clusters of the given sizes around well-separated centres, and their labels."""
    centres = spread * torch.randn(len(sizes), d, generator=gen, dtype=F64)
    x = torch.cat([c + torch.randn(s, d, generator=gen, dtype=F64) for c, s in zip(centres, sizes, strict=True)])
    truth = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    perm = torch.randperm(len(truth), generator=gen)
    return x[perm], truth[perm]


# ---------------------------------------------------------------- sinkhorn_codes


def test_codes_converged_marginals_batched_and_weighted(gen):
    S = torch.randn(3, 40, 7, generator=gen, dtype=F64)
    w = torch.rand(3, 7, generator=gen, dtype=F64) + 0.1
    Q = sinkhorn_codes(S, eps=0.3, n_iter=None, tol=1e-11, cluster_weights=w)
    assert Q.shape == S.shape and Q.dtype == F64
    torch.testing.assert_close(Q.sum(-1), torch.ones(3, 40, dtype=F64), rtol=0, atol=1e-13)
    target = 40 * w / w.sum(-1, keepdim=True)
    assert float((Q.sum(-2) - target).abs().sum(-1).max()) / 40 <= 1e-11
    for i in range(3):
        torch.testing.assert_close(Q[i], reference_codes(S[i], 0.3, 5000, w[i]), rtol=1e-9, atol=1e-12)


def test_codes_balanced_when_every_sample_prefers_one_cluster(gen):
    S = 0.01 * torch.randn(64, 8, generator=gen, dtype=F64)
    S[:, 0] += 5.0  # every sample's favourite is cluster 0
    Q = sinkhorn_codes(S, eps=0.05, n_iter=None, tol=1e-9)
    torch.testing.assert_close(Q.sum(-2), torch.full((8,), 8.0, dtype=F64), rtol=0, atol=64 * 1e-9)
    torch.testing.assert_close(Q.sum(-1), torch.ones(64, dtype=F64), rtol=0, atol=1e-13)
    assert float(Q[:, 0].sum()) == pytest.approx(8.0, abs=1e-7)  # not 64: the balance overrides preferences


@pytest.mark.parametrize("n_iter", [1, 3, 10])
def test_codes_equal_explicit_log_sinkhorn(gen, n_iter):
    S = torch.randn(50, 12, generator=gen, dtype=F64)
    w = torch.rand(12, generator=gen, dtype=F64)
    torch.testing.assert_close(sinkhorn_codes(S, eps=0.2, n_iter=n_iter, cluster_weights=w),
                               reference_codes(S, 0.2, n_iter, w), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize(("scale", "eps", "exact"), [(1.0, 0.2, True), (10.0, 0.01, False)])
def test_codes_both_paths_equal_reference(gen, scale, eps, exact):
    # scores / eps spans ~50 (kernel scalings are exact) or ~5000 (beyond float64's exp: log domain)
    S = scale * torch.randn(1, 60, 9, generator=gen, dtype=F64)
    w = torch.rand(1, 1, 9, generator=gen, dtype=F64) + 0.1
    w = w / w.sum()
    scaled, _, ok = clustering._scaled_sinkhorn(S.clone(), eps=eps, w=w, n_iter=4, tol=None)
    logged, _ = clustering._log_sinkhorn(S, eps=eps, logw=w.log(), n_iter=4, tol=None)
    expected = reference_codes(S[0], eps, 4, w.flatten())
    assert bool(ok) == exact
    torch.testing.assert_close(logged[0], expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sinkhorn_codes(S[0], eps=eps, n_iter=4, cluster_weights=w.flatten()), expected,
                               rtol=1e-9, atol=1e-12)
    if exact:
        torch.testing.assert_close(scaled[0], expected, rtol=1e-9, atol=1e-12)


def test_codes_equal_swav_kernel_recipe(gen):
    z = torch.nn.functional.normalize(torch.randn(128, 16, generator=gen, dtype=F64), dim=1)
    c = torch.nn.functional.normalize(torch.randn(30, 16, generator=gen, dtype=F64), dim=1)
    S = z @ c.T  # in [-1, 1]: exp(S / 0.05) <= e^20, safe in float64
    torch.testing.assert_close(sinkhorn_codes(S, eps=0.05, n_iter=3), swav_recipe(S, 0.05, 3), rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(sinkhorn_codes(S.float(), eps=0.05, n_iter=3), swav_recipe(S, 0.05, 3).float(),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_codes_no_overflow_in_half_precision(gen, dtype):
    S = 100 * torch.rand(256, 40, generator=gen, dtype=F64)  # exp(S / eps) = e^10000
    Q = sinkhorn_codes(S.to(dtype), eps=0.01, n_iter=3)
    assert Q.dtype == dtype and bool(torch.isfinite(Q).all())
    expected = reference_codes(S.to(dtype).to(F64), 0.01, 3)
    rel_rmse = float((Q.to(F64) - expected).square().mean().sqrt() / expected.square().mean().sqrt())
    assert rel_rmse < 1e-2
    torch.testing.assert_close(Q.to(F64).sum(-1), torch.ones(256, dtype=F64), rtol=0, atol=2e-2)


def test_codes_float32_extreme_scale_converges(gen):
    S = 100 * torch.randn(100, 10, generator=gen)  # |S| / eps up to ~150: exp overflows float32
    Q = sinkhorn_codes(S, eps=2.0, n_iter=None, tol=1e-4)
    assert bool(torch.isfinite(Q).all())
    assert float((Q.double().sum(0) / 100 - 1 / 10).abs().sum()) <= 1e-4 + 1e-6
    torch.testing.assert_close(Q.double().sum(1), torch.ones(100, dtype=F64), rtol=0, atol=1e-5)


def test_codes_are_detached_targets(gen):
    S = torch.randn(20, 5, generator=gen, dtype=F64, requires_grad=True)
    Q = sinkhorn_codes(S)
    assert not Q.requires_grad and Q.grad_fn is None


@pytest.mark.parametrize("eps", [0.5, 0.002])  # kernel scalings; log domain (|S| / eps ~ 1000)
def test_codes_zero_weight_cluster(gen, eps):
    S = torch.randn(30, 4, generator=gen, dtype=F64)
    w = torch.tensor([0.5, 0.0, 0.25, 0.25], dtype=F64)
    Q = sinkhorn_codes(S, eps=eps, n_iter=20, cluster_weights=w)
    assert bool(torch.isfinite(Q).all()) and float(Q[:, 1].abs().max()) == 0.0
    torch.testing.assert_close(Q.sum(1), torch.ones(30, dtype=F64), rtol=0, atol=1e-13)
    torch.testing.assert_close(Q, reference_codes(S, eps, 20, w), rtol=1e-9, atol=1e-12)
    if eps == 0.5:
        Q = sinkhorn_codes(S, eps=eps, n_iter=None, tol=1e-10, cluster_weights=w)
        torch.testing.assert_close(Q.sum(0), 30 * w, rtol=0, atol=30 * 1e-10)


def test_codes_warn_when_tol_not_met(gen):
    S = 3 * torch.randn(40, 6, generator=gen, dtype=F64)
    with pytest.warns(otcore.ConvergenceWarning, match="sinkhorn_codes"):
        sinkhorn_codes(S, eps=0.05, n_iter=2, tol=1e-12)


# ---------------------------------------------------------------- OTKMeans


def test_ari_helper_by_hand():
    # contingency [[2, 0, 0], [0, 1, 1]]: index 1, rows 2, cols 1, total 6 -> (1 - 1/3) / (3/2 - 1/3) = 4/7
    assert ari([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7, abs=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_otkmeans_recovers_planted_balanced_clusters(gen, dtype):
    x, truth = planted(gen)
    km = OTKMeans(4, seed=0).fit(x.to(dtype))
    labels = km.labels_
    assert labels.dtype == torch.int64 and km.cluster_centers_.dtype == dtype
    assert ari(truth, labels) >= 0.95
    assert labels.bincount(minlength=4).tolist() == [50, 50, 50, 50]
    centres = torch.stack([x[labels == k].mean(0) for k in range(4)])  # float64 means of the labelled clusters
    torch.testing.assert_close(km.cluster_centers_.to(F64), centres, rtol=1e-5, atol=1e-5)
    assert km.inertia_ == pytest.approx(float((x - centres[labels]).square().sum()), rel=1e-5)


def test_otkmeans_against_scikit_learn(gen):
    sklearn = pytest.importorskip("sklearn")
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    x, truth = planted(gen, sizes=(60, 60, 60))
    ours = OTKMeans(3, seed=1).fit_predict(x.numpy())
    assert isinstance(ours, np.ndarray)
    theirs = KMeans(3, n_init=10, random_state=0).fit_predict(x.numpy())
    assert ari(truth, ours) == pytest.approx(adjusted_rand_score(truth, ours), abs=1e-12)
    assert adjusted_rand_score(theirs, ours) >= 0.95 and adjusted_rand_score(truth, ours) >= 0.95
    assert np.bincount(ours).tolist() == [60, 60, 60]
    assert sklearn is not None


def test_otkmeans_balances_imbalanced_data(gen):
    x, _ = planted(gen, sizes=(90, 30, 30, 53))  # 203 points: 4 clusters of 50 or 51
    sizes = np.bincount(OTKMeans(4, seed=0).fit(x.numpy()).labels_, minlength=4)
    assert sorted(sizes.tolist()) == [50, 51, 51, 51]


def test_otkmeans_cluster_weights(gen):
    x, truth = planted(gen, sizes=(100, 50, 50))
    km = OTKMeans(3, seed=2, cluster_weights=torch.tensor([0.5, 0.25, 0.25])).fit(x)
    assert km.labels_.bincount().tolist() == [100, 50, 50]
    assert ari(truth, km.labels_) >= 0.95


def test_otkmeans_predict_is_nearest_centroid(gen):
    x, _ = planted(gen)
    km = OTKMeans(4, seed=0).fit(x)
    new = torch.randn(30, 5, generator=gen, dtype=F64) * 5
    expected = ((new[:, None, :] - km.cluster_centers_[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(km.predict(new), expected)
    assert np.array_equal(km.predict(new.numpy()), expected.numpy())


def test_otkmeans_seeded_and_leaves_global_rng(gen):
    x, _ = planted(gen)
    state = torch.get_rng_state()
    a = OTKMeans(4, seed=5).fit(x).labels_
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(OTKMeans(4, seed=5).fit(x).labels_, a)


def test_otkmeans_warns_at_max_iter(gen):
    x = torch.randn(60, 3, generator=gen, dtype=F64)
    with pytest.warns(otcore.ConvergenceWarning, match="OTKMeans"):
        km = OTKMeans(3, max_iter=1, tol=1e-12, seed=0).fit(x)
    assert not km.converged_ and km.labels_.bincount().tolist() == [20, 20, 20]


# ---------------------------------------------------------------- DEPICT


@pytest.mark.parametrize("normalisation", ["paper", "code"])
def test_depict_target(gen, normalisation):
    p = torch.softmax(torch.randn(2, 30, 6, generator=gen, dtype=F64), -1)
    t = depict_target(p.float(), normalisation=normalisation)
    expected = torch.empty_like(p)
    for g in range(2):
        for i in range(30):
            for k in range(6):
                freq = sum(float(p[g, j, k]) for j in range(30))
                expected[g, i, k] = p[g, i, k] / math.sqrt(freq) if normalisation == "paper" else p[g, i, k] ** 2 / freq
            expected[g, i] /= expected[g, i].sum()
    assert t.dtype == torch.float32
    torch.testing.assert_close(t.double(), expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"scores": torch.randn(3)}, "scores"),
    ({"scores": torch.zeros(0, 4)}, "scores"),
    ({"scores": torch.tensor([[1.0, float("nan")]])}, "scores"),
    ({"scores": torch.ones(3, 4, dtype=torch.int64)}, "scores"),
    ({"eps": 0.0}, "eps"),
    ({"eps": float("inf")}, "eps"),
    ({"n_iter": 0}, "n_iter"),
    ({"n_iter": 2.5}, "n_iter"),
    ({"tol": -1.0}, "tol"),
    ({"cluster_weights": torch.ones(5)}, "cluster_weights"),
    ({"cluster_weights": torch.tensor([1.0, -1.0, 1.0, 1.0])}, "cluster_weights"),
    ({"cluster_weights": torch.zeros(4)}, "cluster_weights"),
    ({"group": object()}, "group must be None, 'default' or a torch.distributed ProcessGroup"),
    ({"group": "world"}, "group must be None"),
])
def test_codes_bad_inputs(kwargs, name):
    args = {"scores": torch.randn(3, 4), **kwargs}
    with pytest.raises(ValueError, match=name):
        sinkhorn_codes(args.pop("scores"), **args)


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"n_clusters": 0}, "n_clusters"),
    ({"n_clusters": 2, "eps": -1.0}, "eps"),
    ({"n_clusters": 2, "max_iter": 0}, "max_iter"),
    ({"n_clusters": 2, "tol": float("nan")}, "tol"),
    ({"n_clusters": 2, "cluster_weights": [1.0, 2.0, 3.0]}, "cluster_weights"),
    ({"n_clusters": 2, "seed": 1.5}, "seed"),
])
def test_otkmeans_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        OTKMeans(**kwargs)


@pytest.mark.parametrize("X", [torch.randn(2, 3), torch.randn(10), torch.ones(10, 2, dtype=torch.int64),
                               torch.tensor([[0.0, float("inf")]] * 5), "points"])
def test_otkmeans_bad_data(X):
    with pytest.raises(ValueError, match="X"):
        OTKMeans(3).fit(X)
    with pytest.raises(ValueError, match="fit"):
        OTKMeans(3).predict(torch.randn(4, 2))


def test_depict_bad_inputs():
    with pytest.raises(ValueError, match="normalisation"):
        depict_target(torch.rand(4, 3), normalisation="dec")
    with pytest.raises(ValueError, match="q"):
        depict_target(-torch.rand(4, 3))
    with pytest.raises(ValueError, match="q"):
        depict_target(torch.rand(4))
