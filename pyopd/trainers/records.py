"""Metrics as JSONL (one object per step, resumable) and PNGs of the curves and the safety plane."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union


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


# ----------------------------------------------------------------------------- plots
#
# Figures are built on matplotlib's object API (no pyplot): nothing global such as
# the backend of a user's notebook is changed, and nothing has to be closed.

Panel = Union[str, tuple[str, Sequence[str]]]
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def _mpl_ok() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def run_colors(names: Sequence[str]) -> dict[str, tuple]:
    """One fixed colour per run, in the order the runs are given (tab10, then tab20 for > 10)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {n: cmap.colors[i % len(cmap.colors)] for i, n in enumerate(names)}


def _panels(keys: Union[Iterable[str], Mapping[str, Panel]]) -> list[tuple[str, str, Optional[list[str]]]]:
    """Normalise the panel spec to [(title, key, runs or None for all)]."""
    if isinstance(keys, Mapping):
        out = []
        for title, spec in keys.items():
            if isinstance(spec, str):
                out.append((str(title), spec, None))
            else:
                key, names = spec
                out.append((str(title), key, list(names)))
        return out
    if isinstance(keys, str):
        raise TypeError("keys must be a list of metric keys or a mapping, not a single string")
    return [(k, k, None) for k in keys]


def _build_curves(runs: Mapping[str, Sequence[dict]], keys: Union[Iterable[str], Mapping[str, Panel]],
                  title: str = ""):
    """The figure of `plot_curves` (a matplotlib Figure), or None when no panel has data."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    names = list(runs)
    color = run_colors(names)
    marker = {n: _MARKERS[i % len(_MARKERS)] for i, n in enumerate(names)}
    panels = []
    for ptitle, key, subset in _panels(keys):
        unknown = [n for n in subset or [] if n not in runs]
        if unknown:
            raise ValueError(f"panel {ptitle!r} names runs {unknown} that are not in runs {names}")
        members = subset if subset is not None else names
        data = {n: [(r["step"], r[key]) for r in runs[n] if r.get(key) is not None] for n in members}
        if any(data.values()):
            panels.append((ptitle, data))
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.1 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (ptitle, data) in zip(axes.flat, panels):
        for n, pts in data.items():
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, color=color[n], marker=marker[n], ms=3.5,
                    markevery=max(1, len(pts) // 12), lw=1.4, label=n)
        absent = [n for n, pts in data.items() if not pts]
        if absent:  # say so instead of leaving the reader to guess from the colours
            ax.text(0.02, 0.02, "not logged: " + ", ".join(absent), transform=ax.transAxes,
                    fontsize=6.5, color="0.35", va="bottom")
        ax.set_title(ptitle, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [Line2D([], [], color=color[n], marker=marker[n], ms=5, lw=1.6, label=n) for n in names]
    # as many legend columns as fit the figure's width (long run names wrap into rows)
    longest = max(len(n) for n in names)
    fit = int(fig.get_figwidth() * 72 / (8 * 0.6 * longest + 36))
    fig.legend(handles=handles, loc="outside lower center", ncols=max(1, min(len(names), 6, fit)),
               fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_curves(runs: Mapping[str, Sequence[dict]], keys: Union[Iterable[str], Mapping[str, Panel]],
                out: Path, title: str = "") -> Optional[Path]:
    """Save a PNG with one panel per metric and one line per run; None without matplotlib or data.

    ``runs``: run name -> its records (dicts with ``"step"``), as written by `JsonlLog`.
    ``keys``: either a list of metric keys (the panel title is the key), or a
    mapping panel title -> key, or panel title -> ``(key, [run names])`` to draw
    only those runs in that panel. Use the second form when one key means
    different things in different runs: e.g. ``"loss"`` is a PPO surrogate for
    the sampled-token objectives but the reverse KL for ``rkl``, so give them
    separate panels, ``{"loss (PPO surrogate)": ("loss", ["opd", "fire"]),
    "loss (reverse KL)": ("loss", ["rkl"])}``, never one shared axis.

    Every run keeps one colour and marker in every panel (the order of ``runs``
    fixes them) and the figure has one legend; a panel notes the runs that did
    not log its key. Panels without any data are left out.
    """
    if not _mpl_ok():
        return None
    fig = _build_curves(runs, keys, title)
    if fig is None:
        return None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    return out


def _coinciding(points: Sequence[tuple[str, float, float]], tol: float) -> list[list[int]]:
    """Groups of point indices within ``tol`` of the group's first point (in both coordinates)."""
    groups: list[list[int]] = []
    for i, (_, x, y) in enumerate(points):
        for g in groups:
            _, gx, gy = points[g[0]]
            if abs(x - gx) <= tol and abs(y - gy) <= tol:
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def _build_safety_plane(results: Mapping[str, dict], tol: float = 0.01):
    """The figure of `plot_safety_plane` (a matplotlib Figure), or None when no model has both rates."""
    from matplotlib.figure import Figure

    pts = [(n, float(r["helpfulness"]), float(r["safe_rate"])) for n, r in results.items()
           if isinstance(r, Mapping) and r.get("helpfulness") is not None and r.get("safe_rate") is not None]
    if not pts:
        return None
    color = run_colors([n for n, _, _ in pts])
    # No layout engine: the legend sits right of the axes, outside the figure box, and
    # savefig(bbox_inches="tight") grows the image to hold it, however long the names.
    fig = Figure(figsize=(5.0, 4.2))
    ax = fig.subplots()
    base = 55.0
    for group in _coinciding(pts, tol):
        # Points that (nearly) coincide stay at their true position, drawn as nested markers:
        # the first is the largest and lowest, each next one smaller and on top.
        for rank, i in enumerate(group):
            name, x, y = pts[i]
            size = base * (1.0 + 1.6 * (len(group) - 1 - rank))
            label = f"{name}  (help {x:.2f}, safe {y:.2f})"
            if len(group) > 1:
                others = [pts[j][0] for j in group if j != i]
                label += "  = same point as " + ", ".join(others)
            ax.scatter([x], [y], s=size, marker=_MARKERS[i % len(_MARKERS)], color=color[name],
                       alpha=0.85 if rank == len(group) - 1 else 0.45, edgecolors="black",
                       linewidths=0.6, zorder=3 + rank, clip_on=False, label=label)
    xs = [x for _, x, _ in pts]
    ys = [y for _, _, y in pts]
    margin = 0.06  # markers at 0 or 1 stay inside the axes
    ax.set_xlim(min(0.0, *xs) - margin, max(1.0, *xs) + margin)
    ax.set_ylim(min(0.0, *ys) - margin, max(1.0, *ys) + margin)
    ax.set_xlabel("helpfulness (benign accuracy)", fontsize=9)
    ax.set_ylabel("safe rate (unsafe refused)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=7.5,
              frameon=False, markerscale=0.8, title="model (better: top right)", title_fontsize=8)
    return fig


def plot_safety_plane(results: Mapping[str, dict], out: Path) -> Optional[Path]:
    """Save a PNG of each model as a point, helpfulness (x) against safe rate (y).

    ``results``: model name -> dict with ``"helpfulness"`` and ``"safe_rate"``
    (entries without both are skipped). Models are told apart by colour and
    marker in a legend (with their values) rather than by text labels next to
    points; points closer than 0.01 in both rates are drawn as nested markers
    and the legend says which coincide. None without matplotlib or points.
    """
    if not _mpl_ok():
        return None
    fig = _build_safety_plane(results)
    if fig is None:
        return None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    return out
