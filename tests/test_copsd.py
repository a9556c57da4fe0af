"""COPSD: constitution template, Cross-SFT data, reward/advantage, diagnostics, end to end."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import pyopd
from pyopd import cli
from pyopd.trainers.copsd import (
    DEFAULT_CONSTITUTION,
    SLOT,
    ConstitutionError,
    build_cross_sft_set,
    check_template,
    diversity,
    load_constitution,
    self_bleu,
    wrap,
)

TEMPLATE = "C:be nice\n" + SLOT


# ----------------------------------------------------------------------------- template


def test_default_constitution_has_one_slot():
    assert check_template(DEFAULT_CONSTITUTION) == DEFAULT_CONSTITUTION
    assert wrap(DEFAULT_CONSTITUTION, "hi?").endswith("hi?")


@pytest.mark.parametrize("text,match", [("", "empty"), ("   \n", "empty"),
                                        ("no slot here", "exactly once"),
                                        (f"{SLOT} and {SLOT}", "exactly once")])
def test_bad_templates_are_clear_errors(tmp_path, text, match):
    f = tmp_path / "c.txt"
    f.write_text(text)
    with pytest.raises(ConstitutionError, match=match):
        load_constitution(str(f))


def test_missing_constitution_file(tmp_path):
    with pytest.raises(ConstitutionError, match="does not exist"):
        load_constitution(str(tmp_path / "nope.txt"))


def test_template_with_braces_is_not_formatted():
    t = "Rules {like this}: " + SLOT
    assert wrap(t, "q{0}") == "Rules {like this}: q{0}"


# ----------------------------------------------------------------------------- Cross-SFT set


def test_cross_sft_sources_and_constitution_only_in_teacher_context():
    prompts = [("benign", "Q:a"), ("over_refusal", "Q:b"), ("unsafe", "Q:c"), ("benign", "Q:d")]
    seen = []

    def student(qs):
        seen.extend(qs)
        return [f"own:{q}" for q in qs]

    recs = build_cross_sft_set(prompts, student, {"Q:c": "#I cannot help with that."}, TEMPLATE)
    assert seen == ["Q:a", "Q:b", "Q:d"]  # the student answered the BARE prompts, unsafe excluded
    by = {r.prompt: r for r in recs}
    assert [r.category for r in recs] == ["benign", "over_refusal", "unsafe", "benign"]
    assert by[wrap(TEMPLATE, "Q:a")].response == "own:Q:a" and by[wrap(TEMPLATE, "Q:a")].source == "student"
    assert by[wrap(TEMPLATE, "Q:b")].source == "student"
    assert by[wrap(TEMPLATE, "Q:c")].response == "#I cannot help with that."
    assert by[wrap(TEMPLATE, "Q:c")].source == "frontier"
    assert all(r.prompt.startswith("C:be nice\n") for r in recs)


def test_cross_sft_needs_a_frontier_answer_per_unsafe_prompt():
    with pytest.raises(ValueError, match="no frontier answer"):
        build_cross_sft_set([("unsafe", "Q:x")], lambda qs: qs, {}, TEMPLATE)
    with pytest.raises(ValueError, match="unknown prompt categories"):
        build_cross_sft_set([("weird", "Q:x")], lambda qs: qs, {}, TEMPLATE)


# ----------------------------------------------------------------------------- reward / advantage


def test_reward_and_group_advantage_hand_computed():
    # One group of two rollouts, three valid tokens in all; a second group of one rollout.
    lq = torch.tensor([[-1.0, -5.0, 0.0], [-0.5, 0.0, 0.0], [-2.0, -2.0, 0.0]], dtype=torch.float64)
    lp = torch.tensor([[-2.0, -1.0, 0.0], [-4.0, 0.0, 0.0], [-1.0, -1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    group = torch.tensor([0, 0, 1])
    ga = pyopd.group_advantages(lq, lp, mask, group)
    # r = clip(lq - lp, -3, 5) + 0.02 on valid tokens: group 0 -> [1.02, -2.98, 3.52]
    r = torch.tensor([1.02, -2.98, 3.52], dtype=torch.float64)
    mean, std = r.mean(), r.std(unbiased=False)
    want = (r - mean) / (std + 1e-6)
    torch.testing.assert_close(ga.advantage[0, :2], want[:2])
    torch.testing.assert_close(ga.advantage[1, 0], want[2])
    assert float(ga.advantage[0, 2]) == 0.0 and float(ga.advantage[1, 1]) == 0.0
    # group 1: both rewards equal (-0.98): advantage exactly 0
    assert bool((ga.advantage[2] == 0).all())


# ----------------------------------------------------------------------------- diagnostics


def test_diversity_of_identical_and_distinct_groups():
    assert self_bleu(["abcd", "abcd", "abcd"]) == 1.0
    assert diversity([["abcd", "abcd"]]) == 0.0
    assert diversity([["", ""]]) == 0.0
    d = diversity([["the cat sat", "a dog ran far", "zzz qqq"]])
    assert 0.5 < d <= 1.0


# ----------------------------------------------------------------------------- end to end


def test_copsd_demo_both_stages_tiny(tmp_path):
    from pyopd.demo.copsd import run_copsd_demo
    from pyopd.trainers.opd import OPDConfig

    out = tmp_path / "copsd"
    base = OPDConfig(loss="copsd", steps=2, prompts_per_step=3, n=2, eval_every=2, save_every=1,
                     micro_batch=4, max_new_tokens=8, lr=5e-4, dual_clip=3.0)
    summary = run_copsd_demo(base, scale="safety-tiny", out=out, cache_dir=str(tmp_path / "cache"),
                             progress=False, log=lambda *_: None, n_eval=12, n_cross_sft=16)
    res = summary["results"]
    assert {"initial", "OPSD", "COPSD", "SFT on teacher answers"} <= set(res)
    for name in ("OPSD", "COPSD"):
        for key in ("safe_rate", "helpfulness", "over_refusal", "length", "length_benign", "entropy",
                    "diversity", "safety_tax"):
            assert key in res[name], (name, key)
        assert (out / name.lower() / "checkpoint-2" / "COMPLETE").is_file()
    assert len(list(out.glob("teacher-cross-sft-*/config.json"))) == 1
    recs = [json.loads(ln) for ln in (out / "copsd" / "metrics.jsonl").read_text().splitlines()]
    assert "rollout/diversity" in recs[-1] and "reward_mean" in recs[-1]
    assert summary["machine"]["torch"] == torch.__version__ and summary["machine"]["cpu"]


def test_demo_split_is_checked_before_any_model_is_built(tmp_path):
    from pyopd.demo.copsd import run_copsd_demo
    from pyopd.trainers.opd import OPDConfig

    with pytest.raises(ValueError, match="split"):
        run_copsd_demo(OPDConfig(loss="copsd"), scale="safety-tiny", out=tmp_path / "o",
                       cache_dir=str(tmp_path / "cache"), split="test", log=lambda *_: None)
    assert not (tmp_path / "cache").exists()


def test_demo_lengths_count_refusals_of_unsafe_prompts_apart(monkeypatch):
    import pyopd.demo.copsd as cdemo
    from pyopd.tasks.base import Example

    examples = [Example("Q:a\nA:", "", "x", kind="unsafe"), Example("Q:b\nA:", "", "ba", kind="benign"),
                Example("Q:c\nA:", "", "cd", kind="alarming")]
    comps = ["#I can't help.", "a-b > b-a #ba", "#I can't help."]
    monkeypatch.setattr(cdemo, "_greedy", lambda model, tok, prompts, max_new: comps)
    res = cdemo._greedy_safety(None, None, examples, [e.prompt for e in examples], 10)
    assert res["length"] == pytest.approx((14 + 13 + 14) / 3)
    assert res["length_benign"] == pytest.approx((13 + 14) / 2)  # the unsafe refusal is left out
    assert res["over_refusal"] == 1.0 and res["safe_rate"] == 1.0 and res["helpfulness"] == 1.0


def test_copsd_resume_reproduces_an_uninterrupted_run(tmp_path):
    from pyopd.tasks.prepare import prepare_models
    from pyopd.tasks.safety import SafetyTask
    from pyopd.trainers.opd import OPDConfig, OPDTrainer, PromptBatch

    prepared = prepare_models("safety-tiny", cache_dir=tmp_path / "cache", log=None)
    tok, task = prepared.load_tokenizer(), SafetyTask()

    def source(step, count, rng):
        exs = task.sample(count, rng)
        return PromptBatch([e.prompt for e in exs], ["t"] * count,
                           teacher_prompts=[wrap(TEMPLATE, e.prompt) for e in exs])

    def run(out, steps, resume=False):
        cfg = OPDConfig(loss="copsd", steps=steps, prompts_per_step=3, n=2, micro_batch=4,
                        max_new_tokens=8, save_every=1, out_dir=str(out), dual_clip=3.0, lr=1e-3)
        tr = OPDTrainer(cfg, prepared.load_student(), {"t": prepared.load_student()}, tok, source,
                        reference=prepared.load_student(), log=lambda *_: None, progress=False)
        tr.train(resume=resume)
        return tr

    full = run(tmp_path / "full", 3)
    run(tmp_path / "part", 2)
    resumed = run(tmp_path / "part", 3, resume=True)
    for a, b in zip(full.student.parameters(), resumed.student.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- CLI


def test_cli_copsd_bad_template_and_prompts(tmp_path, capsys):
    bad = tmp_path / "c.txt"
    bad.write_text("no slot")
    assert cli.main(["copsd", "--constitution", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "--constitution" in capsys.readouterr().err
    empty = tmp_path / "e.txt"
    empty.write_text("")
    assert cli.main(["copsd", "--constitution", str(empty)]) == 2
    assert "empty" in capsys.readouterr().err
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi", "category": "scary"}) + "\n")
    assert cli.main(["copsd", "--student", str(model), "--prompts", str(prompts)]) == 2
    assert "category" in capsys.readouterr().err
    prompts.write_text(json.dumps({"prompt": "x", "category": "unsafe"}) + "\n")
    assert cli.main(["copsd", "--student", str(model), "--prompts", str(prompts)]) == 2
    assert "--frontier-answers" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
