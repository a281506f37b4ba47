"""Sphinx configuration of the otcore documentation (``make docs``: HTML in docs/_build/html).

The API pages are generated from the docstrings (Google style, read by napoleon); nothing is
fetched at build time (no intersphinx). The gallery runs every script of examples/ and shows its
output and figure (the ``example-gallery`` directive of ``_ext/example_gallery.py``).
"""

import sys
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "otcore"
author = "otcore contributors"
copyright = "otcore contributors"
release = metadata.version("otcore")
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "example_gallery",
    "plain_docstrings",
]

exclude_patterns = ["_build"]
root_doc = "index"

# Google-style docstrings; "Attributes:" sections as :ivar: fields, so that dataclass fields are
# not described twice (once by napoleon, once by autodoc).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True

autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "description"  # annotations beside the documented arguments, short signatures
autodoc_typehints_description_target = "documented"
autodoc_class_signature = "separated"  # __init__'s signature under the class, not in its title
autodoc_inherit_docstrings = False  # torch.nn.Module's forward/extra_repr docstrings are not ours

html_theme = "furo"
html_title = f"otcore {release}"
