"""asv benchmarks: otcore side by side with its peers (see ``peers.py``).

Every benchmark class takes the implementation as its first asv parameter, so one run times
otcore and the peers on the same problem; ``python -m benchmarks.report`` prints the ratios.
Profiles (``OTCORE_BENCH``, see ``problems.py``): ``make bench`` runs the quick one (the smallest
problem of each comparison, under 10 minutes on 2 CPU cores), ``make bench-full`` every size.
"""
