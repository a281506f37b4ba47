"""The documentation's executable parts: getting-started's python blocks, the gallery's commands.

Every python block of docs/getting-started.rst runs as written, in order, in one namespace (the
approach of ``test_readme.py``): a later block may use the names of earlier ones, as a reader
pasting them into one session would; warnings are errors (a ``ConvergenceWarning`` fails); blocks
that mention "cuda" are skipped on machines without a GPU. A python block is a
``.. code-block:: python`` directive (or ``code`` / ``sourcecode``), or a ```python fence.

The gallery (docs/gallery.rst, ``docs/_ext/example_runner.py``) is checked without running the
examples, which ``make docs`` does: every script of examples/ has one command that parses, a
summary and a ``Run`` paragraph; the runner's command parsing, output shortening, exit status,
timeout and environment are checked on tiny commands.
"""

from __future__ import annotations

import importlib.util
import re
import textwrap
from pathlib import Path

import pytest
from conftest import run_python_blocks

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "getting-started.rst"
GALLERY = ROOT / "docs" / "gallery.rst"
_spec = importlib.util.spec_from_file_location("example_runner", ROOT / "docs" / "_ext" / "example_runner.py")
runner = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runner)
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


def gallery_commands(text: str) -> list[str]:
    """The content lines of the ``example-gallery`` directive of a page (options and blanks left out)."""
    lines = text.splitlines()
    start = lines.index(".. example-gallery::") + 1
    body = []
    for line in lines[start:]:
        if line.strip() and _indent(line) == 0:
            break
        body.append(line.strip())
    return [line for line in body if line and not OPTION.match(line)]


def test_gallery_has_one_command_per_example():
    commands = gallery_commands(GALLERY.read_text())
    names = [runner.parse_command(line)[0] for line in commands]
    assert sorted(names) == sorted(path.name for path in runner.EXAMPLES.glob("*.py"))
    for name in names:
        summary, run = runner.summary_and_run(runner.EXAMPLES / name)
        assert summary and run and run.startswith("Run"), name


def test_parse_command():
    assert runner.parse_command("python examples/schrodinger_bridge.py --quick") == (
        "schrodinger_bridge.py", ["python", "examples/schrodinger_bridge.py", "--quick"])
    launcher = "python -m torch.distributed.run --nproc_per_node=2 examples/distributed_sinkhorn.py"
    assert runner.parse_command(launcher) == ("distributed_sinkhorn.py", launcher.split())
    for bad, reason in [("ls examples/demo.py", "does not start with 'python'"),
                        ("python -c pass", "names 0 scripts"),
                        ("python examples/demo.py examples/sparse_ot.py", "names 2 scripts"),
                        ("python examples/no_such_example.py", "does not exist")]:
        with pytest.raises(ValueError, match=reason):
            runner.parse_command(bad)


def test_shorten():
    text = "\n".join(f"line {k}" for k in range(10)) + "\n"
    assert runner.shorten(text, 10) == text.rstrip("\n")
    assert runner.shorten(text, 5).splitlines() == ["line 0", "line 1", "[... 6 lines left out ...]", "line 8",
                                                    "line 9"]
    with pytest.raises(ValueError, match="max_lines"):
        runner.shorten(text, 2)


def test_run_example_environment_and_exit_status(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    show = "import os; print(os.environ['OTCORE_EXAMPLES_OUT'], os.environ['OMP_NUM_THREADS'], os.getcwd())"
    result = runner.run_example(["python", "-c", show], tmp_path, timeout=60)
    out_dir, threads, cwd = result.stdout.split()
    assert result.returncode == 0
    assert (runner.ROOT / out_dir).resolve() == tmp_path.resolve()
    assert (threads, Path(cwd).resolve()) == ("1", runner.ROOT)
    failed = runner.run_example(["python", "-c", "import sys; sys.exit('boom')"], tmp_path, timeout=60)
    assert (failed.returncode, failed.stderr.strip()) == (1, "boom")


def test_run_example_timeout(tmp_path):
    result = runner.run_example(["python", "-c", "print('started', flush=True); import time; time.sleep(60)"],
                                tmp_path, timeout=1)
    assert result.returncode is None
    assert result.stdout == "started\n"
