"""MoE routers (otcore.nn: topk_route, sinkhorn_route, sparse_route, MoE) against loop references.

References written here: the GShard capacity step as a Python loop, a float64 log-domain
Sinkhorn in NumPy/SciPy, top-k softmax gating by ``torch.topk``, and an MoE layer evaluated
token by token.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import torch

import otcore
from otcore.nn import MoE, SinkhornRouter, SparseOTRouter, TopKRouter, sinkhorn_route, sparse_route, topk_route

F64 = torch.float64
ROUTES = {"topk": topk_route, "sinkhorn": sinkhorn_route, "sparse": sparse_route}


def random_logits(T: int, E: int, gen: torch.Generator, *, adversarial: bool = False, scale: float = 1.0):
    """(T, E) float64 logits; adversarial: every token prefers expert 0 by a wide margin."""
    L = torch.randn(T, E, generator=gen, dtype=F64)
    if adversarial:
        L[:, 0] += 4.0
    return L * scale


def reference_dispatch(scores: torch.Tensor, top_k: int, capacity: int, *, skip_zero: bool):
    """GShard's capacity step as a loop: first choices first, tokens in order; -1 when full."""
    T, E = scores.shape
    top, index = torch.topk(scores, top_k, dim=-1)
    expert, position = torch.full((T, top_k), -1), torch.full((T, top_k), -1)
    count = [0] * E
    for k in range(top_k):
        for t in range(T):
            e = int(index[t, k])
            if (skip_zero and top[t, k] <= 0) or count[e] >= capacity:
                continue
            expert[t, k], position[t, k] = e, count[e]
            count[e] += 1
    return expert, position, torch.tensor(count)


def reference_sinkhorn(L: np.ndarray, eps: float, n_iter: int) -> np.ndarray:
    """Float64 log-domain Sinkhorn on the plan exp((L + f + g) / (eps std(L))), rows 1/T, columns 1/E."""
    T, E = L.shape
    eps = eps * L.std()
    f, g = np.zeros(T), np.zeros(E)
    for _ in range(n_iter):
        f = -eps * scipy.special.logsumexp((L + g[None, :]) / eps, axis=1) - eps * np.log(T)
        g = -eps * scipy.special.logsumexp((L + f[:, None]) / eps, axis=0) - eps * np.log(E)
    return np.exp((L + f[:, None] + g[None, :]) / eps)


# ------------------------------------------------------------------------------ routing properties
@pytest.mark.parametrize("router", list(ROUTES))
@pytest.mark.parametrize("adversarial", [False, True])
@pytest.mark.parametrize("top_k", [1, 2])
def test_capacity_and_dispatch(gen, router, adversarial, top_k):
    T, E, cf = 64, 8, 1.25  # capacity = cf * T * top_k / E exactly: 10 or 20
    L = random_logits(T, E, gen, adversarial=adversarial)
    r = ROUTES[router](L, top_k=top_k, capacity_factor=cf)
    assert r.capacity == cf * T * top_k / E
    expert, position, load = reference_dispatch(r.scores, top_k, r.capacity, skip_zero=router == "sparse")
    assert torch.equal(r.expert_index, expert) and torch.equal(r.position, position)
    assert torch.equal(r.expert_load, load)
    # max load / mean load <= capacity factor (mean over the tokens * top_k slots asked for)
    assert float(r.expert_load.max()) / (T * top_k / E) <= cf
    # every slot routed unless capacity forbids it: routed = sum_e min(wanted_e, capacity)
    top, index = torch.topk(r.scores, top_k, -1)
    wanted = torch.bincount(index[top > 0] if router == "sparse" else index.flatten(), minlength=E)
    assert int((r.expert_index >= 0).sum()) == int(wanted.clamp(max=r.capacity).sum())
    assert math.isclose(float(r.dropped_fraction), float((r.expert_index < 0).sum()) / (T * top_k))
    # valid indices: experts in range, each (expert, position) slot used once
    kept = r.expert_index >= 0
    assert bool(((r.expert_index >= 0) & (r.expert_index < E) | (r.expert_index == -1)).all())
    slots = r.expert_index[kept] * r.capacity + r.position[kept]
    assert slots.unique().numel() == slots.numel() and bool((r.position[kept] < r.capacity).all())


def test_balancing_routers_beat_topk_on_adversarial_logits(gen):
    """Every token prefers expert 0: softmax gating drops most tokens, Sinkhorn routing almost none."""
    L = random_logits(256, 8, gen, adversarial=True)
    dropped = {name: float(route(L).dropped_fraction) for name, route in ROUTES.items()}
    assert dropped["topk"] > 0.5
    assert dropped["sinkhorn"] < 0.05
    assert dropped["sparse"] < dropped["topk"]


