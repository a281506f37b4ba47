"""Print the latest asv results as a compact markdown table of peer / otcore ratios.

Usage: python -m benchmarks.report [--results .asv/results] [--device cpu|cuda] [--out FILE]

For every benchmark whose first parameter is the implementation, each row is one problem (the
other parameters) and each column one implementation: its measurement and, for the others, the
ratio to the first otcore column (``otcore``, ``otcore_sns``, ``otcore_loss``, ...; > 1: otcore is
faster or smaller). Skipped or failed runs print "-".
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import platform
from pathlib import Path

from .problems import PROFILE


def latest_results(root: Path) -> Path:
    files = [p for p in root.glob("*/*.json") if p.name != "machine.json"]
    if not files:
        raise SystemExit(f"no asv results under {root}; run `make bench` first")
    return max(files, key=lambda p: p.stat().st_mtime)


def fmt(value: float, unit: str) -> str:
    if unit == "seconds":
        return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.3g} s"
    if unit == "bytes":
        return f"{value / 2**20:.3g} MiB"
    return f"{value:.3g}"


def tables(data: dict, benchmarks: dict, device: str | None) -> list[str]:
    columns = data["result_columns"]
    i_result, i_params = columns.index("result"), columns.index("params")
    lines = []
    for name, row in sorted(data["results"].items()):
        meta = benchmarks.get(name, {})
        names = meta.get("param_names", [])
        if not names or names[0] != "impl" or row[i_result] is None:
            continue
        params = row[i_params]
        values = dict(zip(itertools.product(*params), row[i_result]))
        impls = [p.strip("'") for p in params[0]]
        base_impl = next((impl for impl in impls if impl.startswith("otcore")), None)
        unit = meta.get("unit", "")
        keep = [i for i, n in enumerate(names[1:], 1) if n != "device"]
        header_rows = []
        for rest in itertools.product(*params[1:]):
            if device is not None and "device" in names and rest[names.index("device") - 1].strip("'") != device:
                continue
            cells = {impl: values.get((f"'{impl}'", *rest)) for impl in impls}
            if all(v is None or math.isnan(v) for v in cells.values()):
                continue
            base = cells.get(base_impl)
            text = []
            for impl in impls:
                v = cells[impl]
                if v is None or math.isnan(v):
                    text.append("-")
                elif impl == base_impl or base in (None, 0) or math.isnan(base) or unit not in ("seconds", "bytes"):
                    text.append(fmt(v, unit))
                else:
                    text.append(f"{fmt(v, unit)} ({v / base:.2g}x)")
            label = ", ".join(f"{names[i]}={rest[i - 1].strip(chr(39))}" for i in keep)
            header_rows.append(f"| {label} | " + " | ".join(text) + " |")
        if header_rows:
            lines += ["", f"**{name}** ({unit})", "", "| problem | " + " | ".join(impls) + " |",
                      "|---" * (len(impls) + 1) + "|", *header_rows]
    return lines


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", default=".asv/results")
    parser.add_argument("--device", default=None, help="keep only rows with this device parameter")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args()
    path = latest_results(Path(args.results))
    data = json.loads(path.read_text())
    benchmarks = json.loads((Path(args.results) / "benchmarks.json").read_text())
    machine = json.loads((path.parent / "machine.json").read_text())
    when = datetime.datetime.fromtimestamp(path.stat().st_mtime).date()
    head = (f"asv results {path.name} (commit {data.get('commit_hash', '?')[:8]}), {when}, machine "
            f"{machine.get('machine', platform.node())}: {machine.get('cpu', '')}, {machine.get('num_cpu', '?')} cores, "
            f"profile {PROFILE}. Cells: measurement (ratio to the first otcore column).")
    text = "\n".join([head, *tables(data, benchmarks, args.device)])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
