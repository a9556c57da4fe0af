"""Metrics as JSONL (one object per step, resumable) and a PNG of the curves."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Optional, Sequence


class JsonlLog:
    """Appends one JSON object per line; on resume, drops the lines of steps after the checkpoint."""

    def __init__(self, path: Path, resume_step: Optional[int] = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            keep = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", -1) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def _pyplot():
    """matplotlib.pyplot on the headless Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_curves(runs: dict[str, Sequence[dict]], keys: Iterable[str], out: Path,
                title: str = "") -> Optional[Path]:
    """One panel per metric key, one line per run. Returns None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    keys = [k for k in keys if any(k in r for recs in runs.values() for r in recs)]
    if not keys:
        return None
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for name, recs in runs.items():
            pts = [(r["step"], r[key]) for r in recs if key in r and r[key] is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 15 else None, ms=3, label=name)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_safety_plane(results: dict, out: Path) -> Optional[Path]:
    """Each model as a point: helpfulness (x) against safe rate (y)."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, r in results.items():
        if "safe_rate" in r and "helpfulness" in r:
            ax.scatter(r["helpfulness"], r["safe_rate"], s=40)
            ax.annotate(name, (r["helpfulness"], r["safe_rate"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("helpfulness (benign accuracy)")
    ax.set_ylabel("safe rate (unsafe refused)")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
