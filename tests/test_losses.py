"""The OPD-family losses against hand-written per-token references, values and gradients."""
from __future__ import annotations

import math

import pytest
import torch

import pyopd.losses.reverse_kl as rkl_module
from pyopd.losses import (
    aggregate_loss,
    copsd_loss,
    exopd_loss,
    fire_opd_loss,
    fire_opd_signals,
    opd_loss,
    ppo_policy_loss,
    reverse_kl_loss,
    reverse_kl_loss_from_logits,
    tip_loss,
    tip_token_mask,
)
from pyopd.ops.reference import reverse_kl_ref
from pyopd.ops.signals_reference import fire_token_weights_ref, trajectory_scores_ref

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
F64 = torch.float64


def batch(B=5, T=6, seed=0):
    """Small float64 batch; ratios far enough from 1 to hit both clips and the dual clip."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3
    shift = torch.randn(B, T, generator=g, dtype=F64) * 0.6
    shift[0, :3] = torch.tensor([1.5, -1.5, 0.1], dtype=F64)  # ratio e^1.5 > 3 triggers the dual clip
    logprob = (old + shift).requires_grad_()
    lq = -torch.rand(B, T, generator=g, dtype=F64) * 3
    lq[0, :2] = old[0, :2] - 2.0  # negative advantages on the exploded ratios
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, :3] = True
    mask[B - 1] = False  # an empty row
    ht = torch.rand(B, T, generator=g, dtype=F64) * 2
    hs = torch.rand(B, T, generator=g, dtype=F64) * 2
    return dict(logprob=logprob, old=old, lq=lq, mask=mask, ht=ht, hs=hs)


# ---- hand-written references (Python loops over tokens) ------------------------------


def ref_token_loss(lp, old, a, lo=0.2, hi=0.2, dual=None):
    ratio = torch.exp(torch.clamp(lp - old, -20.0, 20.0))
    loss = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - lo, 1 + hi))
    if dual is not None and a < 0:
        loss = torch.minimum(loss, -a * dual)
    return loss


def ref_aggregate(per_row, agg, denominator=None):
    """per_row: list (rows) of lists (valid tokens) of 0-d tensors."""
    rows = [r for r in per_row if r]
    if not rows:
        return torch.zeros((), dtype=F64)
    if agg == "token-mean":
        num, den = sum(sum(r) for r in rows), sum(len(r) for r in rows)
    elif agg == "seq-mean-token-mean":
        num, den = sum(sum(r) / len(r) for r in rows), len(rows)
    else:
        num, den = sum(sum(r) for r in rows), len(rows)
    return num / (den if denominator is None else denominator)


def ref_loss(d, adv_fn, agg, mask=None, dual=None, lo=0.2, hi=0.2):
    mask = d["mask"] if mask is None else mask
    lp = d["logprob"]
    B, T = lp.shape
    per_row = [
        [ref_token_loss(lp[b, t], d["old"][b, t], adv_fn(b, t), lo, hi, dual) for t in range(T) if mask[b, t]]
        for b in range(B)
    ]
    return ref_aggregate(per_row, agg)


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


def assert_same(loss, ref, x):
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_of(loss, x), grad_of(ref, x), rtol=1e-12, atol=1e-12)


# ---- OPD and the PPO surrogate ------------------------------------------------------


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dual", [None, 3.0])
def test_opd_loss_matches_hand_reference(agg, dual):
    d = batch()
    loss, metrics = opd_loss(d["logprob"], d["old"], d["lq"], d["mask"], agg=agg, dual_clip=dual)
    ref = ref_loss(d, lambda b, t: d["lq"][b, t] - d["old"][b, t], agg, dual=dual)
    assert_same(loss, ref, d["logprob"])
    assert all(isinstance(v, float) for v in metrics.values())
    assert 0 < metrics["pg_clipfrac"] < 1
    if dual is not None:
        assert metrics["pg_clipfrac_lower"] > 0  # the dual clip did fire
    n = int(d["mask"].sum())
    assert metrics["num_tokens"] == n
    r = (d["lq"] - d["old"])[d["mask"]]
    assert metrics["reward_mean"] == pytest.approx(r.mean().item(), rel=1e-12)


def test_ppo_policy_loss_asymmetric_clip_and_on_policy():
    d = batch(seed=1)
    adv = torch.randn(5, 6, dtype=F64, generator=torch.Generator().manual_seed(3))
    loss, _ = ppo_policy_loss(d["logprob"], d["old"], adv, d["mask"], clip_ratio_low=0.1, clip_ratio_high=0.28)
    ref = ref_loss(d, lambda b, t: adv[b, t], "token-mean", lo=0.1, hi=0.28)
    assert_same(loss, ref, d["logprob"])
    # old_logprob=None: ratio 1, the loss is -mean(A) and its gradient -A / N
    lp = d["logprob"]
    loss, m = ppo_policy_loss(lp, None, adv, d["mask"])
    n = d["mask"].sum()
    torch.testing.assert_close(loss, -(adv * d["mask"]).sum() / n)
    torch.testing.assert_close(grad_of(loss, lp), -adv * d["mask"] / n)
    assert m["pg_clipfrac"] == 0.0 and m["ppo_kl"] == 0.0


def test_aggregate_loss_denominator_splits_exactly():
    d = batch(B=8, T=7, seed=2)
    x = d["logprob"] * 1.0
    for agg in AGGS:
        whole = aggregate_loss(x, d["mask"], agg)
        n = d["mask"].sum(-1)
        D = float(n.sum()) if agg == "token-mean" else float((n > 0).sum())
        parts = sum(aggregate_loss(x[i : i + 2], d["mask"][i : i + 2], agg, denominator=D) for i in range(0, 8, 2))
        torch.testing.assert_close(parts, whole, rtol=1e-13, atol=1e-13)
    # all masked: 0, no NaN, zero gradient
    z = aggregate_loss(x, torch.zeros_like(d["mask"]), "seq-mean-token-mean")
    assert z.item() == 0 and torch.equal(grad_of(z, d["logprob"]), torch.zeros(8, 7, dtype=F64))


def test_masked_positions_cannot_poison_the_loss():
    d = batch(seed=3)
    lp = d["logprob"].detach().clone()
    lp[~d["mask"]] = math.nan
    lq = d["lq"].clone()
    lq[~d["mask"]] = -math.inf
    lp.requires_grad_()
    loss, m = opd_loss(lp, d["old"], lq, d["mask"], dual_clip=3.0)
    assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in m.values())
    assert not grad_of(loss, lp).isnan().any()


# ---- FiRe-OPD ------------------------------------------------------------------------


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("normalize", ["trajectory", "batch"])
def test_fire_opd_loss_matches_hand_reference(agg, normalize):
    d = batch(B=10, T=6, seed=4)
    loss, metrics = fire_opd_loss(
        d["logprob"], d["old"], d["lq"], d["mask"], teacher_entropy=d["ht"], student_entropy=d["hs"],
        p=30, alpha=1.0, beta=0.5, normalize=normalize, agg=agg,
    )
    ts = trajectory_scores_ref(d["lq"], d["mask"], p=30)
    w = fire_token_weights_ref(d["ht"], d["hs"], d["mask"], keep=ts.keep, alpha=1.0, beta=0.5, normalize=normalize).weight
    keep_mask = d["mask"] & ts.keep.unsqueeze(1)
    assert int((~ts.keep[:9]).sum()) == 2  # 9 non-empty rollouts, floor(2.7) dropped
    ref = ref_loss(d, lambda b, t: w[b, t] * (d["lq"][b, t] - d["old"][b, t]), agg, mask=keep_mask)
    assert_same(loss, ref, d["logprob"])
    assert metrics["keep_ratio"] == pytest.approx(7 / 9)
    assert metrics["num_tokens"] == int(keep_mask.sum())
    if normalize == "batch":
        assert metrics["weight_mean"] == pytest.approx(1.0, rel=1e-12)
    assert metrics["filter_threshold"] == pytest.approx(ts.threshold.item(), rel=1e-12)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("dual", [None, 3.0])
def test_fire_opd_p0_unit_weights_is_exactly_opd(agg, dual):
    d = batch(seed=5)
    kw = dict(agg=agg, dual_clip=dual)
    a, _ = opd_loss(d["logprob"], d["old"], d["lq"], d["mask"], **kw)
    b, _ = fire_opd_loss(d["logprob"], d["old"], d["lq"], d["mask"], teacher_entropy=d["ht"], student_entropy=d["hs"],
                         p=0, alpha=0, beta=0, **kw)
    assert torch.equal(a, b)
    assert torch.equal(grad_of(a, d["logprob"]), grad_of(b, d["logprob"]))


def test_fire_opd_micro_batches_with_whole_batch_signals_equal_whole_batch():
    d = batch(B=16, T=9, seed=6)
    sig = fire_opd_signals(d["lq"], d["mask"], teacher_entropy=d["ht"], student_entropy=d["hs"], p=25)
    whole, _ = fire_opd_loss(d["logprob"], d["old"], d["lq"], d["mask"], keep=sig.keep, weight=sig.weight)
    also, _ = fire_opd_loss(d["logprob"], d["old"], d["lq"], d["mask"], teacher_entropy=d["ht"], student_entropy=d["hs"], p=25)
    assert torch.equal(whole, also)
    D = float((d["mask"] & sig.keep.unsqueeze(1)).sum())
    parts = []
    for idx in torch.arange(16).chunk(4):
        loss, _ = fire_opd_loss(d["logprob"][idx], d["old"][idx], d["lq"][idx], d["mask"][idx],
                                keep=sig.keep[idx], weight=sig.weight[idx], denominator=D)
        parts.append(loss)
    total = sum(parts)
    torch.testing.assert_close(total, whole, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(grad_of(total, d["logprob"]), grad_of(whole, d["logprob"]), rtol=1e-13, atol=1e-13)
    assert sig.metrics["keep_ratio"] < 1 and sig.metrics["num_kept"] == 12.0  # 15 non-empty, floor(3.75) dropped


def test_fire_opd_multi_teacher_uses_each_samples_teacher():
    d = batch(B=8, T=6, seed=7)
    g = torch.Generator().manual_seed(8)
    lq_all = -torch.rand(3, 8, 6, generator=g, dtype=F64) * 3
    ht_all = torch.rand(3, 8, 6, generator=g, dtype=F64) * 2
    teacher = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    loss, m = fire_opd_loss(d["logprob"], d["old"], lq_all, d["mask"], teacher_entropy=ht_all, student_entropy=d["hs"],
                            teacher_index=teacher, p=20)
    rows = torch.arange(8)
    lq, ht = lq_all[teacher, rows], ht_all[teacher, rows]
    ts = trajectory_scores_ref(lq, d["mask"], p=20, teacher_index=teacher, num_teachers=3)
    w = fire_token_weights_ref(ht, d["hs"], d["mask"], keep=ts.keep, teacher_index=teacher, num_teachers=3).weight
    ref = ref_loss(d, lambda b, t: w[b, t] * (lq[b, t] - d["old"][b, t]), "token-mean", mask=d["mask"] & ts.keep.unsqueeze(1))
    assert_same(loss, ref, d["logprob"])
    assert {"filter_threshold_0", "filter_threshold_1", "filter_threshold_2"} <= m.keys()


def test_fire_opd_bad_arguments():
    d = batch()
    args = (d["logprob"], d["old"], d["lq"], d["mask"])
    with pytest.raises(ValueError, match="p must be a percentage in \\[0, 100\\]"):
        fire_opd_loss(*args, teacher_entropy=d["ht"], student_entropy=d["hs"], p=120)
    with pytest.raises(ValueError, match="needs keep and weight"):
        fire_opd_loss(*args)
    with pytest.raises(ValueError, match="pass keep and weight together"):
        fire_opd_loss(*args, keep=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep must have shape \\(5,\\)"):
        fire_opd_loss(*args, keep=torch.ones(4, dtype=torch.bool), weight=torch.ones(5, 6, dtype=F64))
    with pytest.raises(ValueError, match="teacher_logprob must have the shape of logprob"):
        fire_opd_loss(d["logprob"], d["old"], d["lq"][:, :4], d["mask"], teacher_entropy=d["ht"], student_entropy=d["hs"])
    with pytest.raises(ValueError, match="pass teacher_index"):
        fire_opd_loss(d["logprob"], d["old"], d["lq"].expand(2, 5, 6), d["mask"], teacher_entropy=d["ht"], student_entropy=d["hs"])
    with pytest.raises(ValueError, match="agg must be one of"):
        fire_opd_loss(*args, teacher_entropy=d["ht"], student_entropy=d["hs"], agg="sum")
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        opd_loss(*args, dual_clip=1.0)
    with pytest.raises(ValueError, match="denominator must be > 0"):
        opd_loss(*args, denominator=0)
    with pytest.raises(ValueError, match="old_logprob must have the shape of logprob"):
        opd_loss(d["logprob"], d["old"][:3], d["lq"], d["mask"])
    with pytest.raises(ValueError, match="mask must have the shape of logprob"):
        opd_loss(d["logprob"], d["old"], d["lq"], d["mask"][:, :2])


# ---- COPSD ---------------------------------------------------------------------------


def ref_group_adv(d, ids, lo=-3.0, hi=5.0, bonus=0.02, eps=1e-6):
    B, T = d["lq"].shape
    r = {(b, t): min(max(float(d["lq"][b, t] - d["old"][b, t]), lo), hi) + bonus
         for b in range(B) for t in range(T) if d["mask"][b, t]}
    adv = torch.zeros(B, T, dtype=F64)
    for g in set(ids.tolist()):
        keys = [k for k in r if ids[k[0]] == g]
        if not keys:
            continue
        mean = sum(r[k] for k in keys) / len(keys)
        std = math.sqrt(sum((r[k] - mean) ** 2 for k in keys) / len(keys))
        for k in keys:
            adv[k] = (r[k] - mean) / (std + eps)
    return adv


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("with_ref", [False, True])
def test_copsd_loss_matches_hand_reference(agg, with_ref):
    d = batch(B=6, T=7, seed=9)
    d["lq"][1, :3] = d["old"][1, :3] + 8.0  # rewards above the clip
    ids = torch.tensor([3, 3, 3, 11, 11, 11])
    ref_lp = d["old"] + 0.3 * torch.randn(6, 7, dtype=F64, generator=torch.Generator().manual_seed(1))
    loss, metrics = copsd_loss(d["logprob"], d["old"], d["lq"], d["mask"], ids,
                               ref_logprob=ref_lp if with_ref else None, agg=agg)
    adv = ref_group_adv(d, ids)
    lp = d["logprob"]
    ref = ref_loss(d, lambda b, t: adv[b, t], agg, dual=3.0)
    if with_ref:
        k3 = [[torch.exp(ref_lp[b, t] - lp[b, t]) - (ref_lp[b, t] - lp[b, t]) - 1 for t in range(7) if d["mask"][b, t]]
              for b in range(6)]
        ref = ref + 0.005 * ref_aggregate(k3, agg)
        assert metrics["kl_ref"] > 0
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_of(loss, lp), grad_of(ref, lp), rtol=1e-10, atol=1e-12)
    assert metrics["advantage_mean"] == pytest.approx(0.0, abs=1e-9)
    assert all(isinstance(v, float) for v in metrics.values())


def test_copsd_precomputed_advantages_micro_batches():
    from pyopd.ops.signals import group_advantages

    d = batch(B=8, T=5, seed=10)
    ids = torch.arange(8) // 4
    whole, _ = copsd_loss(d["logprob"], d["old"], d["lq"], d["mask"], ids, ref_logprob=d["old"])
    adv = group_advantages(d["lq"], d["old"], d["mask"], ids).advantage
    D = float(d["mask"].sum())
    total = sum(
        copsd_loss(d["logprob"][i], d["old"][i], None, d["mask"][i], advantages=adv[i], ref_logprob=d["old"][i], denominator=D)[0]
        for i in torch.arange(8).chunk(4)
    )
    torch.testing.assert_close(total, whole, rtol=1e-13, atol=1e-13)


def test_copsd_bad_arguments():
    d = batch()
    with pytest.raises(ValueError, match="group_index must have shape \\(5,\\)"):
        copsd_loss(d["logprob"], d["old"], d["lq"], d["mask"], torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="needs teacher_logprob and group_index"):
        copsd_loss(d["logprob"], d["old"], d["lq"], d["mask"])
    with pytest.raises(ValueError, match="either advantages or group_index"):
        copsd_loss(d["logprob"], d["old"], d["lq"], d["mask"], torch.zeros(5, dtype=torch.long), advantages=d["lq"])
    with pytest.raises(ValueError, match="clip_low must be < clip_high"):
        copsd_loss(d["logprob"], d["old"], d["lq"], d["mask"], torch.zeros(5, dtype=torch.long), reward_clip=(5, -3))


# ---- analytic reverse KL -----------------------------------------------------------


def logits(seed=11, B=4, T=5, V=13, Vt=16):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, T, V, generator=g, dtype=F64) * 2).requires_grad_()
    t = torch.randn(B, T, Vt, generator=g, dtype=F64) * 2
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    return s, t, mask


@pytest.mark.parametrize("agg", AGGS)
def test_reverse_kl_loss_matches_hand_reference(agg):
    s, t, mask = logits()
    w = torch.rand(4, 5, dtype=F64, generator=torch.Generator().manual_seed(2)) + 0.5
    keep = torch.tensor([True, True, False, True])
    kl = reverse_kl_ref(s, t, mask=mask, compute_dtype=F64).kl
    loss, metrics = reverse_kl_loss(kl, mask, weight=w, keep=keep, agg=agg)
    V = s.shape[-1]
    per_row = []
    for b in range(4):
        row = []
        for i in range(5):
            if mask[b, i] and keep[b]:
                logp = torch.log_softmax(s[b, i], -1)
                logq = torch.log_softmax(t[b, i], -1)[:V]
                row.append(w[b, i] * (logp.exp() * (logp - logq)).sum())
        per_row.append(row)
    ref = ref_aggregate(per_row, agg)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_of(loss, s), grad_of(ref, s), rtol=1e-10, atol=1e-12)
    assert metrics["kl_mean"] > 0 and metrics["weight_min"] >= 0.5


def test_reverse_kl_loss_from_logits_goes_through_the_fused_op(monkeypatch):
    s, t, mask = logits(seed=12)
    calls = []

    def fake_op(student, teacher, tokens=None, *, mask=None, temperature=1.0):
        calls.append(mask)
        return reverse_kl_ref(student, teacher, tokens, mask=mask, temperature=temperature, compute_dtype=F64)

    monkeypatch.setattr(rkl_module, "_fused_reverse_kl", lambda: fake_op)
    keep = torch.tensor([True, False, True, True])
    loss, m = reverse_kl_loss_from_logits(s, t, mask, temperature=0.7, keep=keep)
    kl = reverse_kl_ref(s, t, mask=mask, temperature=0.7, compute_dtype=F64).kl
    ref, _ = reverse_kl_loss(kl, mask, keep=keep)
    assert_same(loss, ref, s)
    assert torch.equal(calls[0], mask & keep.unsqueeze(1))  # dropped rows skip the vocabulary pass
    assert {"student_entropy_mean", "teacher_entropy_mean", "kl_mean"} <= m.keys()


def test_reverse_kl_loss_from_logits_real_kernel():
    import pyopd.ops as ops

    if not hasattr(ops, "reverse_kl"):
        pytest.skip("pyopd.ops.reverse_kl (the fused kernel) has not landed in this checkout")
    s, t, mask = logits(seed=13)
    loss, _ = reverse_kl_loss_from_logits(s.float().detach().requires_grad_(), t.float(), mask)
    ref, _ = reverse_kl_loss(reverse_kl_ref(s, t, mask=mask, compute_dtype=F64).kl, mask)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)


# ---- baselines -----------------------------------------------------------------------


def test_exopd_loss_matches_hand_reference_and_lam1_is_opd():
    d = batch(seed=14)
    ref_lp = d["old"] - 0.4
    loss, m = exopd_loss(d["logprob"], d["old"], d["lq"], ref_lp, d["mask"], lam=1.5, dual_clip=3.0)
    ref = ref_loss(d, lambda b, t: -((d["old"][b, t] - ref_lp[b, t]) - 1.5 * (d["lq"][b, t] - ref_lp[b, t])),
                   "token-mean", dual=3.0)
    assert_same(loss, ref, d["logprob"])
    assert m["lam"] == 1.5
    one, _ = exopd_loss(d["logprob"], d["old"], d["lq"], ref_lp, d["mask"], lam=1.0)
    opd, _ = opd_loss(d["logprob"], d["old"], d["lq"], d["mask"])
    torch.testing.assert_close(one, opd, rtol=1e-14, atol=1e-14)


def test_tip_token_mask_top_rho_of_soft_or():
    hs = torch.tensor([[0.0, 1.0, 2.0, 4.0], [4.0, 0.0, 0.0, 1.0]], dtype=F64)
    div = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 2.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 1]], dtype=torch.bool)
    # a = hs / 4, b = div / 2, u = a + b - ab
    u = [[1.0, 0.25, 0.5, 1.0], [1.0, 0.5, None, 0.25 + 1 - 0.25]]
    sel = tip_token_mask(hs, div, mask, rho=0.4)  # 7 valid tokens -> ceil(2.8) = 3, ties at 1.0 -> 4
    assert u[1][3] == 1.0
    assert sel.tolist() == [[True, False, False, True], [True, False, False, True]]
    sel = tip_token_mask(hs, div, mask, rho=0.7)  # ceil(4.9) = 5: threshold 0.5, ties -> 6
    assert int(sel.sum()) == 6 and not sel[1, 2]
    assert torch.equal(tip_token_mask(hs, div, mask, rho=1.0), mask)
    z = torch.zeros(2, 4, dtype=F64)
    assert torch.equal(tip_token_mask(z, z, mask, rho=0.5), mask)  # all tied at 0: all selected, no NaN


def test_tip_loss_rho1_is_opd_and_selection_matches():
    d = batch(seed=15)
    full, _ = tip_loss(d["logprob"], d["old"], d["lq"], d["mask"], student_entropy=d["hs"], rho=1.0)
    opd, _ = opd_loss(d["logprob"], d["old"], d["lq"], d["mask"])
    assert torch.equal(full, opd)
    kl = torch.rand(5, 6, dtype=F64, generator=torch.Generator().manual_seed(4))
    loss, m = tip_loss(d["logprob"], d["old"], d["lq"], d["mask"], student_entropy=d["hs"], divergence=kl, rho=0.5)
    sel = tip_token_mask(d["hs"], kl, d["mask"], rho=0.5)
    ref = ref_loss(d, lambda b, t: d["lq"][b, t] - d["old"][b, t], "token-mean", mask=sel)
    assert_same(loss, ref, d["logprob"])
    assert m["selected_ratio"] == pytest.approx(float(sel.sum()) / float(d["mask"].sum()))
    again, _ = tip_loss(d["logprob"], d["old"], d["lq"], d["mask"], selection=sel)
    assert torch.equal(again, loss)
    with pytest.raises(ValueError, match="rho must be > 0"):
        tip_token_mask(d["hs"], kl, d["mask"], rho=0)
    with pytest.raises(ValueError, match="needs selection or student_entropy"):
        tip_loss(d["logprob"], d["old"], d["lq"], d["mask"])


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("extras", ["plain", "weight", "keep", "denominator", "empty"])
def test_kl_coefficients_reproduce_the_loss(agg, extras):
    from pyopd.losses import kl_coefficients, reverse_kl_loss

    g = torch.Generator().manual_seed(7)
    B, T = 5, 9
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[2] = False  # a row with no valid token
    if extras == "empty":
        mask[:] = False
    kw = {}
    if extras == "weight":
        kw["weight"] = torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    if extras == "keep":
        kw["keep"] = torch.tensor([True, False, True, True, False])
    if extras == "denominator":
        kw["denominator"] = 17.5
    coef = kl_coefficients(mask, agg=agg, **kw)
    assert coef.shape == (B, T) and not coef.requires_grad
    assert bool((coef[~mask] == 0).all())
    for seed in range(3):  # any KL: the loss is linear in it
        kl = torch.rand(B, T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 5
        loss, _ = reverse_kl_loss(kl, mask, agg=agg, **kw)
        torch.testing.assert_close((coef * kl).sum(), loss.to(torch.float64), rtol=1e-12, atol=1e-12)
