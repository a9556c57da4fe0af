#!/usr/bin/env bash
# The one device check (a machine with an NVIDIA GPU, no network):
#   1. machine: GPU, driver, toolkit, torch;
#   2. build: pyopd with the CUDA kernels for this GPU's architecture only
#      (nvidia-smi compute_cap, nvcc --threads), pip install --no-build-isolation
#      --no-deps . (falls back to a plain CMake build when pip cannot build);
#   3. status: pyopd.cuda_status() must say the kernels can run;
#   4. tests: every test marked `cuda`; the check FAILS if any is skipped;
#   5. paths: forward / backward times of the CUDA launch paths side by side
#      (aligned vs misaligned rows, few rows split over blocks vs not);
#      then bench/gpu_profile.py: kernels and host time per call, and the
#      fused-linear chunk sweep (profile.md);
#   6. bench: the GPU benchmarks (bench/, PYOPD_BENCH_DEVICE=cuda).
# Everything goes under $OUT (default bench/results/gpu): machine.txt,
# command.txt, build.log, status.txt, cuda_tests.log, junit.xml, paths.md,
# bench.md, bench-<file>.json, bench.log and summary.txt (one line per phase with its
# rc and seconds). Exit status 0 only when build, status and tests pass.
#   bash bench/gpu_check.sh
# PYOPD_GPU_CHECK_NO_BENCH=1 skips phase 6; PYOPD_GPU_CHECK_SKIP_BUILD=1 reuses
# the pyopd a previous run installed (a rerun on the same machine);
# PYOPD_GPU_CHECK_BUDGET (seconds, default 470) bounds the whole run.
set -u
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1
export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
NPROC="$(nproc 2>/dev/null || echo 8)"
T0=$(date +%s)
echo "$0 $*" >"$OUT/command.txt"
echo "cwd: $ROOT, OUT=$OUT, started $(date -u +%FT%TZ)" >>"$OUT/command.txt"

# The whole check must end within BUDGET seconds (a lent GPU is short-lived):
# each phase's timeout is what is left of it, capped by its own limit.
BUDGET="${PYOPD_GPU_CHECK_BUDGET:-470}"
left() {  # left CAP -> min(CAP, seconds left, at least 10)
  local l=$((BUDGET - ($(date +%s) - T0)))
  [ "$l" -gt "$1" ] && l=$1
  [ "$l" -lt 10 ] && l=10
  echo "$l"
}

# phase NAME RC START: one summary line per phase.
phase() {
  local now
  now=$(date +%s)
  printf '%-8s rc=%-3s %4ss  %s\n' "$1" "$2" "$((now - $3))" "${4:-}" | tee -a "$SUMMARY"
}
finish() {
  local rc=$1
  printf 'overall  rc=%-3s %4ss  %s\n' "$rc" "$(($(date +%s) - T0))" "results in $OUT" | tee -a "$SUMMARY"
  exit "$rc"
}

# ---- 1. machine --------------------------------------------------------------
t=$(date +%s)
{
  echo "# pyopd GPU check, $(date -u +%FT%TZ), $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>&1
  nvcc --version 2>&1 | tail -2
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1
  echo "cpus: $NPROC"
} | tee "$OUT/machine.txt"
cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
if [ -z "$cap" ]; then
  phase machine 1 "$t" "nvidia-smi gave no compute capability: no GPU or no driver"
  finish 1
fi
phase machine 0 "$t" "compute capability $cap"

