"""Recipe sweep of the FiRe-OPD demo on the DEV split (never the eval split).

    python bench/results/demo/sweep.py OUT.jsonl SETTING LOSSES NAME=VALUE,... [NAME=VALUE,... ...]

Each trailing argument is one config (fields of OPDConfig over the demo preset),
run with `run_demo(..., split="dev")`; one JSON line per config is appended to
OUT.jsonl: the config, and per model row avg@4 / greedy with standard errors and the
paired difference to the start.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from pyopd import config as C
from pyopd.demo.fire_opd import default_max_new_tokens, run_demo


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def main(argv) -> None:
    out, setting, losses, *grid = argv
    torch.set_num_threads(1)
    for spec in grid:
        user = {k: _value(v) for k, v in (kv.split("=", 1) for kv in spec.split(",") if kv)}
        user["setting"] = setting
        cfg = C.resolve("fire-opd", user, demo=True, demo_extra={"max_new_tokens": default_max_new_tokens()})
        cfg.validate()
        with tempfile.TemporaryDirectory() as tmp:
            s = run_demo(cfg, losses=tuple(losses.split(",")), out=Path(tmp), split="dev", progress=False,
                         log=lambda *_: None)
        rec = {"spec": spec, "setting": setting, "seed": cfg.seed, "total_s": round(s["total_s"], 1),
               "rows": {n: {k: r[k] for k in ("headline", "headline_se", "greedy", "greedy_se")}
                        for n, r in s["rows"].items()},
               "paired": s["paired"]}
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        vs = {n: p["headline"] for n, p in s["paired"].items()}
        print(spec, {n: f"{p['diff']:+.3f}±{p['se']:.3f}" for n, p in vs.items()},
              f"{s['total_s']:.0f}s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
