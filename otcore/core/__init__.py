"""What every solver shares: the result type, plan operators, the fixed-point loop, implicit
differentiation and its conjugate-gradient solve, and input preparation."""

from otcore.core.loop import SinkhornProgress
from otcore.core.result import OTResult

__all__ = ["OTResult", "SinkhornProgress"]
