"""A mixture-of-experts layer: a linear router, any of the routers of ``otcore.nn.routing``, MLP experts.

``y_t = sum_k w_tk * expert_{e_tk}(x_t)`` over the token's kept slots (dropped slots add nothing,
so a token dropped by every expert gets 0, the residual branch's job in a transformer). Tokens
are copied into per-expert buffers of ``capacity`` slots by their (expert, position) index, the
experts run as one batched matmul over (experts, groups * capacity, d), and the results are
gathered back: no data-dependent shapes, no host synchronisation.

References:
    Shazeer et al., "Outrageously large neural networks: the sparsely-gated mixture-of-experts
    layer", ICLR 2017.
    Lepikhin et al., "GShard", ICLR 2021.
"""

from __future__ import annotations

import math

import torch

from otcore._validation import check_max_iter
from otcore.nn.routing import Routing, SinkhornRouter, SparseOTRouter, TopKRouter

ROUTERS = {"sinkhorn": SinkhornRouter, "sparse": SparseOTRouter, "topk": TopKRouter}


class MoE(torch.nn.Module):
    """Mixture of ``n_experts`` two-layer GELU MLPs ``d_model -> d_hidden -> d_model``.

    Args:
        d_model: token width.
        n_experts: number of experts.
        d_hidden: hidden width of each expert.
        router: ``"sinkhorn"``, ``"sparse"`` or ``"topk"`` (plain top-k softmax gating).
        top_k: experts per token.
        capacity_factor: slots per expert = ceil(capacity_factor * tokens * top_k / n_experts).
        **router_options: passed to the router (e.g. ``eps``, ``n_iter``; ``gamma``, ``n_steps``).

    ``forward(x)``: x (tokens, d_model) is one routing group; x (..., tokens, d_model) routes each
    leading index as its own group. Returns y with x's shape; the last ``Routing`` is kept in
    ``self.last_routing`` for load statistics.
    """

    def __init__(self, d_model: int, n_experts: int, d_hidden: int, *, router: str = "sinkhorn", top_k: int = 1,
                 capacity_factor: float = 1.25, **router_options) -> None:
        super().__init__()
        d_model = check_max_iter("d_model", d_model)
        d_hidden = check_max_iter("d_hidden", d_hidden)
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {tuple(ROUTERS)}, got {router!r}")
        self.router = ROUTERS[router](n_experts, top_k=top_k, capacity_factor=capacity_factor, **router_options)
        self.gate = torch.nn.Linear(d_model, n_experts, bias=False)
        E = self.router.n_experts
        self.w1 = torch.nn.Parameter(torch.empty(E, d_model, d_hidden))
        self.b1 = torch.nn.Parameter(torch.zeros(E, d_hidden))
        self.w2 = torch.nn.Parameter(torch.empty(E, d_hidden, d_model))
        self.b2 = torch.nn.Parameter(torch.zeros(E, d_model))
        for w, fan_in in ((self.w1, d_model), (self.w2, d_hidden)):
            torch.nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        self.last_routing: Routing | None = None

    def experts(self, h: torch.Tensor) -> torch.Tensor:
        """Apply expert e to ``h[e]``: (n_experts, slots, d_model) -> (n_experts, slots, d_model)."""
        h = torch.nn.functional.gelu(torch.baddbmm(self.b1.unsqueeze(1), h, self.w1))
        return torch.baddbmm(self.b2.unsqueeze(1), h, self.w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x) or x.dim() < 2 or x.shape[-1] != self.w1.shape[1]:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"x must have shape (tokens, {self.w1.shape[1]}) or (..., tokens, "
                             f"{self.w1.shape[1]}), got {shape}")
        routing = self.router(self.gate(x))
        self.last_routing = routing
        xs = x.reshape(-1, *x.shape[-2:])  # (G, T, d)
        G, T, d = xs.shape
        E, C, K = self.router.n_experts, routing.capacity, self.router.top_k
        index, position = routing.expert_index.view(G, T, K), routing.position.view(G, T, K)
        group = torch.arange(G, device=x.device).view(G, 1, 1) * (E * C)
        # flat buffer slot of each (token, choice); dropped ones go to a spare row E*G*C, left at 0
        slot = torch.where(index >= 0, group + index * C + position, G * E * C).flatten()
        tokens = xs.unsqueeze(-2).expand(G, T, K, d).reshape(-1, d)
        buffer = xs.new_zeros(G * E * C + 1, d).index_add(0, slot, tokens)
        h = buffer[:-1].view(G, E, C, d).transpose(0, 1).reshape(E, G * C, d)
        out = self.experts(h).view(E, G, C, d).transpose(0, 1).reshape(G * E * C, d)
        out = torch.cat([out, out.new_zeros(1, d)])[slot].view(G, T, -1, d)
        y = (routing.combine_weights.view(G, T, K, 1).to(out.dtype) * out).sum(-2)
        return y.reshape(x.shape)