# ---- 2. build (this GPU's architecture only) ---------------------------------
t=$(date +%s)
export CUDAARCHS="$cap"  # e.g. 90 on H100/H200: SASS for this GPU only, minutes not tens
export CUDAFLAGS="--threads=0"  # nvcc compiles its per-arch steps in parallel
export CMAKE_BUILD_PARALLEL_LEVEL="$NPROC"
export PYOPD_CUDA=ON
IMPORT_FROM=installed
if [ "${PYOPD_GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
  (cd /tmp && python3 -c "import pyopd" >/dev/null 2>&1) || IMPORT_FROM=checkout
  echo "== build skipped (PYOPD_GPU_CHECK_SKIP_BUILD=1), using the $IMPORT_FROM copy" >"$OUT/build.log"
  build_rc=0
else
{
  echo "== pip install --no-build-isolation --no-deps . (CUDAARCHS=$CUDAARCHS)"
  # Its own build dir: CMake keeps the architectures of a dir's first configure.
  timeout "$(left 300)" python3 -m pip install --no-build-isolation --no-deps -v \
    --config-settings=build-dir="build/gpu-sm$cap" . 2>&1
} >"$OUT/build.log"
build_rc=$?
if [ "$build_rc" -ne 0 ]; then
  # No scikit-build-core / pybind11 build deps offline, for instance: plain CMake,
  # the module copied next to the sources, tests import the checkout.
  {
    echo "== pip failed (rc=$build_rc); plain CMake build into build/gpu-cmake-sm$cap"
    gen=()
    command -v ninja >/dev/null && gen=(-G Ninja)
    cmake -S . -B "build/gpu-cmake-sm$cap" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DPYOPD_CUDA=ON \
      -DPython_EXECUTABLE="$(command -v python3)" -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" 2>&1 \
      && timeout "$(left 300)" cmake --build "build/gpu-cmake-sm$cap" -j "$NPROC" 2>&1 \
      && cp "build/gpu-cmake-sm$cap"/_C*.so pyopd/
  } >>"$OUT/build.log"
  build_rc=$?
  IMPORT_FROM=checkout
fi
fi
phase build "$build_rc" "$t" "CUDAARCHS=$CUDAARCHS, module imported from the $IMPORT_FROM copy"
if [ "$build_rc" -ne 0 ]; then
  tail -40 "$OUT/build.log"
  finish 1
fi
# Python runs from /tmp so that `import pyopd` is the installed copy, not the
# checkout's pyopd/ (which has no CUDA module), unless the CMake fallback put
# the module there. pytest gets the project's config explicitly (-c).
RUN_DIR=/tmp
if [ "$IMPORT_FROM" = checkout ]; then export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"; fi
PYTEST=(python3 -m pytest -c "$ROOT/pyproject.toml" --rootdir "$ROOT" -p no:cacheprovider)

# ---- 3. status ---------------------------------------------------------------
t=$(date +%s)
(cd "$RUN_DIR" && python3 -c "
import sys, pyopd
st = pyopd.cuda_status()
print('build_info', pyopd.build_info())
print('cuda_status', st)
sys.exit(0 if st.available and pyopd.cuda_available() else 1)
") >"$OUT/status.txt" 2>&1
status_rc=$?
cat "$OUT/status.txt"
phase status "$status_rc" "$t" "$(grep -o "reason='[^']*'" "$OUT/status.txt" | head -1)"
if [ "$status_rc" -ne 0 ]; then
  echo "pyopd cannot use the GPU (see $OUT/status.txt): not running the CUDA tests"
  finish 1
fi

# ---- 4. CUDA tests (no skips allowed) -----------------------------------------
t=$(date +%s)
# Only the files that can hold CUDA tests: a module skipped whole for an
# optional engine (TRL, verl) is not a skipped CUDA test.
mapfile -t cuda_files < <(grep -l -E "cuda|DEVICES" "$ROOT"/tests/test_*.py)
(cd "$RUN_DIR" && timeout "$(left 300)" "${PYTEST[@]}" "${cuda_files[@]}" -m cuda -q -rs \
  --junitxml="$OUT/junit.xml") >"$OUT/cuda_tests.log" 2>&1
tests_rc=$?
tail -25 "$OUT/cuda_tests.log"
counts="$(python3 - "$OUT/junit.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception as e:  # no report: pytest died
    print(f"-1 -1 -1 -1 ({e})")
    sys.exit()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
tot = lambda k: sum(int(s.get(k, 0)) for s in suites)
print(tot("tests"), tot("failures") + tot("errors"), tot("skipped"), "")
EOF
)"
read -r n_tests n_failed n_skipped _rest <<<"$counts"
if [ "$tests_rc" -eq 0 ] && { [ "${n_skipped:--1}" != 0 ] || [ "${n_tests:-0}" -le 0 ]; }; then
  tests_rc=3  # a skipped CUDA test is a failed check
fi
phase tests "$tests_rc" "$t" "tests=$n_tests failed=$n_failed skipped=$n_skipped (any skip fails the check)"

