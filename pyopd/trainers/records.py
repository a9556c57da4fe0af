"""Metrics as JSONL (one object per step, resumable) and a PNG of the curves."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence


class JsonlLog:
    """Appends one JSON object per line, flushed and fsynced, so a kill loses at most that line.

    ``resume_step=None`` starts a new log. A previous run's non-empty log at
    ``path`` is never destroyed: it is renamed to ``<name>.prev-<YYYYmmdd-HHMMSS>``
    (plus ``-<n>`` if that exists) and the rename is reported through ``log``.

    ``resume_step=k`` continues the log of a run resumed from step k: lines of
    steps after k are dropped (they are recomputed). A torn last line (the run
    was killed while writing it) is dropped with a message; a malformed line
    anywhere else is an error naming the file and line, since it is not the
    trace of a kill and must not be rewritten away silently.
    """

    def __init__(self, path: Path, resume_step: Optional[int] = None,
                 log: Optional[Callable[[str], None]] = None) -> None:
        self.path = path = Path(path)
        self.log = log
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            if path.exists() and path.stat().st_size > 0:
                kept = _move_aside(path)
                self._say(f"[pyopd] {path} is from an earlier run: moved it to {kept.name}")
            path.write_text("")
        elif path.exists():
            recs = read_jsonl(path, log=self._say)
            keep = [r for r in recs if r.get("step", -1) <= resume_step]
            _write_atomic(path, "".join(json.dumps(r, default=float) + "\n" for r in keep))

    def _say(self, msg: str) -> None:
        if self.log is not None:
            self.log(msg)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _move_aside(path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    dest = path.with_name(f"{path.name}.prev-{stamp}")
    n = 1
    while dest.exists():
        dest = path.with_name(f"{path.name}.prev-{stamp}-{n}")
        n += 1
    os.replace(path, dest)
    return dest


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` via a synced temp file: a kill leaves the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_jsonl(path: Path, log: Optional[Callable[[str], None]] = None) -> list[dict]:
    """The records of a JSONL log; a torn (unparsable) LAST line is dropped and reported via ``log``.

    Any other malformed line raises ValueError naming ``path`` and the line number.
    """
    lines = Path(path).read_text().splitlines()
    numbered = [(i, ln) for i, ln in enumerate(lines, 1) if ln.strip()]
    out = []
    for j, (i, ln) in enumerate(numbered):
        try:
            rec = json.loads(ln)
            if not isinstance(rec, dict):
                raise ValueError(f"a JSON {type(rec).__name__}, not an object")
        except ValueError as e:
            if j == len(numbered) - 1:
                if log is not None:
                    log(f"[pyopd] {path}: dropped the torn last line {i} (a run killed while "
                        f"writing it): {ln[:60]!r}")
                break
            raise ValueError(f"{path}: line {i} is not a JSON object ({e})") from e
        out.append(rec)
    return out


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
