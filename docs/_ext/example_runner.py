"""Runs the scripts of examples/ for the gallery: their commands, their docstrings, their output.

Sphinx-free, so that the tests can import it. The gallery page lists one command per example, as
a reader would type it from the repository root (``python examples/x.py --quick``, or a launcher
such as ``python -m torch.distributed.run ... examples/x.py``); ``parse_command`` checks one and
``run_example`` runs it with ``python`` replaced by the interpreter building the docs, one thread
per process unless ``OMP_NUM_THREADS`` is set, and ``OTCORE_EXAMPLES_OUT`` naming the folder
where the script saves its figure (each example reads it, defaulting to examples/).
"""

from __future__ import annotations

import ast
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


class Run(NamedTuple):
    """What one run of an example left: ``returncode`` None when it timed out; ``seconds`` wall time."""

    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


def parse_command(line: str) -> tuple[str, list[str]]:
    """(script name, argv) of one gallery command such as ``python examples/x.py --quick``.

    The command starts with ``python`` and names exactly one ``examples/<name>.py`` that exists.
    Raises ValueError (naming the command) otherwise.
    """
    argv = shlex.split(line)
    if not argv or argv[0] != "python":
        raise ValueError(f"command {line!r} does not start with 'python'")
    scripts = [arg for arg in argv if arg.startswith("examples/") and arg.endswith(".py")]
    if len(scripts) != 1:
        raise ValueError(f"command {line!r} names {len(scripts)} scripts of examples/, not one")
    if not (ROOT / scripts[0]).is_file():
        raise ValueError(f"command {line!r}: {scripts[0]} does not exist")
    return Path(scripts[0]).name, argv


def summary_and_run(path: Path) -> tuple[str | None, str | None]:
    """(first docstring line, the paragraph of the docstring that starts with a ``Run`` line).

    The paragraph is joined into one line, from its ``Run`` line on; None where either is missing.
    """
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    if not doc:
        return None, None
    for paragraph in doc.split("\n\n"):
        lines = [line.strip() for line in paragraph.splitlines()]
        start = next((i for i, line in enumerate(lines) if line.startswith("Run")), None)
        if start is not None:
            return doc.splitlines()[0].strip(), " ".join(lines[start:])
    return doc.splitlines()[0].strip(), None


def run_example(argv: list[str], out_dir: Path, timeout: float) -> Run:
    """Runs argv (``argv[0] == "python"``) from the repository root, figures saved into out_dir.

    The command gets its own process group, killed whole at the timeout (a launcher's workers
    included).
    """
    env = dict(os.environ, OTCORE_EXAMPLES_OUT=os.path.relpath(out_dir, ROOT), MPLBACKEND="Agg")
    env.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv[1:]], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        returncode: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        returncode = None
    return Run(returncode, stdout, stderr, time.perf_counter() - start)


def shorten(text: str, max_lines: int) -> str:
    """text with at most max_lines lines: its first and last lines around a note of what was cut."""
    if max_lines < 3:
        raise ValueError(f"max_lines must be at least 3, got {max_lines}")
    lines = text.rstrip("\n").splitlines()
    if len(lines) <= max_lines:
        return "\n".join(lines)
    head = max_lines // 2
    tail = max_lines - head - 1
    return "\n".join([*lines[:head], f"[... {len(lines) - head - tail} lines left out ...]", *lines[-tail:]])
