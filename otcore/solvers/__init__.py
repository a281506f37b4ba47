"""Solvers: each takes a cost (tensor or geometry) and weights and returns an ``OTResult``; the
sliced family (``sliced``, 1-D OT in ``ot1d``) takes points and returns distances as tensors."""

from otcore.solvers.entropic import sinkhorn, sns
from otcore.solvers.exact import emd
from otcore.solvers.ot1d import wasserstein_1d
from otcore.solvers.sliced import energy_sliced_wasserstein, max_sliced_wasserstein, sliced_wasserstein
from otcore.solvers.sparse import sparse_ot

__all__ = [
    "emd",
    "energy_sliced_wasserstein",
    "max_sliced_wasserstein",
    "sinkhorn",
    "sliced_wasserstein",
    "sns",
    "sparse_ot",
    "wasserstein_1d",
]
