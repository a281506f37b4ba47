"""The ``example-list`` directive: one entry per script in examples/, read from its docstring.

Each entry is the script's name, the first line of its module docstring (one sentence) and its
docstring from the line that starts with ``Run`` to the end of that paragraph (the command, its
run time, what it saves). A script without a docstring or without a ``Run`` paragraph is reported as a warning, so that
``make docs`` (warnings as errors) fails until the new example says how to run it. The scripts
are not executed.
"""

import ast
from pathlib import Path

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _summary_and_run(path):
    """(first docstring line, the ``Run`` paragraph) of a script; None where either is missing."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    if not doc:
        return None, None
    for paragraph in doc.split("\n\n"):
        lines = [line.strip() for line in paragraph.splitlines()]
        start = next((i for i, line in enumerate(lines) if line.startswith("Run")), None)
        if start is not None:
            return doc.splitlines()[0].strip(), " ".join(lines[start:])
    return doc.splitlines()[0].strip(), None


class ExampleList(SphinxDirective):
    """Lists every ``examples/*.py`` with its summary and how to run it."""

    def run(self):
        lines = []
        for path in sorted(EXAMPLES.glob("*.py")):
            self.env.note_dependency(str(path))
            summary, run = _summary_and_run(path)
            if summary is None or run is None:
                missing = "a module docstring" if summary is None else "a 'Run' paragraph in its docstring"
                logger.warning("examples/%s lacks %s", path.name, missing, location=(self.env.docname, self.lineno))
                continue
            lines += [f"``examples/{path.name}``", f"   {summary}", "", f"   {run}", ""]
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source=str(EXAMPLES)), self.content_offset, container)
        return container.children


def setup(app):
    app.add_directive("example-list", ExampleList)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
