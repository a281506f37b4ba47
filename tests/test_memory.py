"""The PointCloud path never allocates an n x m array."""

import subprocess
import sys
import textwrap


def test_point_cloud_sinkhorn_stays_in_linear_memory():
    n = 20_000  # n x n float32 would be 1.6 GB; the blocked path needs a few MB
    code = textwrap.dedent(f"""
        import resource, torch, otcore
        torch.manual_seed(0)
        x, y = torch.randn({n}, 3), torch.randn({n}, 3) + 0.5
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        res = otcore.sinkhorn(otcore.PointCloud(x, y), eps=0.5, max_iter=2, warn=False)
        float(res.value), float(res.transport_cost), res.apply(torch.ones({n}))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((peak - base) * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr
    grown = int(out.stdout.strip().splitlines()[-1])
    assert grown < 300e6, f"peak memory grew by {grown / 1e6:.0f} MB"
