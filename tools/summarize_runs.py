#!/usr/bin/env python3
"""Mean and spread over seeds of the demo summaries (summary.json of `pyopd fire-opd` / `pyopd copsd`).

    python tools/summarize_runs.py runs/fire-s0 runs/fire-s1 runs/fire-s2
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _stat(vals: list[float]) -> str:
    vals = [v for v in vals if v is not None and v == v]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def main(dirs: list[str]) -> None:
    sums = [json.loads((Path(d) / "summary.json").read_text()) for d in dirs]
    seeds = [s["seed"] for s in sums]
    first = sums[0]["results"]
    if "opd" in first or "fire" in first:  # FiRe-OPD demo
        print(f"FiRe-OPD demo, seeds {seeds} (mean ± sample std)")
        print("| model | greedy accuracy | avg@4 | pass@4 | keep ratio | tokens/s |\n|---|---|---|---|---|---|")
        r0 = [s["results"][next(iter(first))] for s in sums]
        print(f"| student (start) | {_stat([r['before'] for r in r0])} | "
              f"{_stat([r['before_avg@4'] for r in r0])} | {_stat([r['before_pass@4'] for r in r0])} | - | - |")
        for key in first:
            name = f"after {key}"
            rs = [s["results"][key] for s in sums]
            print(f"| {name} | {_stat([r['after'] for r in rs])} | {_stat([r['after_avg@4'] for r in rs])} | "
                  f"{_stat([r['after_pass@4'] for r in rs])} | "
                  f"{_stat([r['keep_ratio'] for r in rs])} | {_stat([r['tokens_per_s'] for r in rs])} |")
        if "fire" in first and "opd" in first:
            diff = [s["results"]["fire"]["after"] - s["results"]["opd"]["after"] for s in sums]
            print(f"\nFiRe-OPD minus OPD accuracy per seed: {', '.join(f'{d:+.3f}' for d in diff)}")
        print(f"teacher accuracy: {sums[0]['teacher_accuracy']}")
        print(f"wall time per run (s): {', '.join(str(round(s['total_s'])) for s in sums)}")
    else:  # COPSD demo
        cols = ("safe_rate", "helpfulness", "over_refusal", "safety_tax", "length", "entropy", "diversity")
        print(f"COPSD demo, seeds {seeds} (mean ± sample std)")
        print("| model | " + " | ".join(cols) + " |")
        print("|---" * (len(cols) + 1) + "|")
        for name in first:
            cells = [_stat([s["results"][name].get(c) for s in sums]) for c in cols]
            print(f"| {name} | " + " | ".join(cells) + " |")
        print(f"\nwall time per run (s): {', '.join(str(round(s['total_s'])) for s in sums)}")


if __name__ == "__main__":
    main(sys.argv[1:])
