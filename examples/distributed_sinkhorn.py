"""Sharded Sinkhorn with torch.distributed: each process holds a slice of the sources.

Every rank builds ``RowSharded(PointCloud(x_local, y))`` from its contiguous share of the N
sources (``otcore.distributed.shard``) and all M targets, and calls ``otcore.sinkhorn`` as usual.
The column softmin (the g-update) is a log-sum-exp all-reduce across ranks, every other
reduction over the sources an all-reduce sum: every rank gets the global value and the full
column potential g, and keeps its own slice of f and of the plan. Rank 0 then solves the whole
problem in one process, checks the sharded solve against it, and draws each rank's sources with
their barycentric targets (P y)_i / a_i, computed on the rank that holds them.

When neither cloud fits one process, ``BothSharded(x_local, y_local)`` shards the targets too:
each softmin passes the other side's shards around the ring of ranks. The script solves the same
problem that way, and evaluates the Sinkhorn divergence on the row-sharded cloud (its x <-> x
problem sharded on both sides), each against one process.

Run (CPU, gloo): ``torchrun --nproc_per_node=2 examples/distributed_sinkhorn.py`` (about
10 s, the launcher's start-up included); saves ``examples/distributed_sinkhorn.png``. On GPUs,
launch one process per GPU: the NCCL backend is chosen when CUDA is available.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.distributed as dist

import otcore
import otcore.distributed
from otcore.geometry import PointCloud

N, M, EPS = 2000, 1500, 0.05


def clouds(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sources on a noisy ring (N, 2) and targets in two Gaussian blobs (M, 2), the same on every rank."""
    t = 2 * math.pi * torch.rand(N, generator=gen, dtype=torch.float64)
    x = torch.stack([t.cos(), t.sin()], -1) + 0.08 * torch.randn(N, 2, generator=gen, dtype=torch.float64)
    centres = torch.tensor([[-0.6, 0.0], [0.6, 0.0]], dtype=torch.float64)
    y = centres[torch.arange(M) % 2] + 0.2 * torch.randn(M, 2, generator=gen, dtype=torch.float64)
    return x, y


def main() -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if backend == "nccl" else torch.device("cpu")
    x, y = (t.to(device) for t in clouds(torch.Generator().manual_seed(0)))
    x_local = otcore.distributed.shard(x)
    a_local = torch.full((len(x_local),), 1.0 / N, dtype=x.dtype, device=device)

    start = time.perf_counter()
    geom = otcore.distributed.RowSharded(PointCloud(x_local, y))
    res = otcore.sinkhorn(geom, a_local, None, eps=EPS)
    elapsed = time.perf_counter() - start
    mapped = res.apply(y) / a_local.unsqueeze(-1)  # barycentric targets of this rank's sources
    report = (f"rank {rank}/{world}: {len(x_local)} of {N} sources, value {float(res.value):.10f}, "
              f"{int(res.n_iter)} iterations, {elapsed:.2f} s")
    y_local = otcore.distributed.shard(y)  # both sides sharded: the targets' shards travel the ring
    both = otcore.sinkhorn(otcore.distributed.BothSharded(x_local, y_local), a_local, None, eps=EPS)
    divergence = otcore.sinkhorn_divergence(geom, a=a_local, eps=EPS)

    # rank 0 prints every rank's line, in rank order (printed by each rank, they would interleave)
    shards = [None] * world if rank == 0 else None
    dist.gather_object((x_local.cpu(), mapped.cpu(), res.f.cpu(), report), shards, dst=0)
    if rank == 0:
        print("\n".join(s[3] for s in shards))
        whole = otcore.sinkhorn(PointCloud(x, y), None, None, eps=EPS, domain="log")
        f = torch.cat([s[2] for s in shards]).to(device)
        print(f"one process: value {float(whole.value):.10f}; sharded - single: value "
              f"{abs(float(res.value - whole.value)):.1e}, g {float((res.g - whole.g).abs().max()):.1e}, "
              f"f {float((f - whole.f).abs().max()):.1e}")
        print(f"both sides sharded - single: value {abs(float(both.value - whole.value)):.1e} "
              f"({int(both.n_iter)} iterations)")
        single = otcore.sinkhorn_divergence(x, y, eps=EPS)
        print(f"divergence: sharded {float(divergence):.10f}, one process {float(single):.10f}")
        out_dir = Path(os.environ.get("OTCORE_EXAMPLES_OUT", Path(__file__).parent))
        draw(shards, y.cpu(), out_dir / "distributed_sinkhorn.png")
    dist.destroy_process_group()


def draw(shards, y: torch.Tensor, path: Path) -> None:
    """Each rank's sources (own colour) with a few arrows to their barycentric targets."""
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(y[:, 0], y[:, 1], s=3, c="0.7", label="targets (replicated)")
    for r, (xs, mapped, _, _) in enumerate(shards):
        colour = f"C{r}"
        ax.scatter(xs[:, 0], xs[:, 1], s=3, c=colour, label=f"sources of rank {r}")
        every = slice(None, None, max(1, len(xs) // 40))
        for p, q in zip(xs[every], mapped[every], strict=True):
            ax.annotate("", q.tolist(), p.tolist(), arrowprops={"arrowstyle": "->", "color": colour, "lw": 0.6})
    ax.set_aspect("equal")
    ax.set_title(f"sharded Sinkhorn over {len(shards)} processes: barycentric map")
    ax.legend(loc="upper right", fontsize=7, markerscale=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
