"""The demo figures tell the truth: one colour per run in every panel, one legend, separate
panels for keys that mean different things, a readable safety plane."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.image import imread  # noqa: E402

from pyopd.trainers.records import _build_curves, _build_safety_plane, plot_curves, plot_safety_plane  # noqa: E402


def _history(name: str, steps: int = 6) -> list[dict]:
    recs = [{"step": 0, "eval/accuracy": 0.1}]
    for s in range(1, steps + 1):
        r = {"step": s, "loss": 0.01 * s if "rkl" not in name else 2.0 / s, "teacher_logprob": -1.0 + 0.1 * s}
        if name.startswith("fire"):
            r["keep_ratio"] = 0.8  # only the FiRe runs log it
        if s % 3 == 0:
            r["eval/accuracy"] = 0.1 + 0.05 * s
        recs.append(r)
    return recs


RUNS = {n: _history(n) for n in ("opd", "fire", "rkl", "fire-rkl")}


def _line_colors(fig) -> dict[str, dict[str, tuple]]:
    """panel title -> {run: rgba} from the drawn lines."""
    return {ax.get_title(): {ln.get_label(): to_rgba(ln.get_color()) for ln in ax.get_lines()}
            for ax in fig.axes if ax.get_title()}


def test_each_run_has_one_colour_in_every_panel_even_when_missing_from_one():
    fig = _build_curves(RUNS, ["eval/accuracy", "keep_ratio", "teacher_logprob"])
    panels = _line_colors(fig)
    # keep_ratio lacks opd and rkl: fire must keep ITS colour there, not take the first one
    assert set(panels["keep_ratio"]) == {"fire", "fire-rkl"}
    assert set(panels["eval/accuracy"]) == set(RUNS)
    for name in RUNS:
        seen = {p[name] for p in panels.values() if name in p}
        assert len(seen) == 1, (name, panels)
    every = [panels["eval/accuracy"][n] for n in RUNS]
    assert len(set(every)) == len(RUNS)  # distinct runs, distinct colours


def test_one_shared_legend_lists_every_run_in_order_with_its_colour():
    fig = _build_curves(RUNS, ["keep_ratio", "eval/accuracy"])
    assert all(ax.get_legend() is None for ax in fig.axes)  # no per-panel legend
    assert len(fig.legends) == 1
    leg = fig.legends[0]
    assert [t.get_text() for t in leg.get_texts()] == list(RUNS)
    colours = _line_colors(fig)["eval/accuracy"]
    for handle, text in zip(leg.legend_handles, leg.get_texts()):
        assert to_rgba(handle.get_color()) == colours[text.get_text()]


def test_missing_runs_are_named_in_the_panel():
    fig = _build_curves(RUNS, ["keep_ratio", "teacher_logprob"])
    ax = next(a for a in fig.axes if a.get_title() == "keep_ratio")
    assert [t.get_text() for t in ax.texts] == ["not logged: opd, rkl"]
    ax = next(a for a in fig.axes if a.get_title() == "teacher_logprob")
    assert len(ax.texts) == 0


def test_mapping_puts_different_kinds_of_loss_on_separate_panels():
    panels = {"loss (PPO surrogate)": ("loss", ["opd", "fire"]),
              "loss (reverse KL)": ("loss", ["rkl", "fire-rkl"]),
              "accuracy": "eval/accuracy"}
    fig = _build_curves(RUNS, panels)
    drawn = _line_colors(fig)
    assert list(drawn) == list(panels)  # titles from the mapping, in order
    assert set(drawn["loss (PPO surrogate)"]) == {"opd", "fire"}
    assert set(drawn["loss (reverse KL)"]) == {"rkl", "fire-rkl"}
    assert set(drawn["accuracy"]) == set(RUNS)
    assert drawn["loss (reverse KL)"]["rkl"] == drawn["accuracy"]["rkl"]
    with pytest.raises(ValueError, match="panel 'x' names runs \\['nope'\\]"):
        _build_curves(RUNS, {"x": ("loss", ["nope"])})


def test_plot_curves_writes_a_png_and_skips_empty_panels(tmp_path):
    fig = _build_curves(RUNS, ["eval/accuracy", "never_logged"])
    assert [a.get_title() for a in fig.axes if a.get_title()] == ["eval/accuracy"]
    out = plot_curves(RUNS, ["eval/accuracy", "loss"], tmp_path / "sub" / "curves.png", title="t")
    assert out == tmp_path / "sub" / "curves.png"
    assert imread(out).shape[2] in (3, 4)
    assert plot_curves(RUNS, ["never_logged"], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


# ----------------------------------------------------------------------------- safety plane

RESULTS = {
    "initial": {"helpfulness": 0.6, "safe_rate": 0.4, "safety_tax": 0.0},
    "teacher (initial + constitution)": {"helpfulness": 0.55, "safe_rate": 1.0},
    "teacher (Cross-SFT + constitution)": {"helpfulness": 0.7, "safe_rate": 1.0},
    "SFT on teacher answers": {"helpfulness": 0.45, "safe_rate": 1.0},
    "OPSD": {"helpfulness": 1.0, "safe_rate": 1.0},
    "COPSD": {"helpfulness": 1.0, "safe_rate": 1.0},
    "no rates": {"accuracy": 0.3},
}


def test_safety_plane_uses_a_legend_with_distinct_markers_and_no_point_labels():
    fig = _build_safety_plane(RESULTS)
    ax = fig.axes[0]
    assert len(ax.texts) == 0  # no overlapping text labels next to points
    leg = ax.get_legend()
    labels = [t.get_text() for t in leg.get_texts()]
    assert len(labels) == 6 and not any(lbl.startswith("no rates") for lbl in labels)
    assert labels[0] == "initial  (help 0.60, safe 0.40)"
    styles = set()
    for coll in ax.collections:
        marker = tuple(map(tuple, coll.get_paths()[0].vertices.round(3).tolist()))
        styles.add((marker, tuple(coll.get_facecolor()[0][:3].round(3))))
    assert len(styles) == 6


def test_coinciding_points_stay_true_and_are_called_out_in_the_legend():
    fig = _build_safety_plane(RESULTS)
    ax = fig.axes[0]
    labels = {t.get_text().split("  ")[0]: t.get_text() for t in ax.get_legend().get_texts()}
    assert labels["OPSD"].endswith("= same point as COPSD")
    assert labels["COPSD"].endswith("= same point as OPSD")
    assert sum("same point" in v for v in labels.values()) == 2
    by_label = {c.get_label().split("  ")[0]: c for c in ax.collections}
    assert by_label["OPSD"].get_offsets().tolist() == [[1.0, 1.0]]  # drawn where they are
    assert by_label["COPSD"].get_offsets().tolist() == [[1.0, 1.0]]
    # nested: the one drawn underneath is larger, so both stay visible
    assert by_label["OPSD"].get_sizes()[0] > by_label["COPSD"].get_sizes()[0]
    assert by_label["COPSD"].get_zorder() > by_label["OPSD"].get_zorder()


def test_safety_plane_clips_nothing(tmp_path):
    fig = _build_safety_plane(RESULTS)
    ax = fig.axes[0]
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    for c in ax.collections:
        (x, y), = c.get_offsets().tolist()
        assert x0 + 0.05 <= x <= x1 - 0.05 and y0 + 0.05 <= y <= y1 - 0.05
        assert not c.get_clip_on()
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    leg = ax.get_legend().get_window_extent(renderer)
    assert leg.x0 >= ax.get_window_extent(renderer).x1  # beside the axes, never over the points
    out = plot_safety_plane(RESULTS, tmp_path / "plane.png")
    h, w = imread(out).shape[:2]
    # bbox_inches='tight' grows the PNG to hold the legend: wider than the drawing area alone
    assert w / 110 > fig.get_figwidth() * 0.9 and h > 0
    assert plot_safety_plane({"x": {"accuracy": 1.0}}, tmp_path / "none.png") is None
    assert not Path(tmp_path / "none.png").exists()


def test_long_names_neither_warn_nor_squash_the_axes(tmp_path):
    # (warnings are errors here: a layout engine giving up on a wide legend would fail this)
    long = {f"{'teacher with a long descriptive name ' * 2}{i}": {"helpfulness": i / 8, "safe_rate": 1.0}
            for i in range(9)}
    assert plot_safety_plane(long, tmp_path / "plane.png") is not None
    runs = {f"a very long run name number {i}": _history("opd", 2) for i in range(7)}
    assert plot_curves(runs, ["loss"], tmp_path / "curves.png") is not None
    fig = _build_curves(runs, ["loss"])
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    rows = {round(t.get_window_extent(renderer).y0) for t in fig.legends[0].get_texts()}
    assert len(rows) > 1  # wraps into rows instead of running off the figure
