"""Collects benchmark medians for the side-by-side summary in conftest.py."""
from __future__ import annotations

RESULTS: list[dict] = []
COPY: dict[str, float] = {}  # shape id -> GB/s of the streaming copy


def record(benchmark, bench: str) -> None:
    info = dict(benchmark.extra_info)
    info.update(bench=bench, median=benchmark.stats.stats.median)
    if info.get("provider") == "copy":
        COPY[info["shape"]] = info["gbps"]
    else:
        RESULTS.append(info)
