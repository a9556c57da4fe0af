"""Side-by-side summary of a benchmark run: ratios against pyopd and the copy roofline.

Benchmarks call `record(benchmark)`; at the end of the session the table is
printed, and written as Markdown to $PYOPD_BENCH_OUT when that is set.
"""
from __future__ import annotations

import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(__file__))

import _results  # noqa: E402


def _machine() -> str:
    if os.environ.get("PYOPD_BENCH_DEVICE") == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import pyopd
    from pyopd._machine import cpu_model

    return (f"{cpu_model()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
            f"pyopd CPU path {pyopd.build_info()['cpu_isa']}, load average "
            f"{os.getloadavg()[0]:.1f} at the end")


def _baseline_of(provider: str) -> str:
    # Each provider is compared with pyopd computing the same loss.
    return "pyopd_kl" if provider.endswith("_kl") or provider.endswith("_kl5") else "pyopd"


def _ms(ms: float) -> str:
    """Three significant digits: 1234 ms on a CPU, 0.214 ms on a GPU."""
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def _summary(by_group) -> list[str]:
    """One line per shape: the ratios the issue asks for, side by side."""
    lines = ["", "| shape | pyopd (full loss) ms | torch.compile full ms | eager ms | "
             "pyopd (KL only) ms | torch.compile 5-line ms | compile full / pyopd | "
             "compile 5-line / pyopd KL | eager / pyopd | pyopd GB/s | pyopd % of copy |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (bench, shape), provs in sorted(by_group.items()):
        if "pyopd" not in provs:
            continue
        med = {k: v["median"] * 1e3 for k, v in provs.items()}
        fmt = lambda k: _ms(med[k]) if k in med else "-"  # noqa: E731
        ratio = lambda a, b: f"{med[a] / med[b]:.2f}x" if a in med and b in med else "-"  # noqa: E731
        copy = _results.COPY.get(shape)
        gbps = provs["pyopd"].get("gbps")
        pct = f"{100 * gbps / copy:.0f}%" if gbps and copy else "-"
        lines.append(f"| {shape} | {fmt('pyopd')} | {fmt('compile')} | {fmt('eager')} | "
                     f"{fmt('pyopd_kl')} | {fmt('compile_kl5')} | {ratio('compile', 'pyopd')} | "
                     f"{ratio('compile_kl5', 'pyopd_kl')} | {ratio('eager', 'pyopd')} | "
                     f"{gbps:.1f} | {pct} |" if gbps else f"| {shape} | ... |")
    return lines


def pytest_terminal_summary(terminalreporter):
    rows = _results.RESULTS
    if not rows:
        return
    by_group = defaultdict(dict)
    for r in rows:
        by_group[(r["bench"], r["shape"])][r["provider"]] = r
    lines = [f"machine: {_machine()}; torch {torch.__version__}", "",
             "| benchmark | shape | provider | median ms | GB/s | x pyopd time (same loss) | % of copy GB/s | peak extra MB |",
             "|---|---|---|---|---|---|---|---|"]
    for (bench, shape), provs in sorted(by_group.items()):
        copy = _results.COPY.get(shape)
        for name, r in sorted(provs.items(), key=lambda kv: kv[1]["median"]):
            ours = provs.get(_baseline_of(name))
            ratio = f"{r['median'] / ours['median']:.2f}" if ours else "-"
            gbps = r.get("gbps")
            pct = f"{100 * gbps / copy:.0f}%" if (gbps and copy) else "-"
            mem = r.get("peak_extra_fwd_bwd_bytes")
            mem_s = f"{mem / 2**20:.0f}" if mem is not None else "-"
            if r.get("peak_extra_fwd_bytes") is not None:
                mem_s += f" (fwd {r['peak_extra_fwd_bytes'] / 2**20:.0f})"
            lines.append(f"| {bench} | {shape} | {name} | {_ms(1e3 * r['median'])} | "
                         f"{gbps:.1f} | {ratio} | {pct} | {mem_s} |" if gbps else
                         f"| {bench} | {shape} | {name} | {_ms(1e3 * r['median'])} | - | {ratio} | - | {mem_s} |")
    for shape, gbps in sorted(_results.COPY.items()):
        lines.append(f"| copy | {shape} | copy | - | {gbps:.1f} | - | 100% | - |")
    if any(r["bench"].startswith("reverse_kl") for r in rows):
        lines += _summary(by_group)
    text = "\n".join(lines)
    terminalreporter.write_sep("=", "pyopd benchmark summary")
    terminalreporter.write_line(text)
    out = os.environ.get("PYOPD_BENCH_OUT")
    if out:
        with open(out, "a") as f:
            f.write(text + "\n\n")
