"""The built wheel holds every module of the source tree (kernels/ as otcore.kernels) and
py.typed, and the package imports from it alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _source_modules() -> set[str]:
    """Wheel paths of every .py file under otcore/ and kernels/ (the latter as otcore/kernels/)."""
    paths = {p.relative_to(ROOT).as_posix() for p in (ROOT / "otcore").rglob("*.py")}
    paths |= {"otcore/kernels/" + p.relative_to(ROOT / "kernels").as_posix() for p in (ROOT / "kernels").rglob("*.py")}
    return paths


def test_wheel_contains_every_module_and_imports(tmp_path):
    source = tmp_path / "source"  # a clean copy: no stale build/ of the checkout can leak in
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("otcore", "kernels"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("otcore-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert _source_modules() - names == set()
    assert "otcore/py.typed" in names
    assert not any(n.startswith(("kernels/", "tests/", "benchmarks/")) for n in names)

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import otcore, otcore.kernels.softmin.naive, otcore.kernels.softmin.blocked; "
            "print(otcore.__file__); print(otcore.sinkhorn(__import__('torch').rand(3, 4), eps=1.0).converged.tolist())")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=tmp_path)
    where, converged = out.stdout.split()
    assert Path(where).is_relative_to(target)
    assert converged == "True"