def test_sinkhorn_plan_matches_reference(gen):
    L = random_logits(48, 6, gen, scale=3.0)
    for eps, n_iter in ((0.3, 5), (1.0, 10), (0.1, 50)):
        r = sinkhorn_route(L, eps=eps, n_iter=n_iter)
        ref = reference_sinkhorn(L.numpy(), eps, n_iter)
        np.testing.assert_allclose(r.scores.numpy(), ref, rtol=1e-10, atol=0)
        np.testing.assert_allclose(ref.sum(0), 1 / 6, rtol=1e-12)  # columns exact after a g update
        assert torch.equal(r.expert_index[:, 0], torch.from_numpy(ref).argmax(1).where(r.expert_index[:, 0] >= 0, -1))


def test_sinkhorn_temperature_is_relative_to_the_logits_spread(gen):
    """eps is in units of the logits' standard deviation: scaling or shifting the logits changes nothing."""
    L = random_logits(2 * 40, 8, gen, adversarial=True).reshape(2, 40, 8)
    r = sinkhorn_route(L, top_k=2)
    for other in (L * 25.0, L * 0.04 - 3.0):
        ro = sinkhorn_route(other, top_k=2)
        assert torch.equal(ro.expert_index, r.expert_index)
        torch.testing.assert_close(ro.scores, r.scores, rtol=1e-9, atol=0)


def test_sparse_plan_rows_are_k_sparse_distributions(gen):
    """Tokens choose: each token's row of the plan sums to 1 with at most top_k nonzeros."""
    L = random_logits(64, 8, gen, adversarial=True)
    for top_k in (1, 3):
        P = sparse_route(L, top_k=top_k).scores
        torch.testing.assert_close(P.sum(-1), torch.ones(64, dtype=F64), rtol=0, atol=1e-12)
        assert int((P > 0).sum(-1).max()) <= top_k and bool((P >= 0).all())


@pytest.mark.parametrize(("top_k", "gamma"), [(1, 1.0), (2, 0.5), (3, 1.0)])
def test_sparse_router_from_zero_is_sparse_ot_with_adam(gen, top_k, gamma):
    """init="zero" is the V-MoE recipe exactly: otcore.sparse_ot's semi-dual Adam steps from zero
    potentials on the (experts, tokens) cost -softmax^T, masses tokens/experts and 1."""
    T, E = 48, 6
    L = random_logits(2 * T, E, gen, adversarial=True).reshape(2, T, E)
    r = sparse_route(L, top_k=top_k, gamma=gamma, n_steps=7, lr=0.05, init="zero")
    cost = -torch.softmax(L, -1).mT
    ref = otcore.sparse_ot(cost, torch.full((2, E), T / E, dtype=F64), torch.ones(2, T, dtype=F64), k=top_k,
                           gamma=gamma, method="adam", max_iter=7, lr=0.05, tol=0, warn=False)
    torch.testing.assert_close(r.scores, ref.plan.mT, rtol=0, atol=1e-12)
    index = torch.topk(ref.plan.mT, top_k, -1).indices
    assert torch.equal(r.expert_index, torch.where(r.expert_index >= 0, index, -1))


def test_sparse_router_softmax_init_is_the_unconstrained_optimum(gen):
    """alpha_e = 1/E - mean_t softmax_te maximises the semi-dual when no constraint binds (k = E and
    a positive plan): with no Adam step the plan is sparse_ot's L-BFGS optimum, balanced exactly."""
    T, E = 40, 5
    L = random_logits(T, E, gen, scale=0.2)
    r = sparse_route(L, top_k=E, capacity_factor=10.0, n_steps=0)
    ref = otcore.sparse_ot(-torch.softmax(L, -1).mT, torch.full((E,), T / E, dtype=F64), torch.ones(T, dtype=F64),
                           k=E, gamma=1.0, tol=1e-12)
    assert bool((r.scores > 0).all())
    torch.testing.assert_close(r.scores, ref.plan.mT, rtol=0, atol=1e-10)
    torch.testing.assert_close(r.scores.sum(0), torch.full((E,), T / E, dtype=F64), rtol=0, atol=1e-12)


def test_sparse_router_softmax_init_drops_fewer_slots(gen):
    """Every token prefers expert 0: from the softmax init the same number of steps balances better."""
    L = random_logits(512, 16, gen, adversarial=True)
    for top_k in (1, 2):
        zero = float(sparse_route(L, top_k=top_k, init="zero").dropped_fraction)
        softmax = float(sparse_route(L, top_k=top_k).dropped_fraction)
        assert softmax < 0.5 * zero


