"""Sparsity-constrained OT (otcore.sparse_ot) vs POT's ot.smooth, on the CPU.

Both solve the semi-dual of Liu, Puigcerver & Blondel (ICLR 2023) with the same k and gamma
(POT: ``smooth_ot_semi_dual(reg=gamma, reg_type="sparsity_constrained", max_nz=k)``, scipy's
L-BFGS-B from zero, 500 iterations at most). ``track_objective`` reports the semi-dual objective
each reaches, evaluated by POT's own formula at each one's potential (higher is better).
"""

from __future__ import annotations

import contextlib
import io
from typing import ClassVar

import torch

from . import problems

K = 4


def _gamma(C: torch.Tensor) -> float:
    """gamma at a tenth of the mean cost, so that k binds (plans of l2-OT alone are denser)."""
    return 0.1 * float(C.mean())


class _Otcore:
    def __init__(self, C, a, b, gamma):
        self.args, self.gamma = (C, a, b), gamma

    def run(self):
        import otcore

        return otcore.sparse_ot(*self.args, k=K, gamma=self.gamma, warn=False).f.numpy()


class _Pot:
    def __init__(self, C, a, b, gamma):
        self.args, self.gamma = (C.numpy(), a.numpy(), b.numpy()), gamma

    def run(self):
        import ot.smooth

        C, a, b = self.args
        with contextlib.redirect_stdout(io.StringIO()):  # POT's sparse projection prints shapes
            _, log = ot.smooth.smooth_ot_semi_dual(a, b, C, self.gamma, reg_type="sparsity_constrained",
                                                   max_nz=K, log=True)
        return log["alpha"]


class Sparse:
    params = (["otcore", "pot"], [100, 1000])
    param_names: ClassVar[list[str]] = ["impl", "n"]
    timeout = 600
    number = 1
    repeat = 1

    def setup(self, impl, n):
        x, y = problems.clouds(n)
        a, b = problems.weighted_histograms(n)
        C = torch.cdist(x, y) ** 2
        self.problem = (C, a, b, _gamma(C))
        self.solver = (_Otcore if impl == "otcore" else _Pot)(*self.problem)

    def time_semi_dual(self, impl, n):
        self.solver.run()

    def track_objective(self, impl, n):
        """Semi-dual objective at the returned potential (POT's formula)."""
        import ot.smooth

        C, a, b, gamma = self.problem
        alpha = self.solver.run()
        regul = ot.smooth.SparsityConstrained(max_nz=K, gamma=gamma)
        with contextlib.redirect_stdout(io.StringIO()):
            return float(ot.smooth.semi_dual_obj_grad(alpha, a.numpy(), b.numpy(), C.numpy(), regul)[0])

    track_objective.unit = "objective"
