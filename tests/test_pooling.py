"""GSP pooling: against the paper's fixed-point iteration written here in float64 plain torch,
autograd through that iteration, closed forms (mu = 1 is average pooling) and brute force."""

from __future__ import annotations

import pytest
import torch

from otcore.nn import GSPPooling, gsp_pool, k_center, zsr_loss

F64 = torch.float64


def unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.pow(2).sum(-1, keepdim=True).sqrt()


def reference_plan(x: torch.Tensor, protos: torch.Tensor, mu: float, eps: float, iters: int):
    """The paper's fixed point (u_i = (1/n)/(1 + v a_i), v = mu / sum_i u_i a_i, from v = mu), in
    the log domain, differentiable by autograd through the iterations. x (B, n, C), protos (K, C).

    Returns pi (B, n, K) and rho (B, n)."""
    diff = unit(x)[:, :, None, :] - unit(protos)[None, None, :, :]
    cost = diff.pow(2).sum(-1).sqrt()  # (B, n, K)
    log_kernel = -cost / eps
    log_a = torch.logsumexp(log_kernel, dim=-1)  # (B, n)
    n = x.shape[1]
    log_v = torch.full((x.shape[0], 1), float(torch.log(torch.tensor(mu, dtype=F64))), dtype=F64)
    for _ in range(iters):
        log_u = -torch.log(torch.tensor(float(n), dtype=F64)) - torch.logaddexp(torch.zeros_like(log_a), log_v + log_a)
        log_v = torch.log(torch.tensor(mu, dtype=F64)) - torch.logsumexp(log_u + log_a, dim=-1, keepdim=True)
    log_u = -torch.log(torch.tensor(float(n), dtype=F64)) - torch.logaddexp(torch.zeros_like(log_a), log_v + log_a)
    pi = torch.exp(log_v[..., None] + log_kernel + log_u[..., None])
    return pi, log_u.exp()


def reference_pool(x, protos, mu, eps, iters):
    """(pooled (B, C), weights (B, n), histogram (B, K)) from the reference plan."""
    pi, rho = reference_plan(x, protos, mu, eps, iters)
    n = x.shape[1]
    weights = (1 - n * rho) / mu
    return (weights[..., None] * x).mean(1), weights, pi.sum(1) / mu


def problem(gen, B=3, n=12, C=5, K=4, dtype=F64, scale=1.0):
    x = (torch.randn(B, n, C, generator=gen, dtype=F64) * scale).to(dtype)
    p = torch.randn(K, C, generator=gen, dtype=F64).to(dtype)
    return x, p


@pytest.mark.parametrize("layout", ["maps", "sets"])
def test_ratio_one_is_average_pooling(gen, layout):
    maps = torch.randn(3, 6, 4, 5, generator=gen, dtype=F64)
    protos = torch.randn(7, 6, generator=gen, dtype=F64)
    features = maps if layout == "maps" else maps.flatten(2).mT
    out = GSPPooling(6, 7, transport_ratio=1.0).to(F64)
    with torch.no_grad():
        out.prototypes.copy_(protos)
    pooled = out(features)
    torch.testing.assert_close(pooled, maps.mean(dim=(2, 3)), rtol=0, atol=1e-6)
    # everything is transported: pi_ik = (1/n) softmax_k(-C_ik / eps)
    cost = (unit(maps.flatten(2).mT)[:, :, None] - unit(protos)).pow(2).sum(-1).sqrt()
    hist = torch.softmax(-cost / 0.05, dim=-1).mean(1)
    torch.testing.assert_close(out.last_histogram, hist, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("mu", "eps"), [(0.3, 0.2), (0.5, 0.05), (0.8, 1.0)])
