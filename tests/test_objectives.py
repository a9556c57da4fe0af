"""The objective interface: registry, the worked example, temperature, divergence, Cross-SFT cache."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from pyopd.demo.fire_opd import make_prompt_source
from pyopd.objectives import MicroBatch, Objective, Scores, get_objective, objective_names
from pyopd.trainers import checkpoint as ckpt_io
from pyopd.trainers.opd import NonFiniteError, OPDConfig, OPDTrainer


def _trainer(prepared, task, out: Path, **kw):
    cfg = OPDConfig(**{**dict(loss="opd", steps=2, prompts_per_step=4, n=2, micro_batch=3, max_new_tokens=8,
                              eval_every=0, save_every=1, out_dir=str(out), lr=1e-3, seed=1), **kw})
    ref = prepared.load_student() if get_objective(cfg.loss).needs_reference else None
    return OPDTrainer(cfg, prepared.load_student(), {"mixed": prepared.load_teacher("mixed")},
                      prepared.load_tokenizer(), make_prompt_source(task, lambda e: "mixed"),
                      reference=ref, log=lambda *_: None, progress=False)


def test_every_method_of_the_issue_is_registered():
    for name in ("opd", "fire", "rkl", "fire-rkl", "exopd", "tip", "copsd"):
        assert name in objective_names()
        obj = get_objective(name)
        assert issubclass(obj, Objective) and obj.summary


def test_forward_kl_example_gradient():
    """The worked example's loss is -w log p with w = min(q / p_old, cap): its gradient w.r.t.
    log p is -w / D on valid tokens and 0 elsewhere."""
    ForwardKL = get_objective("forward-kl")
    cfg = OPDConfig(loss="forward-kl")
    b, t, v = 2, 3, 5
    logits = torch.randn(b, t, v, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, v, (b, t))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    old = torch.log_softmax(logits.detach(), -1).gather(-1, tokens[..., None])[..., 0]
    lq = old + torch.tensor([[0.5, -1.0, 9.0], [3.0, 0.0, 0.0]], dtype=torch.float64)
    mb = MicroBatch(rows=torch.arange(b), logits=logits, tokens=tokens, mask=mask, loss_mask=mask,
                    old=Scores(old, torch.zeros_like(old)), teacher=Scores(lq, torch.zeros_like(lq)),
                    reference=None, signals={}, denominator=3.0, temperature=1.0)
    loss, metrics = ForwardKL(cfg).loss(mb)
    lp = mb.logprob()
    (g,) = torch.autograd.grad(loss, lp)
    w = torch.exp(lq - old).clamp(max=10.0)
    torch.testing.assert_close(g, torch.where(mask, -w / 3.0, torch.zeros_like(w)))
    assert metrics["loss"] == pytest.approx(float(loss.detach()))


def test_forward_kl_example_trains_through_the_trainer(prepared, task, tmp_path):
    tr = _trainer(prepared, task, tmp_path, loss="forward-kl", steps=1)
    before = [p.detach().clone() for p in tr.student.parameters()]
    hist = tr.train()
    assert hist[-1]["step"] == 1 and hist[-1]["loss"] == hist[-1]["loss"]
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.student.parameters()))


@pytest.mark.parametrize("loss", ["opd", "copsd"])
def test_one_temperature_for_sampling_scoring_and_loss(prepared, task, tmp_path, loss):
    """At T = 0.7 the old log-probs are the sampling policy's, at T: with one optimizer step per
    rollout batch the PPO ratio is then exactly 1 (ppo_kl 0). Before, the loss used T = 1."""
    tr = _trainer(prepared, task, tmp_path, loss=loss, temperature=0.7, steps=1, save_every=0)
    batch = tr.prompts(0, 4, random.Random(0))
    sc = tr.rollout_and_score(batch)
    ro, scored = sc["rollouts"], sc["batch"]
    from pyopd.trainers.rollout import layout, response_logits

    with torch.no_grad():
        inputs = layout(ro.prompt_ids, ro.response, ro.mask, tr.tok.pad_token_id)
        logits = response_logits(tr.student, inputs, ro.response.shape[1]).double()
        want = torch.log_softmax(logits / 0.7, -1).gather(-1, ro.response[..., None])[..., 0]
    torch.testing.assert_close(scored.old.logprob.double()[ro.mask], want[ro.mask], atol=1e-5, rtol=1e-5)
    m = tr.train_step(batch)
    assert abs(m["ppo_kl"]) < 1e-6 and m["pg_clipfrac"] == 0.0


def test_nonfinite_loss_stops_before_the_step_and_keeps_the_checkpoint(prepared, task, tmp_path, monkeypatch):
    tr = _trainer(prepared, task, tmp_path, steps=1)
    tr.train()
    good = ckpt_io.latest_checkpoint(tmp_path)
    assert good is not None and good.name == "checkpoint-1"
    tr2 = _trainer(prepared, task, tmp_path, steps=3)
    real_loss = tr2.objective.loss

    def nan_loss(mb):
        loss, m = real_loss(mb)
        return loss * float("nan"), m

    monkeypatch.setattr(tr2.objective, "loss", nan_loss)
    with pytest.raises(NonFiniteError, match="loss is nan.*checkpoint-1"):
        tr2.train(resume=True)
    assert ckpt_io.latest_checkpoint(tmp_path) == good
    assert all(torch.isfinite(p).all() for p in tr2.student.parameters())


def test_nonfinite_gradient_norm_stops_the_run(prepared, task, tmp_path, monkeypatch):
    tr = _trainer(prepared, task, tmp_path, steps=1, save_every=0)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: torch.tensor(float("inf")))
    before = [p.detach().clone() for p in tr.student.parameters()]
    with pytest.raises(NonFiniteError, match="gradient norm is inf"):
        tr.train()
    assert all(torch.equal(a, b) for a, b in zip(before, tr.student.parameters()))


def test_cross_sft_teacher_is_keyed_by_its_recipe_and_written_atomically(prepared, tmp_path):
    from pyopd.trainers.copsd import cross_sft_teacher

    tok = prepared.load_tokenizer()
    prompts = [("benign", "Q:1+2=?\nA:"), ("unsafe", "Q:steal car\nA:")]
    frontier = {"Q:steal car\nA:": "#no"}
    logs: list[str] = []
    (tmp_path / ".teacher-cross-sft-0123.tmp-dead").mkdir()  # left by a killed run

    def build(template):
        return cross_sft_teacher(prepared.load_student, tok, prompts, lambda qs: ["#3"] * len(qs), frontier,
                                 template, out=tmp_path, epochs=1, seed=0, log=logs.append)

    build("C:be kind\n{user_query}")
    dirs = sorted(tmp_path.glob("teacher-cross-sft-*"))
    assert len(dirs) == 1 and (dirs[0] / "recipe.json").is_file()
    assert not list(tmp_path.glob(".teacher-cross-sft-*"))
    build("C:be kind\n{user_query}")
    assert "reusing" in logs[-1]
    build("C:another rule\n{user_query}")  # another constitution: another teacher
    assert len(sorted(tmp_path.glob("teacher-cross-sft-*"))) == 2


@pytest.mark.parametrize("loss", ["fire", "copsd", "opd"])
def test_released_preset_through_the_objectives_equals_the_presets_module(loss):
    """The trainer's micro-batch path with preset='released' gives the released code's
    mini-batch loss (pyopd.presets.released), gradient included."""
    from pyopd.objectives import ScoredBatch, Signals, make_objective, micro_partition, slice_rows
    from pyopd.presets import released as R

    g = torch.Generator().manual_seed(7)
    B, T, V = 10, 6, 11
    cfg = OPDConfig(loss=loss, preset="released", micro_batch=3, mini_batches=1, percentile=30.0,
                    dual_clip=3.0 if loss == "copsd" else None)
    logits = torch.randn(B, T, V, dtype=torch.float64, generator=g)
    tokens = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([6, 3, 0, 5, 1, 6, 2, 4, 6, 3])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old_lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    rand = lambda: torch.rand(B, T, dtype=torch.float64, generator=g)  # noqa: E731
    teacher = Scores(old_lp + rand() - 0.5, rand() * 2)
    scored = ScoredBatch(tokens=tokens, mask=mask, group=torch.arange(B) // 2,
                         old=Scores(old_lp, rand() * 2), teacher=teacher,
                         teacher_index=torch.zeros(B, dtype=torch.long), num_teachers=1,
                         reference=Scores(old_lp + 0.1 * rand(), rand()))
    obj = make_objective(cfg)
    sig: Signals = obj.signals(scored)
    leaf = logits.clone().requires_grad_(True)
    total = 0.0
    for micros in micro_partition(B, cfg):
        for rows, den in zip(micros, obj.denominators(sig, micros)):
            mb = MicroBatch(rows=rows, logits=leaf[rows], tokens=tokens[rows], mask=mask[rows],
                            loss_mask=sig.loss_mask[rows], old=slice_rows(scored.old, rows),
                            teacher=slice_rows(scored.teacher, rows),
                            reference=slice_rows(scored.reference, rows),
                            signals={k: v[rows] for k, v in sig.rows.items()}, denominator=den, temperature=1.0)
            total = total + obj.loss(mb)[0]
    (g_ours,) = torch.autograd.grad(total, leaf)

    leaf2 = logits.clone().requires_grad_(True)
    lp = torch.log_softmax(leaf2, -1).gather(-1, tokens[..., None])[..., 0]
    if loss == "fire":
        rs = R.fire_signals_released(teacher.logprob, mask, teacher_entropy=teacher.entropy,
                                     student_entropy=scored.old.entropy, micro_batch=3, p=30.0)
        want, _ = R.fire_opd_loss_released(lp, old_lp, teacher.logprob, mask, keep=rs.keep, weight=rs.weight,
                                           micro_batch=3)
    elif loss == "opd":
        want, _ = R.opd_loss_released(lp, old_lp, teacher.logprob, mask, micro_batch=3)
    else:
        ga = R.group_advantages_released(teacher.logprob, old_lp, mask, scored.group)
        want, _ = R.copsd_loss_released(lp, old_lp, mask, advantages=ga.advantage, micro_batch=3,
                                        ref_logprob=scored.reference.logprob)
    (g_want,) = torch.autograd.grad(want, leaf2)
    torch.testing.assert_close(total.detach(), want.detach(), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(g_ours, g_want, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("loss", ["rkl", "fire-rkl", "fire", "copsd"])
def test_fused_linear_path_equals_the_logits_path(prepared, task, tmp_path, loss):
    """By default the trainer scores and differentiates from hidden states + lm_head weight
    (no [tokens, vocab] logits); the result equals the materialised-logits path, with the
    gradient recomputed in backward ('recompute') or taken in the forward ('grad-in-forward',
    and 'on' for this float32 head)."""
    runs = {}
    for fused in ("on", "recompute", "grad-in-forward", "off"):
        tr = _trainer(prepared, task, tmp_path / f"{loss}-{fused}", loss=loss, steps=1, save_every=0,
                      fused_linear=fused, dual_clip=3.0 if loss == "copsd" else None)
        hist = tr.train()
        runs[fused] = (hist[-1], [p.detach().clone() for p in tr.student.parameters()])
    m0, p0 = runs["off"]
    for fused in ("on", "recompute", "grad-in-forward"):
        m1, p1 = runs[fused]
        assert m1["loss"] == pytest.approx(m0["loss"], rel=1e-4, abs=1e-6), fused
        for key in ("kl_mean", "weight_mean", "student_entropy_mean"):
            if key in m0:
                assert m1[key] == pytest.approx(m0[key], rel=1e-4, abs=1e-6), (fused, key)
        for a, b in zip(p1, p0):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=fused)


def test_fused_auto_threshold(prepared):
    from pyopd.trainers.rollout import FUSED_AUTO_BYTES, wants_fused

    m = prepared.load_student()
    v = m.get_output_embeddings().weight.shape[0]
    rows = FUSED_AUTO_BYTES // (4 * v * 8) + 1  # just over the threshold at r = 8
    assert wants_fused("auto", rows, 8, m) and not wants_fused("auto", 1, 8, m)
    assert wants_fused("on", 1, 1, m) and not wants_fused("off", 10**6, 10**3, m)
    assert wants_fused("recompute", 1, 1, m) and wants_fused("grad-in-forward", 1, 1, m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_fused_op_choice_for_the_rkl_objectives(dtype):
    """'auto'/'on': gradient in the forward for a float32/float64 head, recompute for 16-bit
    ones (whose float32 [V, H] running sum would outweigh the logits); the explicit modes win."""
    from pyopd.trainers.rollout import grad_in_forward

    w = torch.zeros(4, 2, dtype=dtype)
    wide = dtype in (torch.float32, torch.float64)
    assert grad_in_forward("auto", w) == wide and grad_in_forward("on", w) == wide
    assert grad_in_forward("grad-in-forward", w) and not grad_in_forward("recompute", w)
    assert not grad_in_forward("off", w)


def test_linear_head_probe(prepared):
    from pyopd.trainers.rollout import layout, linear_head

    tok = prepared.load_tokenizer()
    ids = tok(["Q:1+2=?\nA:"])["input_ids"]
    resp = torch.tensor([[5, 6, 7]])
    inputs = layout(ids, resp, torch.ones_like(resp, dtype=torch.bool), tok.pad_token_id)
    plain = prepared.load_student()
    assert linear_head(plain, inputs) is not None
    scaled = prepared.load_student()  # a head that is not the plain linear map of the hidden state
    inner = scaled.lm_head
    scaled.lm_head = torch.nn.Sequential(inner, torch.nn.Tanh())
    said = []
    assert linear_head(scaled, inputs, said.append) is None
    assert len(said) == 1 and "materialised logits" in said[0]
    assert linear_head(scaled, inputs, said.append) is None and len(said) == 1  # said once