def test_topk_route_equals_torch_topk(gen):
    L = random_logits(40, 10, gen).reshape(2, 20, 10)  # with a group dimension
    r = topk_route(L, top_k=3, capacity_factor=10.0)  # capacity = all tokens: nothing dropped
    values, index = torch.topk(torch.softmax(L, -1), 3, dim=-1)
    assert torch.equal(r.expert_index, index)
    torch.testing.assert_close(r.combine_weights, values, rtol=1e-14, atol=0)


@pytest.mark.parametrize("router", list(ROUTES))
def test_groups_equal_one_by_one(gen, router):
    L = random_logits(3 * 32, 8, gen).reshape(3, 32, 8)
    r = ROUTES[router](L, top_k=2)
    for i in range(3):
        ri = ROUTES[router](L[i], top_k=2)
        assert torch.equal(r.expert_index[i], ri.expert_index) and torch.equal(r.expert_load[i], ri.expert_load)
        torch.testing.assert_close(r.combine_weights[i], ri.combine_weights, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("router", list(ROUTES))
def test_combine_weights_are_gathered_softmax_and_differentiable(gen, router):
    L = random_logits(12, 4, gen, adversarial=True).requires_grad_()
    r = ROUTES[router](L, top_k=2, capacity_factor=1.0)
    kept = r.expert_index >= 0
    probs = torch.softmax(L.detach(), -1)
    expected = torch.where(kept, probs.gather(-1, r.expert_index.clamp(min=0)), 0.0)
    torch.testing.assert_close(r.combine_weights.detach(), expected, rtol=1e-14, atol=0)
    assert not bool(kept.all())  # capacity 6 < 12 first choices of expert 0: some slots dropped
    # the routing is fixed under small perturbations, so the weights are the gathered softmax
    torch.autograd.gradcheck(lambda x: ROUTES[router](x, top_k=2, capacity_factor=1.0).combine_weights, (L,))


def test_dispatch_and_combine_tensors(gen):
    L = random_logits(32, 4, gen, adversarial=True)
    r = sinkhorn_route(L, top_k=2, capacity_factor=1.0)
    mask, combine = r.dispatch_mask, r.combine_tensor
    assert mask.shape == combine.shape == (32, 4, r.capacity)
    assert torch.equal(mask.sum((0, 2)), r.expert_load)  # slots filled per expert
    assert int(mask.sum(0).max()) <= 1  # each (expert, slot) holds one token at most
    torch.testing.assert_close(combine.sum((1, 2)), r.combine_weights.sum(-1), rtol=1e-14, atol=0)
    t, k = torch.nonzero(r.expert_index >= 0, as_tuple=True)
    assert bool(mask[t, r.expert_index[t, k], r.position[t, k]].all())


@pytest.mark.parametrize("router", list(ROUTES))
def test_no_nan_at_scale_1e4_in_bf16(gen, router):
    for adversarial in (False, True):
        L = random_logits(2 * 64, 8, gen, adversarial=adversarial, scale=1e4).reshape(2, 64, 8).bfloat16()
        r = ROUTES[router](L, top_k=2)
        assert r.combine_weights.dtype == torch.bfloat16
        for t in (r.combine_weights, r.scores):
            assert bool(torch.isfinite(t).all())
        for g in range(2):  # the capacity step on the (finite) scores, exactly
            expert, position, load = reference_dispatch(r.scores[g].float(), 2, r.capacity,
                                                         skip_zero=router == "sparse")
            assert torch.equal(r.expert_index[g], expert) and torch.equal(r.position[g], position)
            assert torch.equal(r.expert_load[g], load)
            assert int(load.max()) <= r.capacity and int(load.sum()) > 0


# ------------------------------------------------------------------------------ modules
@pytest.mark.parametrize("router", ["topk", "sinkhorn"])
def test_compiles_in_one_graph(gen, router):
    module = TopKRouter(8, top_k=2) if router == "topk" else SinkhornRouter(8, top_k=2)
    L = random_logits(64, 8, gen).float()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    r, ref = compiled(L), module(L)
    assert torch.equal(r.expert_index, ref.expert_index) and torch.equal(r.position, ref.position)
    torch.testing.assert_close(r.combine_weights, ref.combine_weights)


def test_modules_equal_functions(gen):
    L = random_logits(32, 8, gen)
    pairs = [(TopKRouter(8, top_k=2), topk_route(L, top_k=2)),
             (SinkhornRouter(8, top_k=2, eps=0.5, n_iter=7), sinkhorn_route(L, top_k=2, eps=0.5, n_iter=7)),
             (SparseOTRouter(8, top_k=2, gamma=0.5, n_steps=5), sparse_route(L, top_k=2, gamma=0.5, n_steps=5))]
    for module, ref in pairs:
        r = module(L)
        assert torch.equal(r.expert_index, ref.expert_index)
        assert torch.equal(r.combine_weights, ref.combine_weights)


def test_moe_topk_matches_token_by_token_reference(gen):
    torch.manual_seed(3)
    moe = MoE(5, 4, 7, router="topk", top_k=2, capacity_factor=4.0).double()
    x = torch.randn(9, 5, generator=gen, dtype=F64)
    y = moe(x)
    probs = torch.softmax(x @ moe.gate.weight.T, -1)
    expected = torch.zeros_like(x)
    for t in range(9):
        for e in torch.topk(probs[t], 2).indices.tolist():
            h = torch.nn.functional.gelu(x[t] @ moe.w1[e] + moe.b1[e])
            expected[t] += probs[t, e] * (h @ moe.w2[e] + moe.b2[e])
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-14)


