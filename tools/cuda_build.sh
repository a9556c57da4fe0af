#!/usr/bin/env bash
# CUDA developer build into build/<name> (default build/cuda), for checking that
# the kernels compile (and, with --ptxas-v, their register use) on a machine
# that may have no GPU. Unlike tools/dev_build.sh it does not copy the module
# into pyopd/ unless --install is given, so a CPU build there is left alone.
# Usage: tools/cuda_build.sh [--install] [--ptxas-v] [build-name]
#   CUDAARCHS=90 (default: the CMakeLists.txt list), CMAKE_BUILD_PARALLEL_LEVEL=1
set -euo pipefail
cd "$(dirname "$0")/.."
install=0
ptxas=""
name=cuda
for a in "$@"; do
  case "$a" in
    --install) install=1 ;;
    --no-install) install=0 ;;
    --ptxas-v) ptxas="-Xptxas=-v" ;;
    *) name="$a" ;;
  esac
done
export PATH="/usr/local/cuda/bin:$PATH"
cmake -S . -B "build/$name" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DPYOPD_CUDA=ON \
  -DCMAKE_CUDA_FLAGS="$ptxas" \
  -DPython_EXECUTABLE="$(command -v python3)" \
  -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" >/dev/null
cmake --build "build/$name" -j "${CMAKE_BUILD_PARALLEL_LEVEL:-1}"
if [ "$install" = 1 ]; then cp "build/$name"/_C*.so pyopd/; fi
