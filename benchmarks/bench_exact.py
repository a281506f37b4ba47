"""Exact OT (otcore.emd vs POT's ot.emd2) and the Sinkhorn divergence (vs POT and GeomLoss).

``Divergence``: the value alone at eps = 0.1. ``DivergenceGrad``: value and gradient w.r.t. x
(a loss's forward and backward) at GeomLoss's blur 0.05 and 0.5, with each implementation's
error against a float64 Newton (``otcore.sns``) reference, so that times compare at a stated
accuracy.
"""

from __future__ import annotations

import torch

from . import peers, problems


class Emd(peers.PeerCase):
    params = (["otcore", "pot_log"], [200, 1000])
    param_names = ("impl", "n")

    task = "emd"

    def setup(self, impl, n):
        x, y = problems.clouds(n)
        a, b = problems.weighted_histograms(n)
        self.prepare_case(impl, torch.device("cpu"), [torch.cdist(x, y) ** 2, a, b])
        self.run()  # warm-up

    def time_emd(self, *params):
        self.run()

    def track_best_seconds(self, *params):
        """Best of 10 solves (robust to one cold call, which the quick profile's single timing is not)."""
        return self.best_seconds(repeats=10)

    track_best_seconds.unit = "seconds"


class Divergence(peers.PeerCase):
    params = (["otcore", "otcore_scaled", "otcore_tol1e-2", "pot_log", "geomloss", "geomloss_online", "flash_sinkhorn"],
              problems.by_profile([500], [500, 2000]), problems.DEVICES)
    param_names = ("impl", "n", "device")
    timeout = 600

    task = "divergence"

    def setup(self, refs, impl, n, device):
        device = problems.device_or_skip(device)
        x, y = problems.clouds(n, d=3)
        self.prepare_case(impl, device, [x.float().to(device), y.float().to(device)], eps=0.1, tol=1e-4)
        self.run()

    def time_divergence(self, refs, *params):
        self.run()

    def setup_cache(self):
        """Reference divergences (otcore, float64, tol 1e-8), computed once for every n."""
        import otcore

        refs = {}
        for n in self.params[1]:
            x, y = problems.clouds(n, d=3)
            refs[n] = float(otcore.sinkhorn_divergence(x, y, eps=0.1, tol=1e-8, max_iter=20_000))
        return refs

    def track_error(self, refs, impl, n, device):
        """|S - reference| / reference (POT's divergence omits the entropy term: it differs by design)."""
        return abs(self.peer.summarize(self.run()).value - refs[n]) / refs[n]

    track_error.unit = "relative"


class DivergenceGrad(peers.PeerCase):
    """Forward + backward of the divergence between 3-D clouds (float32), at GeomLoss's
    ``blur`` (eps = 2 blur^2 for otcore's |x - y|^2). ``otcore``: default tol (marginal error
    1e-4); ``otcore_tol1e-2``; ``otcore_annealed``: GeomLoss's recipe (annealing by 0.5, two
    iterations at eps, no stopping test); ``geomloss``: ``SamplesLoss("sinkhorn", p=2,
    blur=blur, scaling=0.5)``, tensorised."""

    params = (["otcore", "otcore_tol1e-2", "otcore_annealed", "geomloss"], problems.by_profile([500], [500, 2000]),
              [0.05, 0.5])
    param_names = ("impl", "n", "blur")
    timeout = 900

    task = "divergence"

    def setup(self, refs, impl, n, blur):
        x, y = problems.clouds(n, d=3)
        self.prepare_case(impl, torch.device("cpu"), [x.float(), y.float()], eps=2 * blur**2, tol=1e-4, grad=True)
        self.run()

    def setup_cache(self):
        """S = OT(x, y) - OT(x, x) / 2 - OT(y, y) / 2 from float64 ``otcore.sns`` solves to marginal
        error 1e-10 on the dense costs (Newton's method: quick at small eps, where Sinkhorn is not)."""
        import otcore

        refs = {}
        for n in self.params[1]:
            x, y = problems.clouds(n, d=3)
            for blur in self.params[2]:
                values = [float(otcore.sns(torch.cdist(p, q) ** 2, eps=2 * blur**2, tol=1e-10, max_iter=1000).value)
                          for p, q in ((x, y), (x, x), (y, y))]
                refs[n, blur] = values[0] - 0.5 * (values[1] + values[2])
        return refs

    def time_forward_backward(self, refs, *params):
        self.run()

    def track_best_seconds(self, refs, *params):
        """Best of 5 forward + backward passes (robust to one cold call)."""
        return self.best_seconds(repeats=5)

    track_best_seconds.unit = "seconds"

    def track_error(self, refs, impl, n, blur):
        """|S - reference| / reference."""
        return abs(self.peer.summarize(self.run()).value - refs[n, blur]) / refs[n, blur]

    track_error.unit = "relative"
