"""otcore: optimal-transport solvers for PyTorch.

Cost first, weights optional (uniform when None), options as keywords; every input may carry a
leading batch dimension, and outputs keep the input's dtype and device.
"""

from otcore.config import show_config
from otcore.geometry import CostMatrix, Geometry, PointCloud
from otcore.solvers import OTResult, SinkhornProgress, emd, sinkhorn, sinkhorn_divergence, sns
from otcore.warnings import ConvergenceWarning

__version__ = "0.1.0"

__all__ = [
    "ConvergenceWarning",
    "CostMatrix",
    "Geometry",
    "OTResult",
    "PointCloud",
    "SinkhornProgress",
    "emd",
    "show_config",
    "sinkhorn",
    "sinkhorn_divergence",
    "sns",
]
