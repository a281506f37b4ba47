"""Every python block of docs/getting-started.rst runs as written, in order, in one namespace.

The approach of ``test_readme.py``: a later block may use the names of earlier ones, as a reader
pasting them into one session would; warnings are errors (a ``ConvergenceWarning`` fails); blocks
that mention "cuda" are skipped on machines without a GPU. A python block is a
``.. code-block:: python`` directive (or ``code`` / ``sourcecode``), or a ```python fence.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from conftest import run_python_blocks

PAGE = Path(__file__).resolve().parents[1] / "docs" / "getting-started.rst"
DIRECTIVE = re.compile(r"^([ \t]*)\.\. (?:code-block|code|sourcecode)::[ \t]*python3?[ \t]*$")
OPTION = re.compile(r"^[ \t]*:[\w-]+:")  # a directive option such as ":caption: ..."


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def python_blocks(text: str) -> list[str]:
    """The bodies of the python blocks of a reStructuredText text, dedented, in order.

    A directive's body is every following line indented deeper than the directive (blank lines
    included), less its leading ``:option:`` lines; a fence's body runs to the closing ```.
    """
    lines = text.splitlines()
    blocks = []
    k = 0
    while k < len(lines):
        line = lines[k]
        k += 1
        body = []
        if line.rstrip() == "```python":
            while k < len(lines) and lines[k].rstrip() != "```":
                body.append(lines[k])
                k += 1
            k += 1
        elif match := DIRECTIVE.match(line):
            while k < len(lines) and OPTION.match(lines[k]):
                k += 1
            while k < len(lines) and (not lines[k].strip() or _indent(lines[k]) > len(match[1])):
                body.append(lines[k])
                k += 1
        else:
            continue
        blocks.append(textwrap.dedent("\n".join(body)).strip("\n") + "\n")
    return blocks


def test_python_blocks_are_found():
    text = (
        "Title\n=====\n\n.. code-block:: python\n   :caption: first\n\n   a = 1\n   if a:\n"
        "       b = 2\n\n   c = 3\ntext\n\n.. code-block:: bash\n\n   ls\n\n* item\n\n  .. code:: python\n\n"
        "     d = c\n\n```python\ne = d\n```\n"
    )
    assert python_blocks(text) == ["a = 1\nif a:\n    b = 2\n\nc = 3\n", "d = c\n", "e = d\n"]


def test_getting_started_blocks_run():
    text = PAGE.read_text()
    blocks = python_blocks(text)
    assert blocks, "docs/getting-started.rst has no python blocks"
    # every python directive of the page was read (a misspelt one would silently not run)
    assert len(blocks) == len(re.findall(r"::\s*python", text)) + text.count("```python")
    run_python_blocks(blocks, "docs/getting-started.rst")