def test_matches_paper_fixed_point(gen, mu, eps):
    x, p = problem(gen)
    res = gsp_pool(x, p, transport_ratio=mu, eps=eps, n_iter=50)
    pooled, weights, hist = reference_pool(x, p, mu, eps, 3000)
    torch.testing.assert_close(res.pooled, pooled, rtol=0, atol=1e-10)
    torch.testing.assert_close(res.weights, weights, rtol=0, atol=1e-10)
    torch.testing.assert_close(res.histogram, hist, rtol=0, atol=1e-10)
    torch.testing.assert_close(hist.sum(-1), torch.ones(3, dtype=F64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("eps", [0.2, 1e-3])
def test_constraint_residual_vanishes(gen, eps):
    x, p = problem(gen, n=30)
    errors = []
    for n_iter in (1, 2, 4, 30, 200):  # 200: the iterate stays at the root
        res = gsp_pool(x, p, transport_ratio=0.3, eps=eps, n_iter=n_iter)
        # transported mass sum_ik pi_ik = (mu / n) sum_i w_i must equal mu; rows hold by construction
        independent = (0.3 * res.weights.mean(-1) - 0.3).abs()
        torch.testing.assert_close(res.constraint_error, independent, rtol=0, atol=1e-15)
        errors.append(float(independent.max()))
    assert errors[0] > 1e-6
    assert errors[-1] < 1e-13
    assert errors[-1] < errors[1] <= errors[0] + 1e-15


def test_implicit_gradient_equals_autograd_through_iterations(gen):
    x, p = problem(gen, B=2, n=10, C=4, K=3)
    x.requires_grad_(True)
    p.requires_grad_(True)
    up = torch.randn(2, 4, generator=gen, dtype=F64)
    uh = torch.randn(2, 3, generator=gen, dtype=F64)

    res = gsp_pool(x, p, transport_ratio=0.3, eps=0.3, n_iter=50)
    ours = torch.autograd.grad((res.pooled * up).sum() + (res.histogram * uh).sum(), (x, p))
    pooled, _, hist = reference_pool(x, p, 0.3, 0.3, 2000)
    theirs = torch.autograd.grad((pooled * up).sum() + (hist * uh).sum(), (x, p))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_gradcheck_float64(gen):
    maps = torch.randn(2, 4, 3, 3, generator=gen, dtype=F64, requires_grad=True)
    protos = torch.randn(3, 4, generator=gen, dtype=F64, requires_grad=True)

    def fn(f, q):
        res = gsp_pool(f, q, transport_ratio=0.3, eps=0.2, n_iter=40)
        return res.pooled, res.histogram

    assert torch.autograd.gradcheck(fn, (maps, protos), eps=1e-6, atol=1e-7)


def test_layouts_agree(gen):
    maps = torch.randn(2, 5, 3, 4, generator=gen, dtype=F64)
    protos = torch.randn(6, 5, generator=gen, dtype=F64)
    a = gsp_pool(maps, protos, transport_ratio=0.3)
    b = gsp_pool(maps.permute(0, 2, 3, 1).reshape(2, 12, 5), protos, transport_ratio=0.3)
    for u, v in ((a.pooled, b.pooled), (a.weights, b.weights), (a.histogram, b.histogram)):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-14)


def test_bf16_large_features_no_nan(gen):
    x, p = problem(gen, B=4, n=49, C=16, K=8, scale=1e3)
    xh = x.to(torch.bfloat16).requires_grad_(True)
    ph = p.to(torch.bfloat16).requires_grad_(True)
    res = gsp_pool(xh, ph, transport_ratio=0.3, eps=0.05)
    assert res.pooled.dtype == torch.bfloat16
    (res.pooled.float().sum() + res.histogram.float().pow(2).sum()).backward()
    for t in (res.pooled, res.histogram, xh.grad, ph.grad):
        assert bool(torch.isfinite(t).all())
    exact = gsp_pool(xh.detach().double(), ph.detach().double(), transport_ratio=0.3, eps=0.05)
    rel = (res.pooled.double() - exact.pooled).norm() / exact.pooled.norm()
    assert rel < 2e-2


def test_float32_features_whose_squares_overflow(gen):
    x, p = problem(gen, B=2, n=9, C=6, K=4)
    huge = gsp_pool((x * 1e30).float(), (p * 1e30).float(), transport_ratio=0.3, eps=0.1)
    exact = gsp_pool(x, p, transport_ratio=0.3, eps=0.1)
    torch.testing.assert_close(huge.weights.double(), exact.weights, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(huge.pooled.double() / 1e30, exact.pooled, rtol=1e-4, atol=1e-5)


def test_small_eps_float32_finite(gen):
    x, p = problem(gen, B=2, n=20, C=6, K=5, dtype=torch.float32, scale=50.0)
    x.requires_grad_(True)
    res = gsp_pool(x, p, transport_ratio=0.3, eps=1e-4)
    res.pooled.sum().backward()
    assert bool(torch.isfinite(res.pooled).all()) and bool(torch.isfinite(x.grad).all())
    assert float(res.constraint_error.max()) < 1e-5


def test_k_center_is_farthest_point_sequence(gen):
    vectors = torch.randn(40, 6, generator=gen, dtype=F64)
    chosen = [0]
    for _ in range(9):
        best, best_d = None, -1.0
        for i in range(40):
            d = min(float(torch.linalg.vector_norm(vectors[i] - vectors[j])) for j in chosen)
            if d > best_d:
                best, best_d = i, d
        chosen.append(best)
    assert k_center(vectors, 10).tolist() == chosen
    layer = GSPPooling(6, 10).to(F64)
    idx = layer.init_prototypes(vectors)
    assert idx.tolist() == chosen
    torch.testing.assert_close(layer.prototypes.data, vectors[chosen], rtol=0, atol=0)


def test_zsr_loss_matches_formula(gen):
    hist = torch.softmax(torch.randn(8, 5, generator=gen, dtype=F64), -1).requires_grad_(True)
    labels = torch.tensor([0, 2, 1, 2, 3, 0, 1, 3])
    emb = torch.randn(4, 3, generator=gen, dtype=F64)
    loss = zsr_loss(hist, labels, emb, ridge=0.05, scale=9.5)

    total = torch.zeros((), dtype=F64)
    halves = [list(range(4)), list(range(4, 8))]
    for fit, pred in (halves, halves[::-1]):
        Xa, Ya = hist[fit], emb[labels[fit]]
        W = Xa.T @ torch.linalg.inv(Xa @ Xa.T + 0.05 * torch.eye(4, dtype=F64)) @ Ya
        for i in pred:
            scores = 9.5 * emb @ (hist[i] @ W)
            total = total - (scores[labels[i]] - torch.log(torch.exp(scores).sum()))
    torch.testing.assert_close(loss, total / 8, rtol=1e-12, atol=0)
    g_ours = torch.autograd.grad(loss, hist, retain_graph=True)[0]
    g_ref = torch.autograd.grad(total / 8, hist)[0]
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)


def test_module_forward_and_histogram(gen):
    layer = GSPPooling(8, n_prototypes=5)
    maps = torch.randn(3, 8, 4, 4, generator=gen)
    out = layer(maps)
    assert out.shape == (3, 8) and out.dtype == torch.float32
    assert layer.last_histogram.shape == (3, 5)
    torch.testing.assert_close(layer.last_histogram.sum(-1), torch.ones(3), rtol=0, atol=5e-5)
    out.sum().backward()
    assert layer.prototypes.grad is not None and bool(layer.prototypes.grad.abs().sum() > 0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"transport_ratio": 0.0}, "transport_ratio"),
        ({"transport_ratio": 1.5}, "transport_ratio"),
        ({"transport_ratio": "a"}, "transport_ratio"),
        ({"eps": 0.0}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"n_iter": 0}, "n_iter"),
        ({"n_iter": 2.5}, "n_iter"),
    ],
)
def test_bad_options(kwargs, name):
    x, p = torch.randn(2, 5, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match=name):
        gsp_pool(x, p, **kwargs)
    with pytest.raises(ValueError, match=name):
        GSPPooling(3, 4, **kwargs)


