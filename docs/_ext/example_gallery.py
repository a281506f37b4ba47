"""The ``example-gallery`` directive: runs every script of examples/ and shows what it printed and drew.

Its content is one command per line, as typed from the repository root, e.g.::

    .. example-gallery::
       :timeout: 120

       python examples/demo.py
       python examples/schrodinger_bridge.py --quick

Each command is run (``example_runner.run_example``: the repository root as working directory,
a fresh folder under the doctree directory as ``OTCORE_EXAMPLES_OUT``) and gets a section: the
script's name as title, the first line of its docstring, its ``Run`` paragraph, the command
with its wall time, its stdout (a literal block of at most ``MAX_LINES`` lines) and the PNG
figures it saved (copied into the HTML build by Sphinx, as any image). Each of these is a warning,
so that ``make docs`` (warnings as errors) fails: a script of examples/ without a command, a
command that does not parse, a script without a docstring or a ``Run`` paragraph, a run that
fails or outlives ``:timeout:`` seconds (default 120), a run that saves no figure.
"""

import os
import shutil
from pathlib import Path
from typing import ClassVar

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from example_runner import EXAMPLES, parse_command, run_example, shorten, summary_and_run
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

MAX_LINES = 40  # of an example's stdout shown (the first and last ones)


class ExampleGallery(SphinxDirective):
    """One executed section per command of the content (see the module docstring)."""

    has_content = True
    option_spec: ClassVar = {"timeout": directives.positive_int}

    def run(self):
        commands = {}  # script name -> (argv, line of its command in the page)
        for line, (_, offset) in zip(self.content, self.content.items, strict=True):
            if not line.strip():
                continue
            try:
                name, argv = parse_command(line)
            except ValueError as err:
                self._warn(str(err), offset + 1)
                continue
            if name in commands:
                self._warn(f"examples/{name} has two commands", offset + 1)
            commands[name] = argv, offset + 1
        for path in sorted(EXAMPLES.glob("*.py")):
            self.env.note_dependency(str(path))
            if path.name not in commands:
                self._warn(f"examples/{path.name} has no command in the gallery", self.lineno)
        return [self._section(name, argv, lineno) for name, (argv, lineno) in commands.items()]

    def _warn(self, message, lineno):
        logger.warning(message, location=(self.env.docname, lineno))

    def _section(self, name, argv, lineno):
        """The section of one example: docstring paragraphs, command, stdout, figures."""
        summary, run_paragraph = summary_and_run(EXAMPLES / name)
        if summary is None or run_paragraph is None:
            self._warn(f"examples/{name} lacks " + ("a module docstring" if summary is None
                                                     else "a 'Run' paragraph in its docstring"), lineno)
        out_dir = Path(self.env.doctreedir) / "gallery" / Path(name).stem
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        command = " ".join(argv)
        timeout = self.options.get("timeout", 120)
        result = run_example(argv, out_dir, timeout)
        figures = sorted(out_dir.glob("*.png"))
        if result.returncode is None:
            status = f"stopped after {timeout} s"
            self._warn(f"{command} still running after {timeout} s, stopped", lineno)
        elif result.returncode != 0:
            status = f"failed with exit status {result.returncode}"
            self._warn(f"{command} {status}:\n{shorten(result.stderr, 20)}", lineno)
        else:
            status = f"{result.seconds:.1f} s"
            if not figures:
                self._warn(f"{command} saved no figure (.png) in OTCORE_EXAMPLES_OUT", lineno)

        docdir = Path(self.env.doc2path(self.env.docname)).parent
        stdout = shorten(result.stdout, MAX_LINES) or "(nothing printed)"
        lines = [summary or "", "", run_paragraph or "", "",
                 f"Run by this build as ``{command}`` ({status}), which printed:", "",
                 ".. code-block:: text", ""]
        lines += ["   " + line.expandtabs() for line in stdout.splitlines()] + [""]
        for figure in figures:
            lines += [f".. image:: {Path(os.path.relpath(figure, docdir)).as_posix()}",
                      f"   :alt: the figure saved by examples/{name}", ""]

        section = nodes.section(ids=[nodes.make_id(f"example-{name}")], names=[nodes.fully_normalize_name(name)])
        section += nodes.title("", "", nodes.literal(text=name))
        self.state.document.note_implicit_target(section, section)
        self.state.nested_parse(StringList(lines, source=str(EXAMPLES / name)), self.content_offset, section)
        return section


def setup(app):
    app.add_directive("example-gallery", ExampleGallery)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
