"""What the neural trainers share: minibatches from tensors or samplers, a progress bar, and
state_dict checkpoints that a run resumes from exactly."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from otcore._validation import _real, check_finite, check_max_iter

Sampler = Callable[[int], torch.Tensor]


def batches(name: str, data, gen: torch.Generator) -> Callable[[int], torch.Tensor]:
    """A function k -> (k, d) batch: rows drawn with replacement from a tensor (by ``gen``), or a
    sampler's output (checked)."""
    if torch.is_tensor(data):
        if data.dim() != 2 or data.shape[0] < 1 or data.shape[1] < 1 or not data.is_floating_point():
            raise ValueError(f"{name} must be a floating (n, d) tensor with n, d >= 1, got {data.dtype} "
                             f"of shape {tuple(data.shape)}")
        if not bool(torch.isfinite(data).all()):
            raise ValueError(f"{name} holds non-finite values")

        def draw(k: int) -> torch.Tensor:
            index = torch.randint(data.shape[0], (k,), generator=gen)
            return data[index.to(data.device)]

        return draw
    if not callable(data):
        raise ValueError(  # noqa: TRY004 (the API contract: ValueError)
            f"{name} must be a tensor or a callable k -> (k, d) tensor, got {type(data).__name__}")

    def sample(k: int) -> torch.Tensor:
        out = data(k)
        if not torch.is_tensor(out) or out.dim() != 2 or out.shape[0] != k or not out.is_floating_point():
            raise ValueError(f"{name}: the sampler must return a floating ({k}, d) tensor, got "
                             f"{getattr(out, 'shape', type(out).__name__)}")
        return out

    return sample


def seeded_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded by ``seed`` (when given; else from the global RNG, so that a
    ``torch.manual_seed`` before the call makes the run repeatable)."""
    gen = torch.Generator()
    if seed is None:
        gen.manual_seed(int(torch.randint(2**62, (1,))))
    else:
        gen.manual_seed(int(_real("seed", seed, "an integer")))
    return gen


def device_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A generator on ``device`` seeded by ``seed``, or None (draws then use the global RNG)."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(int(_real("seed", seed, "an integer")))
    return gen


@contextlib.contextmanager
def progress(n_steps: int, enabled: bool | None, desc: str):
    """Yields ``bar(step, loss, **extra)``, or None when nothing is shown.

    ``enabled``: True shows a tqdm bar (or, without tqdm, prints the loss 10 times); False shows
    nothing; None shows a tqdm bar only when tqdm is installed and stderr is a terminal.
    """
    tqdm = None
    if enabled is not False:
        try:
            from tqdm.auto import tqdm  # type: ignore[no-redef]
        except ImportError:
            tqdm = None
    if enabled is None:
        enabled = tqdm is not None and sys.stderr.isatty()
    if not enabled:
        yield None
        return
    if tqdm is None:
        every = max(1, n_steps // 10)

        def show(step: int, loss: float, **extra) -> None:
            if (step + 1) % every == 0 or step + 1 == n_steps:
                more = "".join(f", {k} {v:.4g}" for k, v in extra.items())
                print(f"{desc}: step {step + 1}/{n_steps}, loss {loss:.4g}{more}")

        yield show
        return
    with tqdm(total=n_steps, desc=desc) as bar:

        def update(step: int, loss: float, **extra) -> None:
            bar.update(step + 1 - bar.n)
            bar.set_postfix(loss=f"{loss:.4g}", **{k: f"{v:.4g}" for k, v in extra.items()})

        yield update


class Checkpoint:
    """Saves the state of a training run every ``every`` steps to ``path`` and resumes from it.

    ``state`` maps names to objects with ``state_dict``/``load_state_dict`` (modules, optimisers,
    schedulers), ``torch.Generator`` objects (their RNG state) or plain dicts (copied in and out:
    for small extra values such as the best validation loss). The file holds those states and
    the number of steps done; it is written to a temporary file and renamed, so an interrupted
    save never leaves a broken checkpoint. ``path=None`` disables both.
    """

    def __init__(self, path, every: int, state: dict[str, object]):
        if path is not None and not isinstance(path, str | os.PathLike):
            raise ValueError(f"checkpoint must be a path (str or os.PathLike) or None, got {type(path).__name__}")
        self.path = None if path is None else Path(path)
        self.every = check_max_iter("checkpoint_every", every)
        self.state = state

    def resume(self) -> int:
        """Load the checkpoint if there is one; returns the number of steps it had done (0 if none)."""
        if self.path is None or not self.path.exists():
            return 0
        saved = torch.load(self.path, map_location="cpu", weights_only=True)
        missing = set(self.state) - set(saved["state"])
        if missing:
            raise ValueError(f"checkpoint {self.path} lacks {sorted(missing)}: it was written by another trainer")
        for name, obj in self.state.items():
            value = saved["state"][name]
            if isinstance(obj, torch.Generator):
                obj.set_state(value)
            elif isinstance(obj, dict):
                obj.clear()
                obj.update(value)
            else:
                obj.load_state_dict(value)  # type: ignore[attr-defined]  # a module, optimiser or scheduler
        return int(saved["step"])

    def after(self, step: int, n_steps: int) -> None:
        """Called once step ``step`` (0-based) is done: saves every ``every`` steps and at the end."""
        done = step + 1
        if self.path is not None and (done % self.every == 0 or done == n_steps):
            self.save(done)

    def save(self, done: int) -> None:
        assert self.path is not None  # after() saves only with a path
        states: dict[str, object] = {}
        for name, obj in self.state.items():
            if isinstance(obj, torch.Generator):
                states[name] = obj.get_state()
            elif isinstance(obj, dict):
                states[name] = dict(obj)
            else:
                states[name] = obj.state_dict()  # type: ignore[attr-defined]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save({"step": done, "state": states}, tmp)
        os.replace(tmp, self.path)


def model_input(x: torch.Tensor, dim: int, param: torch.Tensor) -> torch.Tensor:
    """Points x (n, dim) given to a fitted model, checked (finite, shape, the model's device) and
    cast to the dtype of its parameter ``param``."""
    check_finite("x", x)
    if x.dim() != 2 or x.shape[-1] != dim:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected (n, {dim})")
    if x.device != param.device:
        raise ValueError(f"x is on {x.device} but the model is on {param.device}; move one of them")
    return x.to(param.dtype)
