"""pyopd.integrations.trl against TRL's own GKD loss, on tiny Llama models (CPU, no downloads)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("trl", minversion="1.16", reason="TRL >= 1.16 is not installed (pip install 'pyopd[trl]')")

with warnings.catch_warnings():
    # trl.experimental announces itself with a warning on import; pytest turns warnings into errors.
    warnings.simplefilter("ignore")
    from trl.experimental.gkd import GKDConfig, GKDTrainer

from datasets import Dataset  # noqa: E402  (a TRL dependency)

from pyopd.integrations.trl import FireOptions, PyOPDGKDTrainer, gkd_reverse_kl_loss  # noqa: E402
from pyopd.losses import fire_opd_signals  # noqa: E402
from pyopd.ops.reference import reverse_kl_ref  # noqa: E402
from pyopd.tasks.models import ModelSpec, build_model  # noqa: E402
from pyopd.tasks.tokenizer import build_tokenizer  # noqa: E402

from _helpers import assert_close  # noqa: E402

# Prompt "a+b=", completion "c<eos>": the char tokenizer gets a chat template so
# that TRL's own DataCollatorForChatML builds the batches, as for a real user.
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}="
                 "{% else %}{{ m['content'] }}<eos>{% endif %}{% endfor %}")
PAIRS = [(1, 2), (13, 4), (7, 70), (5, 5), (123, 9), (0, 0), (44, 56), (8, 801)]


@pytest.fixture(scope="module")
def tok():
    t = build_tokenizer()
    t.chat_template = CHAT_TEMPLATE
    return t


def _dataset() -> Dataset:
    return Dataset.from_list([{"messages": [{"role": "user", "content": f"{a}+{b}"},
                                            {"role": "assistant", "content": str(a + b)}]}
                              for a, b in PAIRS])


def _models(tok, dtype=torch.float32):
    student = build_model(ModelSpec(hidden_size=32, num_layers=1, num_heads=2), tok, seed=0).to(dtype)
    teacher = build_model(ModelSpec(hidden_size=48, num_layers=1, num_heads=2), tok, seed=1).to(dtype)
    return student, teacher


def _config(tmp_path, **kw) -> GKDConfig:
    base = dict(output_dir=str(tmp_path), beta=1.0, lmbda=0.0, max_new_tokens=6, per_device_train_batch_size=4,
                report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    base.update(kw)
    return GKDConfig(**base)


def _batch(tok, rows=None) -> dict:
    from trl.experimental.utils import DataCollatorForChatML

    ds = _dataset()
    collate = DataCollatorForChatML(tokenizer=tok, max_length=64)
    return collate([ds[i] for i in (rows if rows is not None else range(len(ds)))])


def _grads(model: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params, retain_graph=True))


# ---------------------------------------------------------------------------
# the loss function vs TRL's generalized_jsd_loss(beta=1)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("num_items", [None, 37])
def test_loss_and_student_grads_match_trl(tok, dtype, tol, temperature, num_items):
    student, teacher = _models(tok, dtype)
    b = _batch(tok)
    labels = b["labels"].clone()
    labels[2] = -100  # a row with no completion token at all
    s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    shifted = labels[:, 1:]
    ref = GKDTrainer.generalized_jsd_loss(s, t, labels=shifted, beta=1.0, temperature=temperature,
                                          num_items_in_batch=num_items)
    got = gkd_reverse_kl_loss(s, t, shifted, temperature=temperature, num_items_in_batch=num_items)
    assert got.loss.dtype == dtype
    assert float(ref.detach()) > 0
    assert_close(got.loss, ref, atol=tol, rtol=tol, what="loss")
    for i, (g, r) in enumerate(zip(_grads(student, got.loss), _grads(student, ref))):
        assert_close(g, r, atol=tol, rtol=tol, what=f"grad of student parameter {i}")


@pytest.mark.parametrize("case", ["identical", "large", "all_masked"])
def test_loss_on_awkward_logits_matches_trl(case):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 33, generator=g, dtype=torch.float64)
    t = torch.randn(3, 5, 33, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 33, (3, 5), generator=g)
    labels[0, :2] = -100
    if case == "identical":
        t = s.clone()
    elif case == "large":  # logits around 1e4: only the log-sum-exp shift keeps this finite
        s = s * 30 + 1e4
        t = t * 30 - 1e4
    else:
        labels[:] = -100
    s.requires_grad_(True)
    ref = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=1.0)
    (gr,) = torch.autograd.grad(ref, s)
    got = gkd_reverse_kl_loss(s, t, labels)
    (gg,) = torch.autograd.grad(got.loss, s)
    assert_close(got.loss, ref, atol=1e-9, rtol=1e-9, what="loss")
    assert_close(gg, gr, atol=1e-9, rtol=1e-9, what="grad")
    if case != "large":
        assert float(got.loss.detach()) == 0.0 if case != "identical" else abs(float(got.loss.detach())) < 1e-12


def test_fused_linear_matches_logits_with_bias():
    g = torch.Generator().manual_seed(1)
    s_head, t_head = nn.Linear(16, 40, dtype=torch.float64), nn.Linear(24, 40, dtype=torch.float64)
    h_s = torch.randn(2, 6, 16, generator=g, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(2, 6, 24, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 40, (2, 6), generator=g)
    labels[1, :3] = -100
    got = gkd_reverse_kl_loss((h_s, s_head), (h_t, t_head), labels, temperature=0.8)
    ref = GKDTrainer.generalized_jsd_loss(s_head(h_s), t_head(h_t).detach(), labels=labels, beta=1.0,
                                          temperature=0.8)
    params = [h_s, s_head.weight, s_head.bias]
    for i, (a, r) in enumerate(zip(torch.autograd.grad(got.loss, params), torch.autograd.grad(ref, params))):
        assert_close(a, r, atol=1e-10, rtol=1e-10, what=f"grad {i}")
    assert_close(got.loss, ref, atol=1e-10, rtol=1e-10, what="loss")


def test_loss_input_errors():
    s = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="labels"):
        gkd_reverse_kl_loss(s, s, torch.zeros(6, dtype=torch.long))
    with pytest.raises(TypeError, match="fire"):
        gkd_reverse_kl_loss(s, s, torch.zeros(2, 3, dtype=torch.long), fire="yes")
    with pytest.raises(TypeError, match="lm_head"):
        gkd_reverse_kl_loss((torch.randn(2, 3, 4), nn.Sequential(nn.Linear(4, 8))),
                            (torch.randn(2, 3, 4), nn.Linear(4, 8)), torch.zeros(2, 3, dtype=torch.long))


# ---------------------------------------------------------------------------
# FiRe-OPD: the filter and weights are fire_opd_signals' on the whole batch
# ---------------------------------------------------------------------------


def test_fire_matches_direct_signals(tok):
    student, teacher = _models(tok, torch.float64)
    b = _batch(tok)
    s = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    labels = b["labels"][:, 1:]
    opts = FireOptions(p=50.0, alpha=1.0, beta=0.5)
    got = gkd_reverse_kl_loss(s, t, labels, fire=opts)
    mask = labels != -100
    ref = reverse_kl_ref(s.detach(), t, torch.where(mask, labels, 0), mask=mask, compute_dtype=torch.float64)
    direct = fire_opd_signals(ref.teacher_logprob, mask, teacher_entropy=ref.teacher_entropy,
                              student_entropy=ref.student_entropy, p=50.0, alpha=1.0, beta=0.5)
    assert got.fire is not None
    assert torch.equal(got.fire.keep, direct.keep)
    assert 0 < int(direct.keep.sum()) < len(PAIRS), "p=50 must drop some rollouts and keep others"
    assert_close(got.fire.weight, direct.weight, atol=1e-9, rtol=1e-9, what="token weights")
    kept = mask & direct.keep[:, None]
    expected = (direct.weight * ref.kl)[kept].sum() / mask.sum()
    assert_close(got.loss, expected, atol=1e-10, rtol=1e-10, what="FiRe loss")
    # Dropped rollouts get no gradient at all.
    (gs,) = torch.autograd.grad(got.loss, s)
    assert float(gs[~direct.keep].abs().max()) == 0.0
    assert float(gs[direct.keep].abs().max()) > 0.0


# ---------------------------------------------------------------------------
# the trainer: compute_loss vs GKDTrainer's, errors, and TRL's own loop
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fused_linear", [False, True])
@pytest.mark.parametrize("num_items", [None, 29])
def test_compute_loss_matches_gkd_trainer(tok, tmp_path, fused_linear, num_items):
    student, teacher = _models(tok, torch.float64)
    ours = PyOPDGKDTrainer(model=student, teacher_model=teacher, args=_config(tmp_path / "a"),
                           train_dataset=_dataset(), processing_class=tok, use_fused_linear=fused_linear)
    theirs = GKDTrainer(model=student, teacher_model=teacher, args=_config(tmp_path / "b"),
                        train_dataset=_dataset(), processing_class=tok)
    b = _batch(tok)
    loss = ours.compute_loss(student, dict(b), num_items_in_batch=num_items)
    ref = theirs.compute_loss(student, dict(b), num_items_in_batch=num_items)
    assert_close(loss, ref, atol=1e-10, rtol=1e-10, what="compute_loss")
    for i, (g, r) in enumerate(zip(_grads(student, loss), _grads(student, ref))):
        assert_close(g, r, atol=1e-10, rtol=1e-10, what=f"grad of student parameter {i}")
    assert ours.pyopd_last is not None and ours.pyopd_last.fire is None


def test_trainer_rejects_bad_config(tok, tmp_path):
    student, teacher = _models(tok)
    with pytest.raises(ValueError, match=r"args\.beta=0\.5"):
        PyOPDGKDTrainer(model=student, teacher_model=teacher, args=_config(tmp_path, beta=0.5), train_dataset=_dataset(),
                        processing_class=tok)
    with pytest.raises(ValueError, match="loss_temperature"):
        PyOPDGKDTrainer(model=student, teacher_model=teacher, args=_config(tmp_path), train_dataset=_dataset(),
                        processing_class=tok, loss_temperature=0.0)
    teacher.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        PyOPDGKDTrainer(model=student, teacher_model=teacher, args=_config(tmp_path), train_dataset=_dataset(),
                        processing_class=tok, use_fused_linear=True)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["on_policy_fire", "offline_fused_linear"])
def test_train_two_steps(tok, tmp_path, mode):
    student, teacher = _models(tok)
    before_s = [p.detach().clone() for p in student.parameters()]
    before_t = [p.detach().clone() for p in teacher.parameters()]
    on_policy = mode == "on_policy_fire"
    args = _config(tmp_path, lmbda=1.0 if on_policy else 0.0, max_steps=2, logging_steps=1, learning_rate=1e-3,
                   temperature=0.9)
    trainer = PyOPDGKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=_dataset(),
                              processing_class=tok, fire=FireOptions(p=50.0) if on_policy else False,
                              use_fused_linear=not on_policy)
    generated = []
    if on_policy:
        # Count GKD's own on-policy generation calls (lmbda=1: every step).
        gen = trainer.generate_on_policy_outputs

        def counting(model, inputs, generation_config):
            out = gen(model, inputs, generation_config)
            generated.append(out[2])
            return out

        trainer.generate_on_policy_outputs = counting
    out = trainer.train()
    assert out.global_step == 2
    assert len(generated) == (2 if on_policy else 0)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert h["loss"] > 0 and h["pyopd/kl"] > 0
        if on_policy:
            assert 0 < h["pyopd/keep_ratio"] < 1
    assert any(not torch.equal(a, p) for a, p in zip(before_s, student.parameters())), "student did not move"
    assert all(torch.equal(a, p) for a, p in zip(before_t, teacher.parameters())), "teacher changed"
    if on_policy:
        # The last step's loss ran on the generated completions, not on the dataset's.
        assert trainer.pyopd_last is not None and trainer.pyopd_last.fire is not None
        assert torch.equal(trainer.pyopd_last.mask, generated[-1][:, 1:] != -100)
