"""Sharded Sinkhorn: time per iteration of ``RowSharded`` and ``BothSharded`` over 2 gloo
processes vs one process.

On one 2-core CPU this measures the overhead of sharding (``one_process``: the whole problem in
one process with 2 threads, ``one_process_1_thread`` with 1; ``row_sharded_2``: 2 processes with
1 thread each, each holding n/2 sources), not a speed-up: both use the same cores. Both run ``ITERS`` log-domain iterations
(``tol=0``) on a float32 point cloud (n sources, m = n targets, d = 3), timed inside the worker
after a warm-up solve.

Model of the communication per iteration (what gloo or NCCL adds to a solve on P ranks):

* the g-update: two all-reduces of m floats (MAX of the local maxima, SUM of the shifted
  exponentials). A ring all-reduce sends and receives 2 (P - 1)/P x 4m bytes per rank each, so
  about 16 m (P - 1)/P bytes per iteration, plus 2 latencies;
* the marginal error: one all-reduce of a scalar per problem (a latency);
* compute: two softmins over this rank's n/P x m costs, 2 n m / (P R) seconds at R cost
  entries per second per device.

Communication / compute = 8 (P - 1) R / (n W) for bandwidth W (latency aside). At n = m = 10^7,
P = 8 and an assumed R = 3e11 entries/s per GPU (an H200 streaming a d = 3 point-cloud softmin;
an assumption, not measured here): compute is 2e14 / (8 x 3e11) = 83 s per iteration, the
all-reduces move 140 MB per rank, 0.4 ms on NVLink (W ~ 400 GB/s, ratio 5e-6) and 11 ms on
100 Gb/s Ethernet (W = 12.5 GB/s, ratio 1.3e-4). The bandwidth term stays below 10 % of the
softmin for n > 80 (P - 1) R / W: n > 1.3e4 on Ethernet and n > 420 on NVLink at P = 8. The
three latencies per iteration (~20 us on NVLink, ~100 us over TCP) matter only for small
problems: 2 n m / (P R) > 10 x 3 x latency needs n = m > 3e4 on NVLink and 7e4 on Ethernet at
P = 8. The all-reduce is therefore small against the softmin at every n worth sharding; it is
not overlapped (g depends on it).

``BothSharded`` (``both_sharded_2``: each process holds n/2 sources and m/2 targets) moves the
shards instead: each softmin passes the other side's shards (points, potential, weights:
(d + 2) floats a point) around the ring in P - 1 shifts, 4 (d + 2) m (P - 1)/P bytes per rank
per half-iteration, about 8 (d + 2) m (P - 1)/P bytes per iteration, 2.5 times the all-reduces'
16 m (P - 1)/P at d = 3, plus 2 (P - 1) latencies. Each shift is posted before the block it
overlaps is computed (n m / P^2 cost entries), so it is hidden once a block's compute outlasts
a shift: n m / (P^2 R) > 4 (d + 2) m / (P W), i.e. n > 4 (d + 2) P R / W: n > 120 on NVLink
and 4e3 on Ethernet at P = 8 and d = 3 (same R and W), latencies aside.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import otcore
import otcore.distributed
from otcore.geometry import PointCloud

from . import problems

ITERS = 20


def _clouds(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=gen), torch.randn(n, 3, generator=gen) + 0.5


def _time_iterations(geom, a, eps: float, b=None) -> float:
    """Seconds per iteration of ``ITERS`` log-domain iterations, after a warm-up solve."""
    solve = {"eps": eps, "tol": 0.0, "max_iter": ITERS, "domain": "log", "warn": False}
    otcore.sinkhorn(geom, a, b, **solve)
    start = time.perf_counter()
    otcore.sinkhorn(geom, a, b, **solve)
    return (time.perf_counter() - start) / ITERS


def _worker(rank: int, world: int, port: int, n: int, both: bool, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        x, y = _clouds(n)
        x_local = otcore.distributed.shard(x)
        a_local = torch.full((len(x_local),), 1.0 / n)
        if both:
            y_local = otcore.distributed.shard(y)
            geom = otcore.distributed.BothSharded(x_local, y_local)
            b_local = torch.full((len(y_local),), 1.0 / n)
        else:
            geom, b_local = otcore.distributed.RowSharded(PointCloud(x_local, y)), None
        seconds = _time_iterations(geom, a_local, eps=0.1, b=b_local)
        if rank == 0:
            queue.put(seconds)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sharded_seconds_per_iteration(n: int, world: int, both: bool = False) -> float:
    """Seconds per iteration of ``RowSharded`` (``BothSharded`` when ``both``) over ``world``
    gloo processes (1 thread each)."""
    # asv imports this suite through a meta-path hook, not sys.path; the spawned workers unpickle
    # ``_worker`` by module name and need the suite's parent directory on the path they inherit.
    root = str(Path(__file__).resolve().parents[1])
    added = root not in sys.path
    if added:
        sys.path.append(root)
    try:
        queue = mp.get_context("spawn").SimpleQueue()
        mp.spawn(_worker, args=(world, _free_port(), n, both, queue), nprocs=world, join=True)
        return queue.get()
    finally:
        if added:
            sys.path.remove(root)


def one_process_seconds_per_iteration(n: int, threads: int) -> float:
    """Seconds per iteration of the whole problem in this process with ``threads`` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, y = _clouds(n)
        return _time_iterations(PointCloud(x, y), torch.full((n,), 1.0 / n), eps=0.1)
    finally:
        torch.set_num_threads(previous)


class ShardedIteration:
    """Per-iteration time (track_, seconds): one process (2 threads, 1 thread) vs ``RowSharded``
    and ``BothSharded`` over 2 gloo processes (1 thread each)."""

    params = (["one_process", "one_process_1_thread", "row_sharded_2", "both_sharded_2"],
              problems.by_profile([2000], [2000, 8000]))
    param_names = ("impl", "n")
    timeout = 600
    number = 1
    repeat = 1

    def track_seconds_per_iteration(self, impl: str, n: int) -> float:
        if impl.startswith("one_process"):
            threads = 1 if impl.endswith("1_thread") else min(2, os.cpu_count() or 1)
            return one_process_seconds_per_iteration(n, threads=threads)
        return sharded_seconds_per_iteration(n, world=2, both=impl == "both_sharded_2")

    track_seconds_per_iteration.unit = "seconds"
