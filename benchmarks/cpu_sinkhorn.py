"""CPU Sinkhorn benchmark: otcore vs POT (log-domain numpy / torch, kernel-domain), as ratios.

Plain script until the asv suite lands (issue 3). For every n, dtype and eps (relative to the
largest cost) it reports time per iteration of each solver, and for n <= 2000 the iterations and
total time to reach the same marginal tolerance. Writes a markdown table to stdout.

Usage: python benchmarks/cpu_sinkhorn.py [--sizes 500 2000 5000] [--cloud 50000]
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
import warnings

import numpy as np
import ot
import torch

import otcore

warnings.filterwarnings("ignore")


def per_iteration(fn, iters: int) -> float:
    start = time.perf_counter()
    fn(iters)
    return (time.perf_counter() - start) / iters


def problem(n: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    y = torch.randn(n, 2, generator=gen, dtype=torch.float64) * 0.7 + 1.0
    return x.to(dtype), y.to(dtype), (torch.cdist(x, y) ** 2).to(dtype)


def dense_rows(sizes, rel_eps, tol):
    rows = []
    for n in sizes:
        for dtype in (torch.float64, torch.float32):
            x, y, C = problem(n, dtype)
            Cn, u = C.numpy(), np.full(n, 1.0 / n, dtype=C.numpy().dtype)
            Ct = C.clone()
            for rel in rel_eps:
                eps = rel * float(C.max())
                k = 20 if n <= 2000 else 5
                otcore.sinkhorn(C, eps=eps, max_iter=2, warn=False)  # warm-up
                t_ot = per_iteration(lambda k: otcore.sinkhorn(C, eps=eps, max_iter=k, tol=1e-30, warn=False), k)
                t_ker = per_iteration(lambda k: ot.sinkhorn(u, u, Cn, eps, numItermax=k, stopThr=0), k)
                k_log = 3 if n <= 2000 else 1
                t_log = per_iteration(lambda k: ot.sinkhorn(u, u, Cn, eps, method="sinkhorn_log", numItermax=k,
                                                            stopThr=0), k_log)
                ut = torch.from_numpy(u)
                t_logt = per_iteration(lambda k: ot.sinkhorn(ut, ut, Ct, eps, method="sinkhorn_log", numItermax=k,
                                                             stopThr=0), k_log)
                row = dict(n=n, dtype=str(dtype).split(".")[-1], rel_eps=rel, t_ot=t_ot, t_ker=t_ker, t_log=t_log,
                           t_logt=t_logt, it_ot=None, tot_ot=None, it_ker=None, ker_ok=None)
                if n <= 2000:
                    start = time.perf_counter()
                    res = otcore.sinkhorn(C, eps=eps, tol=tol, max_iter=3000, warn=False)
                    row["tot_ot"] = time.perf_counter() - start
                    row["it_ot"] = int(res.n_iter) if bool(res.converged) else None
                    P, log = ot.sinkhorn(u, u, Cn, eps, numItermax=3000, stopThr=tol, log=True)
                    row["it_ker"] = int(log["niter"])
                    row["ker_ok"] = bool(np.isfinite(P).all() and P.sum() > 0.5)
                rows.append(row)
                print_row(row, flush=True)
    return rows


def fmt_ms(t):
    return "-" if t is None else f"{t * 1e3:.1f}"


def print_row(r, flush=False):
    it = "-" if r["n"] > 2000 else (str(r["it_ot"]) if r["it_ot"] is not None else ">3000")
    ker = "-" if r["ker_ok"] is None else ("ok" if r["ker_ok"] else "NaN/underflow")
    tot = "-" if r["tot_ot"] is None else f"{r['tot_ot']:.2f}"
    print(f"| {r['n']} | {r['dtype']} | {r['rel_eps']:g} | {fmt_ms(r['t_ot'])} | {fmt_ms(r['t_log'])} | "
          f"{r['t_log'] / r['t_ot']:.1f}x | {fmt_ms(r['t_logt'])} | {r['t_logt'] / r['t_ot']:.1f}x | "
          f"{fmt_ms(r['t_ker'])} | {r['t_ot'] / r['t_ker']:.2f} | {it} | "
          f"{tot} | {ker} |",
          flush=flush)


def cloud_row(n: int):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=gen)
    y = torch.randn(n, 3, generator=gen) + 0.5
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    geom = otcore.PointCloud(x, y)
    t = per_iteration(lambda k: otcore.sinkhorn(geom, eps=0.05, max_iter=k, tol=1e-30, warn=False), 2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"\nPointCloud n=m={n}, d=3, float32: {t:.2f} s per iteration; peak RSS growth {(peak - base) / 1e6:.0f} MB "
          f"(an n x m float32 matrix would be {n * n * 4 / 1e9:.1f} GB)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 5000])
    parser.add_argument("--eps", type=float, nargs="+", default=[1e-1, 1e-2, 1e-3])
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--cloud", type=int, default=50_000)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"POT {ot.__version__}; marginal tol {args.tol}")
    print("| n | dtype | eps/max C | otcore ms/it | POT log ms/it | ratio | POT log (torch) ms/it | ratio | "
          "POT kernel ms/it | otcore/kernel | otcore iters | otcore total s | POT kernel result |")
    print("|" + "---|" * 13)
    dense_rows(args.sizes, args.eps, args.tol)
    if args.cloud:
        cloud_row(args.cloud)


if __name__ == "__main__":
    main()
