"""The FiRe-OPD demo end to end on the tiny models: summary rows with standard errors, paired
differences, the settings, several seeds combined."""
from __future__ import annotations

import json
import math

import pytest

from pyopd import cli

TINY = ["--scale", "tiny", "--steps", "1", "--prompts-per-step", "2", "--n", "2", "--no-progress"]


def _run(tmp_path, name, *extra):
    out = tmp_path / name
    rc = cli.main(["fire-opd", *TINY, "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *extra])
    assert rc == 0
    return out, json.loads((out / "summary.json").read_text())


def test_fire_opd_demo_summary_has_every_metric_with_its_standard_error(tmp_path, capsys):
    out, summary = _run(tmp_path, "demo", "--losses", "opd,fire")
    printed = capsys.readouterr().out
    assert summary["setting"] == "single" and summary["split"] == "test"
    assert set(summary["rows"]) == {"student (start)", "teacher same", "OPD", "FiRe-OPD"}
    for name, row in summary["rows"].items():
        for key in ("headline", "headline_se", "greedy", "greedy_se", "pass@4", "pass@4_se"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), (name, key)
        assert 0.0 <= row["headline"] <= 1.0 and row["greedy_se"] >= 0.0
    assert summary["rows"]["FiRe-OPD"]["tokens_per_s"] > 0
    # paired differences: each objective vs the start, and vs OPD
    assert set(summary["paired"]) == {"OPD - student (start)", "FiRe-OPD - student (start)", "FiRe-OPD - OPD"}
    for p in summary["paired"].values():
        for m in ("headline", "greedy"):
            lo, hi = p[m]["ci95"]
            assert lo <= p[m]["diff"] <= hi
    fire, start = summary["rows"]["FiRe-OPD"], summary["rows"]["student (start)"]
    assert math.isclose(summary["paired"]["FiRe-OPD - student (start)"]["headline"]["diff"],
                        fire["headline"] - start["headline"], abs_tol=1e-9)
    pp = json.loads((out / "per_prompt.json").read_text())
    assert len(pp["prompts"]) == summary["eval_prompts"] == len(pp["rows"]["OPD"]["avg"])
    assert "avg@4 (T=1)" in printed and "greedy acc." in printed and "teacher same" in printed
    assert "FiRe-OPD - OPD" in printed
    # a second run into the same --out is refused, --resume continues it
    assert cli.main(["fire-opd", "--scale", "tiny", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("setting, teachers", [("strong-to-weak", ["mixed"]), ("multi", ["arith", "strings"])])
def test_settings_use_their_teachers(tmp_path, setting, teachers):
    _, summary = _run(tmp_path, setting, "--losses", "opd", "--setting", setting)
    assert summary["setting"] == setting and summary["teachers"] == teachers
    assert {f"teacher {t}" for t in teachers} <= set(summary["rows"])
    if setting == "multi":  # the teacher the student learns from: each prompt's own specialist
        assert "teachers (routed)" in summary["rows"] and "teachers (routed) - student (start)" not in summary["paired"]
        from pyopd.demo.fire_opd import routed

        assert routed([[0.1, 0.2], [0.3, 0.4]], [[1, 0], [0, 1]], ["arith", "strings"], ["strings", "arith"]) \
            == ([0.3, 0.2], [0, 0])


def test_setting_flags_are_checked(tmp_path, capsys):
    assert cli.main(["fire-opd", "--setting", "single", "--multi-teacher", "--out", str(tmp_path / "a")]) == 2
    assert "--multi-teacher" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: an unknown choice
        cli.main(["fire-opd", "--setting", "nope", "--out", str(tmp_path / "b")])
    assert e.value.code == 2 and "--setting" in capsys.readouterr().err
    assert cli.main(["fire-opd", "--student", str(tmp_path), "--teacher", str(tmp_path), "--setting", "multi",
                     "--out", str(tmp_path / "c")]) == 2
    assert "--setting" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")


def test_evaluation_seed_follows_the_training_seed(tmp_path):
    _, s0 = _run(tmp_path, "s0", "--losses", "opd")
    _, s1 = _run(tmp_path, "s1", "--losses", "opd", "--seed", "1")
    assert s0["eval_seed"] != s1["eval_seed"]
    # the same prompts for every seed, so runs combine
    from pyopd.demo.fire_opd import combine_seeds, format_combined

    c = combine_seeds([tmp_path / "s0", tmp_path / "s1"])
    assert c["seeds"] == [0, 1] and set(c["per_seed"]) == {0, 1}
    assert set(c["paired"]) == {"OPD - student (start)"}
    start = c["rows"]["student (start)"]["headline"]
    assert math.isclose(start, (s0["rows"]["student (start)"]["headline"] +
                                s1["rows"]["student (start)"]["headline"]) / 2, abs_tol=1e-9)
    assert "| OPD - student (start) |" in format_combined(c)
    with pytest.raises(ValueError, match="at least one"):
        combine_seeds([])


def test_paired_difference_hand_computed():
    from pyopd.demo.fire_opd import paired

    p = paired([1.0, 0.5, 0.0, 1.0], [0.5, 0.5, 0.0, 0.0])
    d = [0.5, 0.0, 0.0, 1.0]
    m = sum(d) / 4
    se = math.sqrt(sum((x - m) ** 2 for x in d) / 3 / 4)
    assert math.isclose(p["diff"], m) and math.isclose(p["se"], se)
    assert math.isclose(p["ci95"][0], m - 1.959964 * se) and math.isclose(p["ci95"][1], m + 1.959964 * se)
    with pytest.raises(ValueError, match="equal"):
        paired([1.0], [1.0, 0.0])


def test_standard_errors():
    from pyopd.demo.fire_opd import _binomial_se, _mean_se

    assert math.isclose(_binomial_se([1, 0, 1, 0]), math.sqrt(1 / 3 / 4))
    assert math.isclose(_mean_se([0.25, 0.75]), 0.25)
