"""Exact OT (otcore.emd vs POT's ot.emd2) and the Sinkhorn divergence (vs POT and GeomLoss)."""

from __future__ import annotations

import torch

from . import peers, problems


class Emd:
    params = (["otcore", "pot_log"], [200, 1000])
    param_names = ["impl", "n"]

    def setup(self, impl, n):
        self.peer = peers.get(impl, "emd", torch.device("cpu"))
        x, y = problems.clouds(n)
        a, b = problems.weighted_histograms(n)
        self.inputs = self.peer.prepare([torch.cdist(x, y) ** 2, a, b])

    def time_emd(self, *params):
        self.peer.run("emd", self.inputs)


class Divergence:
    params = (["otcore", "pot_log", "geomloss", "geomloss_online", "flash_sinkhorn"], [500, 2000], ["cpu", "cuda"])
    param_names = ["impl", "n", "device"]
    timeout = 600

    def setup(self, refs, impl, n, device):
        self.device = problems.device_or_skip(device)
        self.peer = peers.get(impl, "divergence", self.device)
        x, y = problems.clouds(n, d=3)
        self.inputs = self.peer.prepare([x.float().to(self.device), y.float().to(self.device)])
        self.options = dict(eps=0.1, tol=1e-4)
        self.run()

    def run(self):
        out = self.peer.run("divergence", self.inputs, **self.options)
        problems.synchronize(self.device)
        return out

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
