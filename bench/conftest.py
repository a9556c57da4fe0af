"""Side-by-side summary of a benchmark run: ratios against pyopd and the copy roofline.

Benchmarks call `record(benchmark)`; at the end of the session the table is
printed, and written as Markdown to $PYOPD_BENCH_OUT when that is set.
"""
from __future__ import annotations

import os
import platform
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(__file__))

import _results  # noqa: E402


def _machine() -> str:
    if os.environ.get("PYOPD_BENCH_DEVICE") == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def pytest_terminal_summary(terminalreporter):
    rows = _results.RESULTS
    if not rows:
        return
    by_group = defaultdict(dict)
    for r in rows:
        by_group[(r["bench"], r["shape"])][r["provider"]] = r
    lines = [f"machine: {_machine()}; torch {torch.__version__}", "",
             "| benchmark | shape | provider | median ms | GB/s | x pyopd time | % of copy GB/s | peak extra MB |",
             "|---|---|---|---|---|---|---|---|"]
    for (bench, shape), provs in sorted(by_group.items()):
        ours = provs.get("pyopd")
        copy = _results.COPY.get(shape)
        for name, r in sorted(provs.items(), key=lambda kv: kv[1]["median"]):
            ratio = f"{r['median'] / ours['median']:.2f}" if ours else "-"
            gbps = r.get("gbps")
            pct = f"{100 * gbps / copy:.0f}%" if (gbps and copy) else "-"
            mem = r.get("peak_extra_fwd_bwd_bytes")
            mem_s = f"{mem / 2**20:.0f}" if mem is not None else "-"
            if r.get("peak_extra_fwd_bytes") is not None:
                mem_s += f" (fwd {r['peak_extra_fwd_bytes'] / 2**20:.0f})"
            lines.append(f"| {bench} | {shape} | {name} | {1e3 * r['median']:.2f} | "
                         f"{gbps:.1f} | {ratio} | {pct} | {mem_s} |" if gbps else
                         f"| {bench} | {shape} | {name} | {1e3 * r['median']:.3f} | - | {ratio} | - | {mem_s} |")
    for shape, gbps in sorted(_results.COPY.items()):
        lines.append(f"| copy | {shape} | copy | - | {gbps:.1f} | - | 100% | - |")
    text = "\n".join(lines)
    terminalreporter.write_sep("=", "pyopd benchmark summary")
    terminalreporter.write_line(text)
    out = os.environ.get("PYOPD_BENCH_OUT")
    if out:
        with open(out, "a") as f:
            f.write(text + "\n\n")