# ---- 5. launch paths side by side ---------------------------------------------
t=$(date +%s)
(cd "$RUN_DIR" && timeout "$(left 120)" python3 - "$OUT/paths.md" <<'EOF'
"""Median CUDA-event times of pyopd.reverse_kl forward and forward+backward for
row layouts and row counts that take different kernel paths, side by side."""
import sys
import torch
import pyopd

def med(fn, reps=20):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]

def case(n, v, off_s, off_t, dt=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    bs = torch.randn(n, v + 8, generator=g, device="cuda").to(dt)
    bt = torch.randn(n, v + 8, generator=g, device="cuda").to(dt)
    s, t = bs[:, off_s:off_s + v], bt[:, off_t:off_t + v]
    y = torch.randint(0, v, (n,), device="cuda")
    x = s.detach().requires_grad_()
    fwd = med(lambda: pyopd.reverse_kl(s, t, y))
    def fb():
        r = pyopd.reverse_kl(x, t, y)
        r.kl.sum().backward()
        x.grad = None
    both = med(fb)
    gb = n * v * s.element_size() * 2 / 1e9  # forward reads student + teacher
    return fwd, both, gb / (fwd / 1e3)

rows = [("aligned rows", 4096, 32000, 0, 0), ("V = 32001 (rows at every phase)", 4096, 32001, 0, 0),
        ("student / teacher at offsets 1 / 3", 4096, 32000, 1, 3)]
rows += [(f"N = {n} (split rows)", n, 151936, 0, 0) for n in (1, 4, 8)]
rows += [(f"N = {n}", n, 151936, 0, 0) for n in (256, 1024)]
lines = ["| case | N | V | forward ms | fwd+bwd ms | forward GB/s |", "|---|---|---|---|---|---|"]
for name, n, v, a, b in rows:
    f, fb, bw = case(n, v, a, b)
    lines.append(f"| {name} | {n} | {v} | {f:.3f} | {fb:.3f} | {bw:.0f} |")
text = f"{torch.cuda.get_device_name()}, bf16 student and teacher, pyopd.reverse_kl\n\n" + "\n".join(lines) + "\n"
print(text)
open(sys.argv[1], "w").write(text)
EOF
) >"$OUT/paths.log" 2>&1
paths_rc=$?
cat "$OUT/paths.log"
phase paths "$paths_rc" "$t" "paths.md"

# ---- 5b. profile: fixed cost per call, fused-linear chunk sweep ---------------
t=$(date +%s)
(cd "$RUN_DIR" && timeout "$(left 150)" python3 "$ROOT/bench/gpu_profile.py" "$OUT/profile.md") \
  >"$OUT/profile.log" 2>&1
phase profile "$?" "$t" "profile.md"

# ---- 6. benchmarks -------------------------------------------------------------
if [ "${PYOPD_GPU_CHECK_NO_BENCH:-0}" = 1 ]; then
  phase bench - "$(date +%s)" "skipped (PYOPD_GPU_CHECK_NO_BENCH=1)"
else
  # One pytest per file, each with its own timeout and JSON, so a file that
  # runs out of time loses only its own figures.
  t=$(date +%s)
  bench_rc=0
  : >"$OUT/bench.log"
  for f in test_bench_vocab.py test_bench_fused_linear.py test_bench_signals.py test_bench_trl.py; do
    (cd "$RUN_DIR" && PYOPD_BENCH_DEVICE=cuda PYOPD_BENCH_OUT="$OUT/bench.md" \
      timeout "$(left 240)" "${PYTEST[@]}" "$ROOT/bench/$f" -q --benchmark-only \
      --benchmark-json="$OUT/bench-${f#test_bench_}.json") >>"$OUT/bench.log" 2>&1
    rc=$?
    # 5: pytest collected nothing (e.g. TRL not installed), not a failure
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then bench_rc=$rc; fi
    echo "== $f rc=$rc" | tee -a "$OUT/bench.log"
  done
  tail -30 "$OUT/bench.log"
  phase bench "$bench_rc" "$t" "bench.md (rc 124: timed out)"
fi

# Build, status and tests decide; paths and bench are measurements.
if [ "$tests_rc" -ne 0 ]; then finish 1; fi
finish 0
