"""Fitting a transport map with the Monge gap as regulariser (Uscidda & Cuturi, ICML 2023).

    min_theta  S_eps_fit(T_theta # mu_batch, nu_batch) + lam * M_eps_reg(T_theta; mu_batch)

over minibatches: S is the debiased Sinkhorn divergence (squared-Euclidean cost), M the entropic
Monge gap of ``monge_gap`` (``cost`` chosen by the user). The fitting term makes T push mu onto
nu; the gap makes T optimal for ``cost`` among such maps. In the population limit the gap's eps
does not bias the solution (with T # mu = nu fixed, OT_eps(mu, T # mu) is a constant), so both
eps are taken large enough for Sinkhorn to converge in few iterations.

Reference: Uscidda, Cuturi, "The Monge gap: a regularizer to learn all transport maps", ICML
2023 (Sec. 5); OTT-JAX ``MongeGapEstimator`` and its tutorial (MLP, Adam, batch 256).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import torch

from otcore._validation import _real, check_max_iter, check_positive
from otcore.geometry.costs import parse_cost
from otcore.losses import sinkhorn_divergence
from otcore.neural._training import Checkpoint, Sampler, batches, progress, seeded_generator
from otcore.neural.monge_gap import mean_cost, monge_gap

SCHEDULES = ("cosine", "constant")


class ResidualMLP(torch.nn.Module):
    """T(x) = x + MLP(x): GELU hidden layers, the last layer initialised at 0 (T starts at the
    identity). Input and output (..., dim)."""

    def __init__(self, dim: int, hidden: tuple[int, ...] = (64, 64, 64)):
        super().__init__()
        dim = check_max_iter("dim", dim)
        sizes = (dim, *hidden)
        layers: list[torch.nn.Module] = []
        for n_in, n_out in itertools.pairwise(sizes):
            layers += [torch.nn.Linear(n_in, n_out), torch.nn.GELU()]
        last = torch.nn.Linear(sizes[-1], dim)
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
        self.net = torch.nn.Sequential(*layers, last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


def fit_monge_map(
    x: torch.Tensor | Sampler,
    y: torch.Tensor | Sampler,
    *,
    model: torch.nn.Module | None = None,
    cost="sqeuclidean",
    lam: float | Callable[[int], float] = 1.0,
    n_steps: int = 300,
    batch_size: int = 128,
    lr: float = 3e-3,
    lr_schedule: str | Callable[[int], float] = "cosine",
    fit_relative_eps: float = 0.05,
    gap_relative_eps: float = 0.1,
    sinkhorn_iter: int = 30,
    seed: int | None = None,
    callback: Callable[[int, float], None] | None = None,
    validation: tuple[torch.Tensor, torch.Tensor] | None = None,
    valid_every: int = 50,
    valid_callback: Callable[[int, float], None] | None = None,
    restore_best: bool = True,
    checkpoint=None,
    checkpoint_every: int = 100,
    resume: bool = False,
    verbose: bool = False,
) -> torch.nn.Module:
    """Train a map T from samples of mu (``x``) to samples of nu (``y``) with the Monge gap.

    Each step draws ``batch_size`` source and target points, and takes an Adam step on
    ``sinkhorn_divergence(T(x_b), y_b, eps=eps_fit) + lam * monge_gap(x_b, T(x_b), eps=eps_gap)``.
    Both eps are fixed once, from the first batches: eps_fit = ``fit_relative_eps`` x the mean
    squared distance between target points, eps_gap = ``gap_relative_eps`` x the mean ``cost``
    between source and target points. Every Sinkhorn solve runs at most ``sinkhorn_iter``
    iterations (without a warning if it stops there: the losses are then slightly inexact,
    which training tolerates).

    Args:
        x: (n, d) source samples, or a sampler ``k -> (k, d)`` tensor.
        y: (m, d) target samples, or a sampler.
        model: the map, a module (..., d) -> (..., d) on the samples' device and dtype. Default: a
            ``ResidualMLP(d)`` (hidden 64-64-64, starting at the identity), created in the dtype
            and on the device of the samples.
        cost: the Monge gap's cost (as in ``monge_gap``); the fitting term uses sqeuclidean.
        lam: weight of the Monge gap (>= 0; 0: no regulariser), or a schedule ``step -> weight``
            (OTT's ``regularizer_strength`` schedules).
        n_steps: Adam steps.
        batch_size: points per batch (from each side).
        lr: initial rate.
        lr_schedule: ``"cosine"`` (decay to 0 over ``n_steps``), ``"constant"``, or a function
            ``step -> factor`` multiplying ``lr``.
        fit_relative_eps: eps_fit relative to the mean squared distance between target points
            (see above; > 0).
        gap_relative_eps: eps_gap relative to the mean ``cost`` between source and target points
            (see above; > 0).
        sinkhorn_iter: iteration cap of each Sinkhorn solve.
        seed: seeds the batches (a local generator) and the default model's initialisation (the
            global RNG inside ``torch.random.fork_rng``, so the caller's RNG is untouched). When
            None, the local generator is seeded from the global RNG.
        callback: called as ``callback(step, loss)`` after every step (the loss read on the host).
        validation: held-out ``(x_val, y_val)`` tensors ((n', d), (m', d); a few thousand points
            at most: each evaluation solves Sinkhorn on all of them). Every ``valid_every``
            steps and after the last, the loss with the final weight lam(n_steps - 1) is
            evaluated on them without gradients and passed to ``valid_callback(step,
            valid_loss)``; with ``restore_best`` the returned model has the parameters of the
            best evaluation.
        checkpoint: a path: the model, optimiser, schedule, batch RNG, both eps and the best
            validation state are saved there every ``checkpoint_every`` steps and at the end
            (written to a temporary file and renamed). ``resume=True`` continues from it when
            it exists; with tensors as data and a deterministic model, the resumed run ends
            with the same parameters as an uninterrupted one.
        verbose: show a tqdm bar if tqdm is installed, else print the loss 10 times.

    Speed: about 0.035 s per step at the defaults on one CPU thread (~10 s for 300 steps). Steps
    this small gain nothing from more threads; on a loaded CPU, ``torch.set_num_threads(1)``
    avoids oversubscription, which can make them many times slower.

    Returns:
        The trained model (in eval mode).
    """
    weight = _lam_schedule(lam)
    n_steps = check_max_iter("n_steps", n_steps)
    batch_size = check_max_iter("batch_size", batch_size, minimum=2)
    lr = check_positive("lr", lr)
    fit_relative_eps = check_positive("fit_relative_eps", fit_relative_eps)
    gap_relative_eps = check_positive("gap_relative_eps", gap_relative_eps)
    sinkhorn_iter = check_max_iter("sinkhorn_iter", sinkhorn_iter)
    valid_every = check_max_iter("valid_every", valid_every)
    gen = seeded_generator(seed)
    draw_x, draw_y = batches("x", x, gen), batches("y", y, gen)
    xb, yb = draw_x(batch_size), draw_y(batch_size)
    if xb.shape[-1] != yb.shape[-1]:
        raise ValueError(f"x and y must have the same dimension, got {xb.shape[-1]} and {yb.shape[-1]}")
    if validation is not None:
        validation = _validation_sets(validation, xb.shape[-1])
    if model is None:
        with torch.random.fork_rng(devices=[xb.device] if xb.device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(int(seed))
            model = ResidualMLP(xb.shape[-1]).to(device=xb.device, dtype=xb.dtype)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")  # noqa: TRY004 (API: ValueError)
    run = {"eps_fit": float(fit_relative_eps * mean_cost(yb, yb, "sqeuclidean")),
           "eps_gap": float(gap_relative_eps * mean_cost(xb, yb, parse_cost(cost)))}
    best: dict = {}
    solver: dict[str, Any] = {"max_iter": sinkhorn_iter, "warn": False, "validate": False}

    def objective(xs: torch.Tensor, ys: torch.Tensor, lam_now: float) -> torch.Tensor:
        Tx = model(xs)
        loss = sinkhorn_divergence(Tx, ys, eps=run["eps_fit"], **solver)
        if lam_now > 0:
            loss = loss + lam_now * monge_gap(xs, Tx, cost=cost, eps=run["eps_gap"], **solver)
        return loss

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(lr_schedule, n_steps))
    saver = Checkpoint(checkpoint, checkpoint_every, {"model": model, "optimizer": optimizer, "schedule": schedule,
                                                      "generator": gen, "run": run, "best": best})
    start = saver.resume() if resume else 0
    final_lam = weight(n_steps - 1)
    model.train()
    with progress(n_steps, verbose, "fit_monge_map") as bar:
        for step in range(start, n_steps):
            if step > 0:
                xb, yb = draw_x(batch_size), draw_y(batch_size)
            loss = objective(xb, yb, weight(step))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            extra = {}
            if validation is not None and ((step + 1) % valid_every == 0 or step + 1 == n_steps):
                model.eval()
                with torch.no_grad():
                    valid = float(objective(*validation, final_lam))
                model.train()
                extra["valid"] = valid
                if valid_callback is not None:
                    valid_callback(step, valid)
                if restore_best and (not best or valid < best["loss"]):
                    best.update(loss=valid, state={k: v.detach().clone() for k, v in model.state_dict().items()})
            if callback is not None or bar is not None:
                value = float(loss.detach())
                if callback is not None:
                    callback(step, value)
                if bar is not None:
                    bar(step, value, **extra)
            saver.after(step, n_steps)
    if best:
        model.load_state_dict(best["state"])
    return model.eval()


def _lam_schedule(lam) -> Callable[[int], float]:
    """``step -> weight`` from a number or a function, checking each weight is finite and >= 0."""
    def check(value) -> float:
        value = _real("lam", value, "a number >= 0")
        if not value >= 0 or value == math.inf:
            raise ValueError(f"lam must be finite and >= 0, got {value!r}")
        return value

    if callable(lam):
        return lambda step: check(lam(step))
    constant = check(lam)
    return lambda step: constant


def _lr_factor(lr_schedule, n_steps: int) -> Callable[[int], float]:
    """The multiplier of lr at each step (LambdaLR's ``lr_lambda``)."""
    if callable(lr_schedule):
        return lr_schedule
    if lr_schedule == "cosine":
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, n_steps) / n_steps))
    if lr_schedule == "constant":
        return lambda step: 1.0
    raise ValueError(f"lr_schedule must be one of {SCHEDULES} or a function step -> factor, got {lr_schedule!r}")


def _validation_sets(validation, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(validation, tuple | list) or len(validation) != 2:
        raise ValueError(f"validation must be a pair (x_val, y_val) of tensors, got {type(validation).__name__}")
    for name, t in zip(("validation x", "validation y"), validation, strict=True):
        if not torch.is_tensor(t) or t.dim() != 2 or t.shape[-1] != d or t.shape[0] < 2 or not t.is_floating_point():
            raise ValueError(f"validation: {name} must be a floating (n, {d}) tensor with n >= 2, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"validation: {name} holds non-finite values")
    return validation[0], validation[1]
