"""Warnings raised by otcore."""


class ConvergenceWarning(UserWarning):
    """A solver stopped before reaching its tolerance (or on a non-finite iterate)."""
