"""relative_eps: eps as a fraction of the mean cost (OTT-JAX's relative_epsilon) or of max |C|."""

from __future__ import annotations

import ot
import pytest
import torch
from conftest import clouds, simplex, sqdist

import otcore


@pytest.mark.parametrize("relative", ["mean", "max"])
def test_relative_eps_is_eps_times_the_cost_scale(gen, relative):
    x, y = clouds(30, 20, 3, gen)
    a, b = simplex(30, gen), simplex(20, gen)
    C = sqdist(x, y)
    scale = float(C.mean() if relative == "mean" else C.abs().max())
    res = otcore.sinkhorn(otcore.PointCloud(x, y), a, b, eps=0.05, relative_eps=relative, tol=1e-11)
    assert res.eps == pytest.approx(0.05 * scale, rel=1e-12)
    P = ot.sinkhorn(a.numpy(), b.numpy(), C.numpy(), 0.05 * scale, method="sinkhorn_log", stopThr=1e-13,
                    numItermax=100_000)
    torch.testing.assert_close(res.plan, torch.from_numpy(P), rtol=0, atol=1e-10)
    divergence = otcore.sinkhorn_divergence(x, y, a, b, eps=0.05, relative_eps=relative, tol=1e-11)
    absolute = otcore.sinkhorn_divergence(x, y, a, b, eps=0.05 * scale, tol=1e-11)
    torch.testing.assert_close(divergence, absolute, rtol=1e-12, atol=0)


def test_batched_relative_eps_uses_the_batch_mean(gen):
    C = torch.stack([sqdist(*clouds(10, 8, 2, gen)), 3 * sqdist(*clouds(10, 8, 2, gen))])
    res = otcore.sinkhorn(C, eps=0.1, relative_eps="mean")
    assert res.eps == pytest.approx(0.1 * float(C.mean((-2, -1)).mean()), rel=1e-12)


def test_relative_eps_errors_name_the_argument(gen):
    C = sqdist(*clouds(6, 5, 2, gen))
    with pytest.raises(ValueError, match="relative_eps must be None or one of"):
        otcore.sinkhorn(C, eps=0.1, relative_eps="median")
    with pytest.raises(ValueError, match="relative_eps reads the costs on the host"):
        otcore.sinkhorn(C, eps=0.1, relative_eps="mean", validate=False)
    with pytest.raises(ValueError, match="relative_eps='mean' needs costs of positive mean"):
        otcore.sinkhorn(torch.zeros(4, 3, dtype=C.dtype), eps=0.1, relative_eps="mean")
