"""otcore: optimal-transport solvers for PyTorch.

Cost first, weights optional (uniform when None), options as keywords; every input may carry a
leading batch dimension, and outputs keep the input's dtype and device.
"""

from importlib import metadata

from otcore import neural, nn, shapes
from otcore.core import OTResult, SinkhornProgress
from otcore.geometry import CostMatrix, Geometry, PointCloud
from otcore.geometry.backends import show_config
from otcore.losses import sinkhorn_divergence
from otcore.solvers import (
    emd,
    energy_sliced_wasserstein,
    max_sliced_wasserstein,
    sinkhorn,
    sliced_wasserstein,
    sns,
    wasserstein_1d,
)
from otcore.solvers.sparse import sparse_ot
from otcore.warnings import ConvergenceWarning, PrecisionWarning

__version__ = metadata.version("otcore")

__all__ = [
    "ConvergenceWarning",
    "CostMatrix",
    "Geometry",
    "OTResult",
    "PointCloud",
    "PrecisionWarning",
    "SinkhornProgress",
    "emd",
    "energy_sliced_wasserstein",
    "max_sliced_wasserstein",
    "neural",
    "nn",
    "shapes",
    "show_config",
    "sinkhorn",
    "sinkhorn_divergence",
    "sliced_wasserstein",
    "sns",
    "sparse_ot",
    "wasserstein_1d",
]
