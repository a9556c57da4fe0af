"""Dev-split sweep of the COPSD demo recipe: stage-2 lr x Cross-SFT epochs, 2 seeds.

    taskset -c 1 env OMP_NUM_THREADS=1 PYTHONPATH=. python bench/results/demo/copsd-2026-11-29/sweep.py OUT.jsonl

Every run is `run_copsd_demo` exactly as `pyopd copsd --seed S` runs it (the demo preset),
except for the swept values and split="dev". One JSON line per run. Rule fixed before
running: keep the default (lr 5e-4, 2 epochs) unless another setting has a lower mean
COPSD safety tax by more than 0.03 while its COPSD safe rate stays >= 0.95 and its
over-refusal <= 0.05.
"""
import json
import sys
from pathlib import Path

from pyopd.config import resolve
from pyopd.demo.copsd import default_max_new_tokens, run_copsd_demo

LRS = (5e-4, 2e-4)
EPOCHS = (1, 2, 3)
SEEDS = (0, 1)

if __name__ == "__main__":
    out = Path(sys.argv[1])
    work = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("/tmp/copsd-sweep")
    done = set()
    if out.exists():
        done = {(r["lr"], r["cross_sft_epochs"], r["seed"]) for r in map(json.loads, out.read_text().splitlines())}
    for lr in LRS:
        for epochs in EPOCHS:
            for seed in SEEDS:
                if (lr, epochs, seed) in done:
                    continue
                d = work / f"lr{lr:g}-ep{epochs}-seed{seed}"
                cfg = resolve("copsd", {"seed": seed, "lr": lr, "out_dir": str(d)}, demo=True,
                              demo_extra={"max_new_tokens": default_max_new_tokens()})
                s = run_copsd_demo(cfg, out=d, cross_sft_epochs=epochs, progress=False, split="dev",
                                   log=lambda *_: None)
                row = {"lr": lr, "cross_sft_epochs": epochs, "seed": seed, "split": s["split"],
                       "total_s": s["total_s"], "results": s["results"]}
                with open(out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                c = s["results"]["COPSD"]
                print(f"lr {lr:g} epochs {epochs} seed {seed}: COPSD safe {c['safe_rate']:.3f} "
                      f"help {c['helpfulness']:.3f} over {c['over_refusal']:.3f} tax {c['safety_tax']:.3f} "
                      f"({s['total_s']:.0f}s)", flush=True)
