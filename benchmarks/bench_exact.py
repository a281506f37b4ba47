"""Exact OT (otcore.emd vs POT's ot.emd2) and the Sinkhorn divergence (vs POT and GeomLoss)."""

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
