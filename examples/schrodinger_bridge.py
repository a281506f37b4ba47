"""Entropic OT between Gaussians with two Schrödinger-bridge solvers, LightSB and ENOT.

The benchmark of the ENOT paper: P0 = N(0, S0), P1 = N(1, S1) with S = R diag(log-spaced in
[0.5, 2]) R^T (random rotations R), cost 1/2 |x - y|^2, eps in {0.1, 1, 10}. Each solver trains
on fresh samples of P0 and P1 at every batch (samplers, as in the papers) and is scored against
the closed-form plan (``otcore.neural.gaussian``): BW2-UVP (%) of the joint (x, y) from 20 000
pairs and cBW2-UVP (%) of the conditionals y | x over 50 inputs with 1 000 draws each. The
papers' level is <= 1-2 %. The column "floor" is the cBW2-UVP of exact samples of pi*(. | x)
(1 000 per input): the metric's own sampling error, which no solver can beat (at d = 64: 0.15 %
at eps = 0.1, 1.0 % at eps = 1, 1.6 % at eps = 10). The table also gives the training time per
1 000 steps (one CPU thread; an ENOT step is an outer step: 10 drift updates and one potential
update, each simulating 20 Euler-Maruyama steps of 3 x 128 MLPs on 128 points). The figure shows
bridge paths from a few points in d = 2 (LightSB: Brownian bridges to its samples; ENOT: its
learned SDE).

Budgets: LightSB runs its defaults (2 000 steps) in every cell. ENOT runs its default networks
at lr 1e-3 (its default, 3e-4, is for 1 000+ steps) for 100 outer steps in d = 2, 300 in d = 16,
and in d = 64 1 500 at eps = 0.1 and 1 and 3 000 at eps = 10 (about 0.14 s per step: 3.5 and
7 minutes per cell). Measured at d = 64 (eps = 0.1 / 1 / 10): BW2-UVP 0.28 / 0.20 / 0.25 %,
cBW2-UVP 1.03 / 1.35 / 1.89 %, the papers' level with far less than their budget (10 000 steps
of 3 x 512 networks). At eps = 10 the conditionals converge slowest: 1 500 steps leave cBW2-UVP
at 3.5 %, and 10 instead of 20 SDE steps halve the time but end at 2.2 % after 3 000 steps.

Run: ``python examples/schrodinger_bridge.py`` (about 18 minutes on one CPU core, 14 of them
ENOT at d = 64) or ``--quick`` (d = 2 and 16, short budgets, about 25 s); saves
``examples/schrodinger_bridge.png``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from otcore.neural import ENOT, LightSB, gaussian

F64 = torch.float64


def problem(d: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def cov():
        Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
        return Q @ torch.diag(torch.logspace(math.log10(0.5), math.log10(2.0), d, dtype=F64)) @ Q.T

    return torch.zeros(d, dtype=F64), cov(), torch.ones(d, dtype=F64), cov()


def draw(mean, cov, n, gen):
    return torch.randn(n, mean.shape[-1], generator=gen, dtype=F64) @ torch.linalg.cholesky(cov).T + mean


def sampler(mean, cov, gen):
    """k -> (k, d) float32 samples of N(mean, cov)."""
    factor, mean = torch.linalg.cholesky(cov).float(), mean.float()
    return lambda k: torch.randn(k, mean.shape[-1], generator=gen) @ factor.T + mean


def score(model, m0, S0, m1, S1, eps, gen) -> tuple[float, float, float]:
    """(BW2-UVP of the joint, cBW2-UVP of the conditionals, cBW2-UVP of exact samples) in %."""
    x = draw(m0, S0, 20000, gen)
    y = model.sample(x.float(), seed=1).double()
    joint = gaussian.bw2_uvp(torch.cat([x, y], 1), *gaussian.eot_plan(m0, S0, m1, S1, eps=eps))
    inputs = x[:50]
    cond = model.sample(inputs.float().repeat_interleave(1000, 0), seed=2).double().reshape(50, 1000, -1)
    mean, cov = gaussian.eot_conditional(inputs, m0, S0, m1, S1, eps=eps)
    exact = mean[:, None] + torch.randn(50, 1000, mean.shape[-1], generator=gen, dtype=F64) @ torch.linalg.cholesky(cov).T
    floor = gaussian.cbw2_uvp(inputs, exact, m0, S0, m1, S1, eps=eps)
    return float(joint), float(gaussian.cbw2_uvp(inputs, cond, m0, S0, m1, S1, eps=eps)), float(floor)


def runs(d: int, eps: float, quick: bool):
    """(name, model, fit options) for one cell of the table."""
    if quick:
        out = [("LightSB", LightSB(d, eps=eps), {"n_steps": 1000})]
        if d == 2:
            out.append(("ENOT", ENOT(d, eps=eps, hidden=(64, 64, 64), n_sde_steps=10), {"n_steps": 150, "lr": 1e-3}))
        return out
    out = [("LightSB", LightSB(d, eps=eps), {})]
    n_steps = {2: 100, 16: 300}.get(d, 3000 if eps >= 10 else 1500)
    out.append(("ENOT", ENOT(d, eps=eps), {"n_steps": n_steps, "lr": 1e-3}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d in {2, 16}, short budgets (well under a minute)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small batches: threads only add overhead on a CPU
    dims = (2, 16) if args.quick else (2, 16, 64)
    epsilons = (0.1, 1.0, 10.0)
    rows, models = [], {}
    for d in dims:
        m0, S0, m1, S1 = problem(d)
        for eps in epsilons:
            for name, model, options in runs(d, eps, args.quick):
                gen = torch.Generator().manual_seed(1)
                steps = []
                start = time.perf_counter()
                model.fit(sampler(m0, S0, gen), sampler(m1, S1, gen), seed=0, progress=False,
                          callback=lambda step, loss, s=steps: s.append(step), **options)
                per_1000 = (time.perf_counter() - start) / len(steps) * 1000
                joint, cond, floor = score(model, m0, S0, m1, S1, eps, torch.Generator().manual_seed(5))
                rows.append((name, d, eps, len(steps), joint, cond, floor, per_1000))
                print(f"{name:>8} d={d:<3} eps={eps:<5} steps={len(steps):<5} BW2-UVP {joint:7.3f} %  "
                      f"cBW2-UVP {cond:7.3f} % (floor {floor:.3f})  {per_1000:7.1f} s / 1000 steps", flush=True)
                if d == 2:
                    models[name, eps] = model

    print("\n| solver | d | eps | steps | BW2-UVP % | cBW2-UVP % | floor % | s / 1000 steps (CPU, 1 thread) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, d, eps, steps, joint, cond, floor, per_1000 in rows:
        flag = "" if max(joint, cond) <= 2 else " (above the papers' 1-2 %)"
        print(f"| {name} | {d} | {eps} | {steps} | {joint:.3f} | {cond:.3f}{flag} | {floor:.3f} | {per_1000:.1f} |")

    names = sorted({name for name, _ in models})
    fig, axes = plt.subplots(len(names), len(epsilons), figsize=(5 * len(epsilons), 4.5 * len(names)),
                             squeeze=False)
    m0, S0, m1, S1 = problem(2)
    gen = torch.Generator().manual_seed(2)
    starts = draw(m0, S0, 12, gen).float()
    for i, name in enumerate(names):
        for j, eps in enumerate(epsilons):
            ax = axes[i, j]
            model = models[name, eps]
            paths = model.trajectory(starts, 50, seed=0) if name == "LightSB" else model.trajectory(starts, seed=0)
            ends = model.sample(draw(m0, S0, 2000, gen).float(), seed=3)
            ax.scatter(*draw(m1, S1, 2000, gen).T, s=2, c="tab:orange", alpha=0.2, label="P1 samples")
            ax.scatter(*ends.T, s=2, c="tab:green", alpha=0.2, label="model samples")
            for path in paths:
                ax.plot(*path.T, lw=0.8, c="k", alpha=0.7)
            ax.scatter(*starts.T, s=12, c="tab:blue", zorder=3, label="x")
            ax.set_title(f"{name}, eps = {eps}")
            ax.set_aspect("equal")
    axes[0, 0].legend(loc="upper left", markerscale=4)
    fig.suptitle("Schrödinger-bridge paths between 2-D Gaussians (cost 1/2|x-y|^2)")
    fig.tight_layout()
    out = Path(os.environ.get("OTCORE_EXAMPLES_OUT", Path(__file__).parent)) / "schrodinger_bridge.png"
    fig.savefig(out, dpi=100)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