def test_bad_tensors():
    p = torch.randn(4, 3)
    with pytest.raises(ValueError, match="features"):
        gsp_pool(torch.randn(2, 3), p)
    with pytest.raises(ValueError, match="features"):
        gsp_pool(torch.tensor([[[float("nan"), 0.0, 1.0]]]), p)
    with pytest.raises(ValueError, match="features"):
        gsp_pool(torch.zeros(2, 0, 3), p)
    with pytest.raises(ValueError, match="prototypes"):
        gsp_pool(torch.randn(2, 5, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="prototypes"):
        gsp_pool(torch.randn(2, 5, 3), torch.tensor([[0.0, float("inf"), 1.0]]))
    with pytest.raises(ValueError, match="in_channels"):
        GSPPooling(0)
    with pytest.raises(ValueError, match="n_prototypes"):
        GSPPooling(3, n_prototypes=0)
    with pytest.raises(ValueError, match="k"):
        k_center(torch.randn(3, 2), 4)
    with pytest.raises(ValueError, match="vectors"):
        GSPPooling(3, 2).init_prototypes(torch.randn(5, 4))
    hist, emb = torch.rand(4, 3), torch.randn(2, 5)
    with pytest.raises(ValueError, match="labels"):
        zsr_loss(hist, torch.tensor([0, 1, 2, 0]), emb)
    with pytest.raises(ValueError, match="histograms"):
        zsr_loss(torch.rand(1, 3), torch.tensor([0]), emb)
    with pytest.raises(ValueError, match="ridge"):
        zsr_loss(hist, torch.tensor([0, 1, 1, 0]), emb, ridge=0)
