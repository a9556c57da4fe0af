"""The OPD trainer end to end on tiny built-in models: loop, routing, checkpoint/resume, CLI errors."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from pyopd import cli
from pyopd.demo import make_evaluator, make_prompt_source
from pyopd.trainers import checkpoint as ckpt_io
from pyopd.trainers.opd import OPDConfig, OPDTrainer, PromptBatch
from pyopd.trainers.records import read_jsonl
from pyopd.trainers.rollout import response_mask, score


def _cfg(out: Path, **kw) -> OPDConfig:
    base = dict(loss="fire", steps=4, prompts_per_step=4, n=2, micro_batch=3, mini_batches=2,
                max_new_tokens=10, eval_every=2, save_every=2, out_dir=str(out), lr=1e-3, seed=3)
    base.update(kw)
    return OPDConfig(**base)


def _trainer(prepared, task, cfg, teachers=("mixed",), evaluate=True):
    tok = prepared.load_tokenizer()
    student = prepared.load_student()
    ts = {n: prepared.load_teacher(n) for n in teachers}
    route = (lambda e: e.family) if len(teachers) > 1 else (lambda e: teachers[0])
    ev = make_evaluator(task, tok, task.eval_set(8), 10) if evaluate else None
    return OPDTrainer(cfg, student, ts, tok, make_prompt_source(task, route), evaluate=ev,
                      log=lambda *_: None, progress=False)


def test_response_mask_stops_after_first_eos():
    r = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 9, 9, 9, 9]])
    m = response_mask(r, eos_id=2)
    assert m.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


@pytest.mark.parametrize("loss", ["opd", "fire", "rkl", "fire-rkl", "tip"])
def test_full_loop_runs_and_logs(prepared, task, tmp_path, loss):
    tr = _trainer(prepared, task, _cfg(tmp_path, loss=loss, steps=2))
    before = [p.detach().clone() for p in tr.student.parameters()]
    hist = tr.train()
    assert [h["step"] for h in hist] == [0, 1, 2]
    assert "eval/accuracy" in hist[0] and "eval/accuracy" in hist[-1]
    for h in hist[1:]:
        assert all(v == v for v in h.values() if isinstance(v, float)), h  # no NaN
        assert h["tokens"] > 0
    changed = any(not torch.equal(a, b) for a, b in zip(before, tr.student.parameters()))
    assert changed
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [0, 1, 2]
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path)] == ["checkpoint-2"]
    if loss.startswith("fire"):
        assert "keep_ratio" in hist[1] and 0 < hist[1]["keep_ratio"] <= 1


def test_resume_reproduces_an_uninterrupted_run(prepared, task, tmp_path):
    full = _trainer(prepared, task, _cfg(tmp_path / "full"), evaluate=False)
    full.train()
    part = _trainer(prepared, task, _cfg(tmp_path / "part", steps=2), evaluate=False)
    part.train()
    # A new process would build everything again: a fresh trainer resumes from disk.
    resumed = _trainer(prepared, task, _cfg(tmp_path / "part"), evaluate=False)
    resumed.train(resume=True)
    assert resumed.step == full.step == 4
    for (n, a), b in zip(full.student.named_parameters(), resumed.student.parameters()):
        assert torch.equal(a, b), n
    steps = [r["step"] for r in read_jsonl(tmp_path / "part" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]


def test_interrupted_save_keeps_the_previous_checkpoint(prepared, task, tmp_path, monkeypatch):
    tr = _trainer(prepared, task, _cfg(tmp_path, steps=2, save_every=1), evaluate=False)
    tr.train()
    good = ckpt_io.latest_checkpoint(tmp_path)
    assert good.name == "checkpoint-2"

    def boom(*a, **k):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(ckpt_io.torch, "save", boom)
    tr.step = 3
    with pytest.raises(KeyboardInterrupt):
        tr.save()
    monkeypatch.undo()
    assert ckpt_io.latest_checkpoint(tmp_path) == good
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".checkpoint")] == []
    # and a directory that merely looks like a checkpoint is never resumed from
    (tmp_path / "checkpoint-9").mkdir()
    assert ckpt_io.latest_checkpoint(tmp_path) == good


def test_multi_teacher_rows_are_scored_by_their_own_teacher(prepared, task, tmp_path):
    tr = _trainer(prepared, task, _cfg(tmp_path, steps=1), teachers=("arith", "strings"),
                  evaluate=False)
    batch = tr.prompts(0, 6, random.Random(0))
    assert set(batch.teachers) == {"arith", "strings"}
    sc = tr.rollout_and_score(batch)
    ro = sc["rollouts"]
    pad = tr.tok.pad_token_id
    alone = {n: score(tr.teachers[n], ro.prompt_ids, ro, pad) for n in ("arith", "strings")}
    assert not torch.allclose(alone["arith"].logprob, alone["strings"].logprob)  # they disagree
    for i in range(ro.size):
        want = batch.teachers[int(ro.group[i])]
        assert tr.teacher_names[int(sc["batch"].teacher_index[i])] == want
        torch.testing.assert_close(sc["batch"].teacher.logprob[i], alone[want].logprob[i])
        torch.testing.assert_close(sc["batch"].teacher.entropy[i], alone[want].entropy[i])


def test_unknown_teacher_name_is_an_error(prepared, task, tmp_path):
    tr = _trainer(prepared, task, _cfg(tmp_path, steps=1), evaluate=False)
    with pytest.raises(ValueError, match="teachers \\['nobody'\\]"):
        tr.rollout_and_score(PromptBatch(["Q:1+1=?\nA:"], ["nobody"]))


def test_teacher_with_smaller_vocabulary_is_rejected(prepared, task, tmp_path):
    tok = prepared.load_tokenizer()
    student = prepared.load_teacher("mixed")  # padded vocabulary
    small = prepared.load_student()
    if small.get_output_embeddings().weight.shape[0] >= student.get_output_embeddings().weight.shape[0]:
        pytest.skip("tiny models share the vocabulary size")
    with pytest.raises(ValueError, match="vocabulary"):
        OPDTrainer(_cfg(tmp_path), student, {"t": small}, tok, make_prompt_source(task, lambda e: "t"))


# ----------------------------------------------------------------------------- the CLI


def _run_cli(argv, capsys):
    rc = cli.main(argv)
    return rc, capsys.readouterr()


def test_cli_missing_model_dir(tmp_path, capsys):
    out = tmp_path / "out"
    rc, io = _run_cli(["fire-opd", "--student", str(tmp_path / "nope"), "--teacher", str(tmp_path),
                       "--prompts", "x.jsonl", "--out", str(out)], capsys)
    assert rc == 2 and "--student" in io.err and "does not exist" in io.err
    assert not out.exists()


def test_cli_bad_percentile(tmp_path, capsys):
    rc, io = _run_cli(["fire-opd", "--percentile", "120", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "percentile" in io.err
    assert not (tmp_path / "o").exists()


def test_cli_jsonl_without_prompt(prepared, tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "Q:1+2=?\\nA:"}\n{"question": "no prompt here"}\n')
    rc, io = _run_cli(["fire-opd", "--student", str(prepared.student_dir), "--teacher",
                       str(prepared.teacher_dirs["mixed"]), "--prompts", str(bad),
                       "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "line 2" in io.err and "prompt" in io.err
    assert not (tmp_path / "o").exists()


def test_cli_vocabulary_mismatch(prepared, tmp_path, capsys):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "Q:1+2=?\\nA:"}\n')
    # The padded-vocabulary teacher as the *student*: the real student is then too small a teacher.
    rc, io = _run_cli(["fire-opd", "--student", str(prepared.teacher_dirs["mixed"]), "--teacher",
                       str(prepared.student_dir), "--prompts", str(good), "--out", str(tmp_path / "o"),
                       "--no-progress"], capsys)
    assert rc == 2 and "vocabulary" in io.err
    assert not (tmp_path / "o").exists()


def test_cli_real_models_run_and_resume(prepared, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "teacher": t}) + "\n" for p, t in
                               [("Q:1+2=?\nA:", "teacher"), ("Q:rev abc\nA:", "teacher2")]))
    out = tmp_path / "run"
    argv = ["fire-opd", "--student", str(prepared.student_dir), "--teacher",
            str(prepared.teacher_dirs["arith"]), "--teacher2", str(prepared.teacher_dirs["strings"]),
            "--prompts", str(prompts), "--out", str(out), "--prompts-per-step", "2",
            "--n", "2", "--max-new-tokens", "6", "--no-progress", "--save-every", "1"]
    rc, _ = _run_cli(argv + ["--steps", "1"], capsys)
    assert rc == 0 and (out / "checkpoint-1" / "COMPLETE").is_file()
    rc, io = _run_cli(argv + ["--steps", "1"], capsys)  # same --out without --resume: refused
    assert rc == 2 and "--resume" in io.err
    rc, _ = _run_cli(argv + ["--steps", "2", "--resume"], capsys)
    assert rc == 0 and (out / "checkpoint-2" / "COMPLETE").is_file()


def test_cli_teacher_tokenizer_that_numbers_tokens_differently(prepared, tmp_path, capsys):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(prepared.teacher_dirs["mixed"], teacher)
    spec = json.loads((teacher / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # same size, two ids swapped
    (teacher / "tokenizer.json").write_text(json.dumps(spec))
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "Q:1+2=?\\nA:"}\n')
    rc, io = _run_cli(["fire-opd", "--student", str(prepared.student_dir), "--teacher", str(teacher),
                       "--prompts", str(good), "--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert rc == 2 and "share the vocabulary" in io.err and "'a'" in io.err
    assert not (tmp_path / "o").exists()


def _one_step_cpu_then(other: str, prepared, task, tmp_path, monkeypatch, loss, fused):
    """(loss, parameters) after one step on the CPU and on ``other``, from the same rollouts
    (sampled on the CPU, replayed on the other device: sampling RNGs differ between devices)."""
    import pyopd.trainers.opd as opd_mod
    from pyopd.trainers.rollout import Rollouts

    real, recorded, out = opd_mod.sample_rollouts, {}, {}

    def record(model, *a, **k):
        recorded["ro"] = real(model, *a, **k)
        return recorded["ro"]

    def replay(model, *a, **k):
        ro, dev = recorded["ro"], model.device
        return Rollouts(ro.prompts, ro.prompt_ids, ro.response.to(dev), ro.mask.to(dev),
                        ro.group.to(dev), ro.texts)

    for name, dev, sampler in (("first", "cpu", record), ("second", other, replay)):
        monkeypatch.setattr(opd_mod, "sample_rollouts", sampler)
        cfg = _cfg(tmp_path / name, loss=loss, steps=1, save_every=0, fused_linear=fused)
        tr = _trainer(prepared, task, cfg, evaluate=False)
        tr.student.to(dev)  # the optimizer holds the same Parameter objects, moved in place
        for t in tr.teachers.values():
            t.to(dev)
        hist = tr.train(resume=False)
        out[name] = (hist[-1]["loss"], [p.detach().cpu() for p in tr.student.parameters()])
    return out["first"], out["second"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not __import__("pyopd").cuda_available(),
                    reason="no CUDA device / CUDA build")
@pytest.mark.parametrize("fused", ["on", "off"])
@pytest.mark.parametrize("loss", ["opd", "fire", "rkl", "fire-rkl"])
def test_one_step_on_cuda_equals_the_cpu_step(prepared, task, tmp_path, monkeypatch, loss, fused):
    # The whole step on the GPU (scoring, signals, loss, fused-linear or logits path,
    # optimizer): the same loss and parameters as on the CPU from the same rollouts.
    (l_cpu, p_cpu), (l_gpu, p_gpu) = _one_step_cpu_then("cuda", prepared, task, tmp_path,
                                                        monkeypatch, loss, fused)
    assert l_gpu == pytest.approx(l_cpu, rel=1e-4, abs=1e-6)
    for a, b in zip(p_gpu, p_cpu):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_replayed_rollouts_give_the_same_step(prepared, task, tmp_path, monkeypatch):
    # The harness of the CUDA test above, CPU against CPU: replaying the recorded
    # rollouts must reproduce the step exactly, or the CUDA comparison means nothing.
    (l1, p1), (l2, p2) = _one_step_cpu_then("cpu", prepared, task, tmp_path, monkeypatch, "fire", "on")
    assert l1 == l2
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
