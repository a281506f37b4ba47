"""Every ```python block of README.md runs as written, in order, in one namespace.

A later block may use the names of earlier ones, as a reader pasting them into one session
would. Warnings are errors, so a ``ConvergenceWarning`` (a README example that stops short)
fails. Blocks that need CUDA (they mention "cuda") are skipped on machines without a GPU.
"""

from __future__ import annotations

import re
from pathlib import Path

from conftest import run_python_blocks

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a Markdown text, in order."""
    return FENCE.findall(text)


def test_python_blocks_are_found():
    blocks = python_blocks("x\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = a\n```\n")
    assert blocks == ["a = 1\n", "b = a\n"]


def test_readme_blocks_run():
    blocks = python_blocks(README.read_text())
    assert blocks, "README.md has no python blocks"
    run_python_blocks(blocks, "README.md")
