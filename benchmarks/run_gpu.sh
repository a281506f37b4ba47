#!/usr/bin/env bash
# Run the GPU subset of the asv suite (full profile: every size) on a machine with CUDA and write
# benchmarks/RESULTS_gpu.md.
# Usage (from the repository root, with otcore, asv and the peers installed):
#   bash benchmarks/run_gpu.sh [extra asv args]
set -euo pipefail
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
asv machine --yes >/dev/null
OTCORE_BENCH=full asv run --python=same --quick --show-stderr --set-commit-hash "$(git rev-parse HEAD)" -b "SinkhornIterationGPU|SinkhornGradientGPU|SinkhornDense|SinkhornIteration|SinkhornCloud|Divergence" "$@"
OTCORE_BENCH=full python -m benchmarks.report --device cuda --out benchmarks/RESULTS_gpu.md
