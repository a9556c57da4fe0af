"""The command line: every flag reaches the config, bad input exits 2 before anything is written."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import pytest

from pyopd import cli
from pyopd import config as C


def _valid_other_value(f, current):
    """A value inside the field's range that differs from ``current``."""
    meta = f.metadata
    if meta.get("choices"):
        return next(c for c in meta["choices"] if c != current)
    if meta.get("nargs"):
        return (-2.5, 4.5)
    if f.name == "loss":
        return "opd" if current != "opd" else "tip"
    if isinstance(current, bool):
        return not current
    lo, hi = meta.get("lo"), meta.get("hi")
    if isinstance(current, int) and not isinstance(current, bool):
        return current + 1 if hi is None or current + 1 <= hi else current - 1
    # floats (and Optional floats such as dual_clip)
    lo = 0.0 if lo is None else lo
    hi = lo + 10.0 if hi is None else hi
    cand = lo + (hi - lo) * 0.37
    return cand if cand != current else lo + (hi - lo) * 0.61


def _flags(command):
    return [f for f in fields(C.OPDConfig) if f.metadata.get("flag", True) and command in f.metadata["commands"]]


def _argv(f, value):
    flag = "--" + f.name.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    return [flag, *map(str, value)] if isinstance(value, tuple) else [flag, str(value)]


@pytest.mark.parametrize("command", ["fire-opd", "copsd"])
@pytest.mark.parametrize("demo", [False, True])
def test_every_flag_reaches_the_config(command, demo, tmp_path):
    parser = cli.build_parser()
    flags = _flags(command)
    assert len(flags) >= 20
    for f in flags:
        if command == "copsd" and f.name == "loss":
            continue
        current = C.default_for(f.name, command, demo)
        value = _valid_other_value(f, current)
        args = parser.parse_args([command, *_argv(f, value), "--out", str(tmp_path / "o")])
        fixed = {"loss": "copsd"} if command == "copsd" else {}
        cfg = cli._config(command, args, demo=demo, **fixed)
        got = getattr(cfg, f.name)
        assert got == (tuple(value) if isinstance(value, tuple) else value), (command, demo, f.name)
        # and no other field moved away from its preset (demo: max_new_tokens comes from the task)
        for g in fields(C.OPDConfig):
            if g.name in (f.name, "out_dir", "loss") or (demo and g.name == "max_new_tokens"):
                continue
            assert getattr(cfg, g.name) == C.default_for(g.name, command, demo), (f.name, g.name)


def test_demo_flags_reach_the_trainer(monkeypatch, tmp_path):
    """The measured bug: `pyopd fire-opd --micro-batch 8` trained with 32 (a demo default won)."""
    import pyopd.demo.fire_opd as demo

    seen = []

    class Stop(Exception):
        pass

    def fake_run(cfg, **kw):
        seen.append(cfg)
        raise Stop

    monkeypatch.setattr(demo, "run_demo", fake_run)
    with pytest.raises(Stop):
        cli.main(["fire-opd", "--micro-batch", "8", "--lr", "2e-4", "--out", str(tmp_path / "o")])
    assert seen[0].micro_batch == 8 and seen[0].lr == 2e-4 and seen[0].steps == C.DEMO_DEFAULTS["fire-opd"]["steps"]

    import pyopd.demo.copsd as cdemo

    monkeypatch.setattr(cdemo, "run_copsd_demo", fake_run)
    with pytest.raises(Stop):
        cli.main(["copsd", "--dual-clip", "2.0", "--micro-batch", "8", "--out", str(tmp_path / "c")])
    assert seen[1].dual_clip == 2.0 and seen[1].micro_batch == 8 and seen[1].loss == "copsd"


BAD = [
    ("--alpha", "-1"), ("--beta", "-0.5"), ("--alpha", "1e39"), ("--dual-clip", "0.5"), ("--tip-rho", "0"),
    ("--exopd-lambda", "nan"), ("--lr", "inf"), ("--lr", "1e308"), ("--lr", "0"), ("--max-grad-norm", "nan"),
    ("--max-grad-norm", "-1"), ("--eval-every", "-1"), ("--percentile", "120"), ("--temperature", "0"),
    ("--temperature", "1e-39"), ("--clip", "2"), ("--steps", "0"), ("--top-p", "0"), ("--n", "0"),
    ("--weight-decay", "-0.1"), ("--seed", "-1"),
]
BAD_COPSD = [("--kl-coef", "-1"), ("--reward-bonus", "inf"), ("--reward-clip", "5", "-3"),
             ("--cross-sft-epochs", "0"), ("--dual-clip", "1")]


@pytest.mark.parametrize("bad", BAD, ids=lambda b: " ".join(b))
def test_bad_option_exits_2_before_writing(bad, tmp_path, capsys):
    out = tmp_path / "o"
    rc = cli.main(["fire-opd", *bad, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert bad[0] in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("bad", BAD_COPSD, ids=lambda b: " ".join(b))
def test_bad_copsd_option_exits_2_before_writing(bad, tmp_path, capsys):
    out = tmp_path / "o"
    rc = cli.main(["copsd", *bad, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert bad[0] in err
    assert not out.exists()


def test_options_a_command_does_not_use_are_not_offered(capsys):
    with pytest.raises(SystemExit):
        cli.main(["copsd", "--percentile", "10"])
    assert "unrecognized arguments: --percentile" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["fire-opd", "--kl-coef", "0.1"])


def test_non_utf8_files_are_usage_errors(tmp_path, capsys):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    rc = cli.main(["fire-opd", "--student", str(model), "--teacher", str(model), "--prompts", str(bad),
                   "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "--prompts" in err and "UTF-8" in err
    const = tmp_path / "c.txt"
    const.write_bytes("R\xe8gle {user_query}".encode("latin-1"))
    rc = cli.main(["copsd", "--constitution", str(const), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "--constitution" in err and "UTF-8" in err
    assert not (tmp_path / "o").exists()


def test_demo_rerun_into_existing_out_is_refused(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    rc = cli.main(["fire-opd", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "--resume" in err and "--overwrite" in err
    assert (out / "summary.json").read_text() == "{}"
    rc = cli.main(["fire-opd", "--out", str(out), "--resume", "--overwrite"])
    assert rc == 2


def test_help_does_not_import_torch(tmp_path):
    code = ("import sys; from pyopd import cli\n"
            "try:\n    cli.main(['fire-opd', '-h'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'help imported torch'\n")
    from _helpers import subprocess_env

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env=subprocess_env())
    assert r.returncode == 0, r.stderr
    assert "--percentile" in r.stdout and "default 20" in r.stdout and "demo 0.0003" in r.stdout


def test_objective_catalog_matches_the_registry():
    from pyopd.objectives import get_objective, objective_names

    assert tuple(C.objective_catalog()) == objective_names()
    for name, summary in C.objective_catalog().items():
        assert get_objective(name).summary == summary
