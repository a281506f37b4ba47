"""MoE routers (otcore.nn) vs plain top-k softmax gating: forward + backward, 4096 tokens x 64 experts.

The peer is top-k softmax gating (``router="topk"``, GShard/Switch style, the router a user would
otherwise pick), run through the same capacity step. ``time_route`` times the routing and the
backward of the combine weights to the logits (float32); ``track_dropped`` the fraction of
token slots dropped on logits where every token prefers one expert (what balanced routing fixes).
``sparse`` is the sparse-OT router with its defaults (softmax start, 10 Adam steps),
``sparse-vmoe`` the same solver run as the V-MoE recipe (zero start, 20 steps).
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch

from . import problems

TOKENS, EXPERTS = 4096, 64


def _route(impl: str):
    import otcore

    return {"topk": otcore.nn.topk_route, "sinkhorn": otcore.nn.sinkhorn_route, "sparse": otcore.nn.sparse_route,
            "sparse-vmoe": functools.partial(otcore.nn.sparse_route, init="zero", n_steps=20)}[impl]


def _logits(device: torch.device, *, adversarial: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(TOKENS, EXPERTS, generator=gen)
    if adversarial:
        logits[:, 0] += 4.0
    return logits.to(device)


class Routers:
    """Forward + backward of each router, top_k in {1, 2}, CPU and CUDA, float32."""

    params = (["topk", "sinkhorn", "sparse", "sparse-vmoe"], [1, 2], problems.DEVICES)
    param_names: ClassVar[list[str]] = ["impl", "top_k", "device"]
    timeout = 300

    def setup(self, impl, top_k, device):
        self.device = problems.device_or_skip(device)
        self.route, self.top_k = _route(impl), top_k
        self.logits = _logits(self.device).requires_grad_()
        self.run()  # warm-up

    def run(self):
        routing = self.route(self.logits, top_k=self.top_k)
        routing.combine_weights.sum().backward()
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time_route(self, *params):
        self.run()


class RoutersBalance:
    """Fraction of slots dropped (capacity factor 1.25) on logits where every token prefers expert 0."""

    params = (["topk", "sinkhorn", "sparse", "sparse-vmoe"], [1, 2])
    param_names: ClassVar[list[str]] = ["impl", "top_k"]

    def track_dropped(self, impl, top_k):
        routing = _route(impl)(_logits(torch.device("cpu"), adversarial=True), top_k=top_k)
        return float(routing.dropped_fraction)

    track_dropped.unit = "fraction"
