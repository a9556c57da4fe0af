"""Pool the per-seed `pyopd copsd` summaries into one markdown table (mean ± std over seeds).

    python bench/results/demo/copsd-2026-11-29/combine.py DIR/seed0/summary.json DIR/seed1/summary.json ...

std is the sample standard deviation over the seeds (n - 1); a value the same in every
seed is printed without it.
"""
import json
import statistics
import sys

COLS = [("safe_rate", "safe rate", 3), ("helpfulness", "helpfulness", 3), ("over_refusal", "over-refusal", 3),
        ("safety_tax", "safety tax", 3), ("length", "length, all (chars)", 1),
        ("length_benign", "length, benign + alarming (chars)", 1), ("entropy", "entropy", 3),
        ("diversity", "diversity", 3)]
NAMES = {"initial": "initial student", "teacher (initial + constitution)": "teacher: initial + constitution",
         "teacher (Cross-SFT + constitution)": "teacher: Cross-SFT + constitution",
         "SFT on teacher answers": "SFT on Cross-SFT teacher answers", "OPSD": "OPSD (no Cross-SFT)",
         "COPSD": "COPSD (Cross-SFT + OPSD)"}


def cell(values, digits):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    m = statistics.fmean(values)
    if len(values) < 2 or max(values) - min(values) < 0.5 * 10 ** -digits:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(summaries):
    rows = ["| model | " + " | ".join(c[1] for c in COLS) + " |", "|---" * (len(COLS) + 1) + "|"]
    for key in summaries[0]["results"]:
        res = [s["results"][key] for s in summaries]
        rows.append(f"| {NAMES.get(key, key)} | "
                    + " | ".join(cell([r.get(c) for r in res], d) for c, _, d in COLS) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    summaries = [json.load(open(p)) for p in sys.argv[1:]]
    print(f"seeds {[s['seed'] for s in summaries]}; run time {min(s['total_s'] for s in summaries):.0f}-"
          f"{max(s['total_s'] for s in summaries):.0f} s each")
    print(table(summaries))
