#!/usr/bin/env bash
# One prepared device check (run on a machine with an NVIDIA GPU, no network):
# builds pyopd with the CUDA kernels, runs the CUDA tests, then the GPU
# benchmarks, and writes everything under ${OUT:-bench/results/gpu}.
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  echo "# pyopd GPU check, $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} | tee "$OUT/machine.txt"

PYOPD_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install --no-build-isolation --no-deps . \
  >"$OUT/build.log" 2>&1 || { echo "build failed"; tail -50 "$OUT/build.log"; exit 1; }
(cd /tmp && python3 -c "import pyopd; print(pyopd.build_info(), 'cuda_available', pyopd.cuda_available())") \
  | tee -a "$OUT/machine.txt"

# CUDA tests only (the CPU ones run in CI); -p no:cacheprovider keeps the tree clean.
# -P: do not put the checkout on sys.path (its pyopd/ has no built module).
python3 -P -m pytest tests -m cuda -q -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.log"
tests_rc=${PIPESTATUS[0]}

PYOPD_BENCH_DEVICE=cuda PYOPD_BENCH_OUT="$OUT/bench.md" \
  python3 -P -m pytest bench -q -p no:cacheprovider --benchmark-only \
  --benchmark-json="$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
echo "cuda tests rc=$tests_rc"
exit "$tests_rc"
