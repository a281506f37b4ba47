"""Warnings raised by otcore."""


class ConvergenceWarning(UserWarning):
    """A solver stopped before reaching its tolerance (or on a non-finite iterate)."""


class PrecisionWarning(UserWarning):
    """A result does not fit its dtype: a half-precision gradient beyond the dtype's range."""
