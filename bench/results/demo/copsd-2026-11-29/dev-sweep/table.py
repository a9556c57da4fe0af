"""Markdown table of the COPSD dev sweep: python table.py sweep.jsonl > table.md (mean over seeds, per-seed values in brackets)."""
import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1])]
keys = sorted({(r["lr"], r["cross_sft_epochs"]) for r in rows}, key=lambda k: (-k[0], k[1]))
def f(v): return f"{st.fmean(v):.3f}" + (f" ({', '.join(f'{x:.2f}' for x in v)})")
print("| stage-2 lr | Cross-SFT epochs | COPSD safe rate | COPSD helpfulness | COPSD over-refusal | COPSD safety tax | OPSD safe rate | OPSD over-refusal | OPSD safety tax | Cross-SFT teacher helpfulness |")
print("|---|---|---|---|---|---|---|---|---|---|")
for k in keys:
    rs = sorted([r for r in rows if (r["lr"], r["cross_sft_epochs"]) == k], key=lambda r: r["seed"])
    c = [r["results"]["COPSD"] for r in rs]; o = [r["results"]["OPSD"] for r in rs]
    t = [r["results"]["teacher (Cross-SFT + constitution)"] for r in rs]
    print(f"| {k[0]:g} | {k[1]} | " + " | ".join(f([x[m] for x in src]) for src, m in ((c,"safe_rate"),(c,"helpfulness"),(c,"over_refusal"),(c,"safety_tax"),(o,"safe_rate"),(o,"over_refusal"),(o,"safety_tax"),(t,"helpfulness"))) + " |")
i = rows[0]["results"]
print(f"\ndev split: initial student helpfulness {i['initial']['helpfulness']:.3f}; teacher (initial + constitution) over-refusal {i['teacher (initial + constitution)']['over_refusal']:.3f}, helpfulness {i['teacher (initial + constitution)']['helpfulness']:.3f}")
