"""A toy mixture of experts trained with three routers: Sinkhorn, sparse OT and top-k softmax gating.

Inputs are 2-D points from six Gaussian clusters of very unequal sizes; the target is a
different function in each cluster (``sin(w_c . x + phase_c)``), so a good router sends each
cluster to its own experts. The same MoE (``otcore.nn.MoE``, 8 experts, top-1, capacity factor
1.25) is trained with each router from the same initialisation; dropped tokens fall back to a
small shared MLP (the residual branch of a transformer block). The figure shows the training
loss and the share of the tokens each expert received: softmax gating lets the large clusters
pile onto a few experts and drops what overflows their capacity, the OT routers spread the load.
Saves examples/moe_routing.png.

Run: python examples/moe_routing.py   (about 7 s on one CPU core)
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import otcore

CLUSTERS = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])  # cluster proportions
EXPERTS, WIDTH, STEPS, BATCH = 8, 32, 600, 512


def task(seed: int = 0):
    """Cluster centres, per-cluster frequency vectors and phases of the target function."""
    gen = torch.Generator().manual_seed(seed)
    angles = torch.arange(len(CLUSTERS)) * (2 * torch.pi / len(CLUSTERS))
    centres = 3 * torch.stack([angles.cos(), angles.sin()], -1)
    freqs = 3 * torch.randn(len(CLUSTERS), 2, generator=gen)
    phases = 2 * torch.pi * torch.rand(len(CLUSTERS), generator=gen)
    return centres, freqs, phases


def sample(n: int, gen: torch.Generator, centres, freqs, phases):
    """n points (n, 2) and targets (n, 1)."""
    c = torch.multinomial(CLUSTERS, n, replacement=True, generator=gen)
    x = centres[c] + 0.5 * torch.randn(n, 2, generator=gen)
    y = torch.sin(((x - centres[c]) * freqs[c]).sum(-1) + phases[c])
    return x, y.unsqueeze(-1)


class Model(torch.nn.Module):
    """Embedding -> MoE (+ a small shared MLP) -> linear head."""

    def __init__(self, router: str) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(2, WIDTH)
        self.moe = otcore.nn.MoE(WIDTH, EXPERTS, 2 * WIDTH, router=router, top_k=1, capacity_factor=1.25)
        self.shared = torch.nn.Sequential(torch.nn.Linear(WIDTH, 8), torch.nn.GELU(), torch.nn.Linear(8, WIDTH))
        self.head = torch.nn.Linear(WIDTH, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.embed(x))
        return self.head(h + self.moe(h) + self.shared(h))


def train(router: str):
    """Train from a fixed initialisation; returns the loss curve and the mean per-expert load share."""
    centres, freqs, phases = task()
    torch.manual_seed(0)
    model = Model(router)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    losses, load, dropped = [], torch.zeros(EXPERTS), 0.0
    for _ in range(STEPS):
        x, y = sample(BATCH, gen, centres, freqs, phases)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        routing = model.moe.last_routing
        load += routing.expert_load.float() / BATCH
        dropped += float(routing.dropped_fraction)
    return losses, load / STEPS, dropped / STEPS


def main() -> None:
    names = {"sinkhorn": "SinkhornRouter", "sparse": "SparseOTRouter", "topk": "top-1 softmax gating"}
    results = {router: train(router) for router in names}
    fig, (ax_loss, ax_load) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(names)
    for i, (router, (losses, load, dropped)) in enumerate(results.items()):
        smooth = torch.tensor(losses).unfold(0, 20, 1).mean(-1)
        label = f"{names[router]} (dropped {100 * dropped:.1f} %)"
        ax_loss.plot(range(19, STEPS), smooth, label=label)
        ax_load.bar(torch.arange(EXPERTS) + (i - 1) * width, load, width=width, label=names[router])
        print(f"{names[router]:>22}: final loss {sum(losses[-20:]) / 20:.4f}, dropped {100 * dropped:.1f} %, "
              f"max load share {float(load.max()):.3f}")
    ax_loss.set(xlabel="step", ylabel="MSE (20-step mean)", yscale="log", title="training loss")
    ax_loss.legend()
    ax_load.axhline(1 / EXPERTS, color="k", lw=0.8, ls="--", label="balanced")
    ax_load.axhline(1.25 / EXPERTS, color="r", lw=0.8, ls=":", label="capacity")
    ax_load.set(xlabel="expert", ylabel="share of tokens routed", title="per-expert load (mean over training)")
    ax_load.legend(fontsize=8)
    fig.tight_layout()
    out = Path(os.environ.get("OTCORE_EXAMPLES_OUT", Path(__file__).parent)) / "moe_routing.png"
    fig.savefig(out, dpi=110)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