def test_moe_dropped_token_gets_zero(gen):
    torch.manual_seed(4)
    moe = MoE(4, 2, 6, router="topk", capacity_factor=0.25).double()  # capacity 1 of 8 tokens
    x = torch.randn(8, 4, generator=gen, dtype=F64)
    y = moe(x)
    dropped = (moe.last_routing.expert_index < 0).all(-1)
    assert int(dropped.sum()) == 6  # two experts, one slot each
    assert bool((y[dropped] == 0).all()) and bool((y[~dropped] != 0).all())


@pytest.mark.parametrize("router", list(ROUTES))
def test_moe_shapes_and_gradients(gen, router):
    torch.manual_seed(5)
    moe = MoE(6, 4, 8, router=router, top_k=2)
    x = torch.randn(3, 16, 6, generator=gen)
    y = moe(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.square().sum().backward()
    for name in ("gate", "w1", "b1", "w2", "b2"):
        grad = getattr(moe, name).weight.grad if name == "gate" else getattr(moe, name).grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    assert moe.last_routing.expert_index.shape == (3, 16, 2)


def test_moe_under_bf16_autocast(gen):
    torch.manual_seed(6)
    moe = MoE(8, 4, 16, router="sinkhorn")
    x = torch.randn(2, 32, 8, generator=gen) * 100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    assert bool(torch.isfinite(y).all())
    y.float().sum().backward()
    assert bool(torch.isfinite(moe.gate.weight.grad).all()) and float(moe.gate.weight.grad.abs().sum()) > 0


# ------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize(("call", "name"), [
    (lambda L: topk_route(L.long()), "logits"),
    (lambda L: topk_route(L[0]), "logits"),
    (lambda L: topk_route(L[:0]), "logits"),
    (lambda L: topk_route([[1.0]]), "logits"),
    (lambda L: topk_route(L, top_k=0), "top_k"),
    (lambda L: topk_route(L, top_k=5), "top_k"),
    (lambda L: topk_route(L, top_k=1.5), "top_k"),
    (lambda L: topk_route(L, capacity_factor=0), "capacity_factor"),
    (lambda L: sinkhorn_route(L, capacity_factor=float("nan")), "capacity_factor"),
    (lambda L: sinkhorn_route(L, eps=0), "eps"),
    (lambda L: sinkhorn_route(L, n_iter=0), "n_iter"),
    (lambda L: sparse_route(L, gamma=-1.0), "gamma"),
    (lambda L: sparse_route(L, n_steps=2.5), "n_steps"),
    (lambda L: sparse_route(L, lr=0), "lr"),
    (lambda L: sparse_route(L, n_steps=-1), "n_steps"),
    (lambda L: sparse_route(L, init="uniform"), "init"),
    (lambda L: SparseOTRouter(4, init=None), "init"),
    (lambda L: SinkhornRouter(3)(L), "n_experts"),
    (lambda L: SparseOTRouter(0), "n_experts"),
    (lambda L: TopKRouter(4, top_k=9), "top_k"),
    (lambda L: MoE(4, 4, 8, router="hash"), "router"),
    (lambda L: MoE(4, 4, 0), "d_hidden"),
    (lambda L: MoE(4, 4, 8)(torch.randn(5, 3)), "x"),
])
def test_bad_inputs(call, name):
    L = torch.randn(6, 4)
    with pytest.raises(ValueError, match=name):
        call(L)


def test_public_exports():
    assert otcore.nn.SinkhornRouter is SinkhornRouter and otcore.nn.MoE is MoE
