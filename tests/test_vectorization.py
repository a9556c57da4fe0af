"""The CPU kernels' hot loops are vectorised on every instruction-set build.

Compiles csrc/cpu/vocab_stats_{baseline,avx2,avx512}.cpp with the flags from
CMakeLists.txt and reads GCC's vectoriser report (-fopt-info-vec-optimized /
-missed, written per function with -fdump-tree-vect-optimized-missed). The
hot loops (load_tile, tile_sums, tile_sums_joint, grad_span) are kept out of
line, so each instantiation is its own function in the report; every float /
bf16 / fp16 instantiation must contain a vectorised loop and no loop that GCC
gave up on. float64 instantiations (the checking path, libm exp) are exempt.

A loop whose body has a possibly trapping operation under control flow is
only vectorised where the ISA has masked operations (AVX-512), which is how
the AVX2 build used to stay scalar; this test catches that on every ISA.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GXX = shutil.which("g++")
HOT_LOOPS = ("load_tile", "tile_sums", "tile_sums_joint", "grad_span")
ISAS = ("baseline", "avx2", "avx512")

pytestmark = pytest.mark.skipif(GXX is None, reason="g++ not found: cannot read GCC's vectoriser report")


def _cmake_flags() -> tuple[list[str], dict[str, list[str]]]:
    """(common C++ flags, per-ISA source flags) as CMakeLists.txt sets them."""
    text = (ROOT / "CMakeLists.txt").read_text()
    m = re.search(r"\$<\$<COMPILE_LANGUAGE:CXX>:([^>]*)>", text)
    assert m, "CMakeLists.txt: common CXX compile options not found"
    common = [f for f in m.group(1).split() if not f.startswith("-W")]
    per_isa = {}
    for isa in ISAS:
        m = re.search(rf"csrc/cpu/vocab_stats_{isa}\.cpp PROPERTIES\s+COMPILE_OPTIONS \"([^\"]*)\"", text)
        assert m, f"CMakeLists.txt: no COMPILE_OPTIONS for vocab_stats_{isa}.cpp"
        per_isa[isa] = m.group(1).split(";")
    return common, per_isa


def _report(isa: str, tmp_path: Path) -> dict[str, list[str]]:
    """Function name -> its vectoriser verdict lines."""
    common, per_isa = _cmake_flags()
    dump = tmp_path / f"vect-{isa}.txt"
    cmd = [GXX, "-std=gnu++17", "-fPIC", f"-I{ROOT / 'csrc' / 'include'}", *common, *per_isa[isa],
           "-DPYOPD_CPU_X86_DISPATCH=1", "-fopt-info-vec-optimized", "-fopt-info-vec-missed",
           f"-fdump-tree-vect-optimized-missed={dump}", "-c",
           str(ROOT / "csrc" / "cpu" / f"vocab_stats_{isa}.cpp"), "-o", str(tmp_path / f"{isa}.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"g++ failed for {isa}:\n{proc.stderr[-3000:]}"
    verdicts: dict[str, list[str]] = defaultdict(list)
    fn = None
    for line in dump.read_text().splitlines():
        if line.startswith(";; Function "):
            fn = line[len(";; Function "):].split(" (")[0]
        elif fn and ("loop vectorized" in line or "couldn't vectorize loop" in line):
            verdicts[fn].append(line.strip())
    return verdicts


def _hot_name(fn: str) -> str | None:
    m = re.search(r"::(\w+)<", fn)
    return m.group(1) if m and m.group(1) in HOT_LOOPS else None


@pytest.mark.slow
@pytest.mark.parametrize("isa", ISAS)
def test_hot_loops_vectorised(isa, tmp_path):
    verdicts = _report(isa, tmp_path)
    seen: dict[str, int] = defaultdict(int)
    bad = []
    for fn, lines in verdicts.items():
        name = _hot_name(fn)
        if name is None or "double" in fn:
            continue
        seen[name] += 1
        vectorised = [v for v in lines if "loop vectorized" in v]
        gave_up = [v for v in lines if "couldn't vectorize loop" in v]
        if gave_up or not vectorised:
            bad.append(f"{fn}: {gave_up[:2] or 'no vectorised loop'}")
    # Every hot loop must have been found (else the test could not fail).
    assert set(seen) == set(HOT_LOOPS), f"{isa}: hot loops missing from the report: {seen}"
    assert not bad, f"{isa}: hot loops left scalar:\n" + "\n".join(bad)


def test_cmake_flags_never_use_fast_math():
    # IEEE inf/NaN semantics are part of the kernels' contract.
    common, per_isa = _cmake_flags()
    for flags in [common, *per_isa.values()]:
        assert not any(f in ("-ffast-math", "-ffinite-math-only", "-fno-trapping-math",
                             "-Ofast") for f in flags), flags
