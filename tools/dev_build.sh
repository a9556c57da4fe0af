#!/usr/bin/env bash
# Incremental developer build: compiles pyopd._C into build/<name> and copies
# it next to the sources, so `python -c "import pyopd"` works from the checkout.
# Usage: tools/dev_build.sh [build-name]   (PYOPD_CUDA=OFF|AUTO|ON, default OFF)
set -euo pipefail
cd "$(dirname "$0")/.."
name="${1:-dev}"
cmake -S . -B "build/$name" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DPYOPD_CUDA="${PYOPD_CUDA:-OFF}" \
  -DPython_EXECUTABLE="$(command -v python3)" \
  -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" >/dev/null
cmake --build "build/$name"
# Replace the module atomically (copy, then rename): overwriting it in place
# crashes any process that has it loaded.
for so in "build/$name"/_C*.so; do
  cp "$so" "pyopd/.$(basename "$so").tmp" && mv -f "pyopd/.$(basename "$so").tmp" "pyopd/$(basename "$so")"
done
