"""Whether the Triton kernels can run here, decided without importing Triton at package import."""

from __future__ import annotations

import functools
import os


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_import_error() -> str | None:
    """Why ``import triton`` fails (None when it works). Imports Triton on the first call."""
    try:
        import triton  # noqa: F401
    except Exception as err:  # noqa: BLE001 (ImportError, or a broken install raising anything)
        return f"triton does not import ({type(err).__name__}: {err})"
    return None


def triton_version() -> str | None:
    """The installed Triton version, or None."""
    if triton_import_error() is not None:
        return None
    import triton

    return triton.__version__
