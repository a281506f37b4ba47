"""Read otcore's docstrings as the plain text they are written in, not as reStructuredText.

The docstrings mark code with ````double backticks```` and write maths as plain text:
``|P1 - a|_1``, ``|x - y|^2``, scikit-learn-style attributes such as ``labels_``. In
reStructuredText a ``|`` opens a substitution reference and a word ending in ``_`` is a
hyperlink reference, so these would render wrongly (or fail the build). Before napoleon reads a
docstring, this escapes both outside inline literals and literal blocks; everything else
(napoleon's Google sections, ````literals````, ``Example::`` blocks) is left as it is. It also
keeps napoleon from reading the first line of an attribute's docstring as ``type: description``.
"""

import re

_LITERAL = re.compile(r"(``.+?``)", re.DOTALL)
_TRAILING_UNDERSCORE = re.compile(r"(?<=\w)_(?=[\s.,;:)\]}]|$)", re.MULTILINE)


def _escape(text):
    """``|`` and word-final ``_`` escaped everywhere in text except inside ````...````."""
    parts = _LITERAL.split(text)
    for i in range(0, len(parts), 2):  # even parts lie outside the literals
        parts[i] = _TRAILING_UNDERSCORE.sub(r"\\_", parts[i].replace("|", r"\|"))
    return "".join(parts)


def _indent(line):
    return len(line) - len(line.lstrip())


def escape_plain_text(lines):
    """The docstring's lines with the plain-text markup escaped, literal blocks (``::``) kept."""
    out, prose, block_indent = [], [], None
    for line in lines:
        if block_indent is not None:
            if not line.strip() or _indent(line) > block_indent:
                out.append(line)
                continue
            block_indent = None
        if line.rstrip().endswith("::"):
            out += _escape("\n".join(prose + [line])).split("\n")
            prose, block_indent = [], _indent(line)
            continue
        prose.append(line)
    if prose:
        out += _escape("\n".join(prose)).split("\n")
    return out


def _process_docstring(app, what, name, obj, options, lines):
    lines[:] = escape_plain_text(lines)
    if what in {"attribute", "data", "property"} and lines and lines[0].strip():
        # napoleon reads "text: more" on an attribute's first line as "type: description"; the
        # types here come from the annotations, so an empty comment ("..", invisible) takes the
        # place of that first line and the whole docstring stays description.
        lines[:0] = ["..", ""]


def setup(app):
    app.connect("autodoc-process-docstring", _process_docstring, priority=400)  # before napoleon (500)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
