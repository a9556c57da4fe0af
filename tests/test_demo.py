"""The FiRe-OPD demo end to end on the tiny models: summary rows with standard errors, the table."""
from __future__ import annotations

import json
import math

from pyopd import cli


def test_fire_opd_demo_summary_has_every_metric_with_its_standard_error(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli.main(["fire-opd", "--scale", "tiny", "--steps", "1", "--prompts-per-step", "2", "--n", "2",
                   "--losses", "opd,fire", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                   "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["rows"]) == {"student (start)", "teacher mixed", "OPD", "FiRe-OPD"}
    for name, row in summary["rows"].items():
        for key in ("headline", "headline_se", "greedy", "greedy_se", "pass@4", "pass@4_se"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), (name, key)
        assert 0.0 <= row["headline"] <= 1.0 and row["greedy_se"] >= 0.0
    assert summary["rows"]["FiRe-OPD"]["tokens_per_s"] > 0
    assert "avg@4 (T=1)" in printed and "greedy acc." in printed and "teacher mixed" in printed
    # a second run into the same --out is refused, --resume continues it
    assert cli.main(["fire-opd", "--scale", "tiny", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_standard_errors():
    from pyopd.demo.fire_opd import _binomial_se, _mean_se

    assert math.isclose(_binomial_se([1, 0, 1, 0]), math.sqrt(1 / 3 / 4))
    assert math.isclose(_mean_se([0.25, 0.75]), 0.25)
