"""Shape matching: the Laplace-Beltrami basis and ShapeMatchingLoss forward + backward.

``LaplacianBasis`` times ``otcore.shapes.laplacian_basis`` (cotangent assembly, the shift-invert
``eigsh`` and the Rayleigh-Ritz step) beside the bare ``scipy.sparse.linalg.eigsh`` call on the
same, pre-assembled matrices (``scipy_eigsh``): the ratio is otcore's overhead over the solver
a user would call directly. No installed package computes the whole loss, so
``ShapeMatchingLossTime`` has no peer; its sliced-Wasserstein piece is compared with POT in
``bench_sliced.py``. Meshes are generated capsules (``otcore.shapes.make_pair``).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch

import otcore
from otcore import shapes

from . import problems

K = 50


class LaplacianBasis:
    """k = 50 eigenpairs of an n-vertex mesh, float64 on the CPU."""

    params = (["otcore", "scipy_eigsh"], problems.by_profile([1_000, 5_000], [1_000, 5_000, 20_000]))
    param_names: ClassVar[list[str]] = ["impl", "n"]
    timeout = 600

    def setup(self, impl, n):
        self.vertices, self.faces, _ = shapes.canonical_mesh("capsule", n_vertices=n, seed=0)
        W, m = shapes.cotangent_laplacian(self.vertices, self.faces)
        self.W, self.M = W.tocsc(), scipy.sparse.diags(m).tocsc()
        self.v0 = np.random.default_rng(0).standard_normal(W.shape[0])

    def time_basis(self, impl, n):
        if impl == "otcore":
            shapes.laplacian_basis(self.vertices, self.faces, K)
        else:
            scipy.sparse.linalg.eigsh(self.W, k=K, M=self.M, sigma=-1e-8, which="LM", v0=self.v0)


class ShapeMatchingLossTime:
    """Forward + backward of ShapeMatchingLoss on n-vertex pairs: d = 64 features, k = 30."""

    params = (["softmax", "sinkhorn"], problems.by_profile([1_000], [1_000, 5_000]), problems.DEVICES)
    param_names: ClassVar[list[str]] = ["soft_map", "n", "device"]
    timeout = 600

    def setup(self, soft_map, n, device):
        device = problems.device_or_skip(device)
        pair = shapes.make_pair("capsule", n_vertices=n, seed=0)
        gen = torch.Generator().manual_seed(0)
        self.spectra = []
        self.features = []
        for v, f in ((pair.vertices_x, pair.faces_x), (pair.vertices_y, pair.faces_y)):
            self.spectra.append(tuple(t.float().to(device) for t in shapes.laplacian_basis(v, f, 30)))
            self.features.append(torch.randn(v.shape[0], 64, generator=gen).to(device))
        self.criterion = otcore.nn.ShapeMatchingLoss(soft_map=soft_map, n_iter=10, seed=0)
        self.time_forward_backward(soft_map, n, device)  # warm-up

    def time_forward_backward(self, soft_map, n, device):
        fx, fy = (f.detach().requires_grad_() for f in self.features)
        self.criterion(fx, fy, *self.spectra).backward()
        if fx.is_cuda:
            torch.cuda.synchronize()
