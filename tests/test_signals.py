"""trajectory_scores, fire_token_weights and group_advantages against their references."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from _helpers import DEVICES, assert_close
from pyopd import _C
from pyopd.ops.signals import fire_token_weights, group_advantages, trajectory_filter, trajectory_scores
from pyopd.ops.signals_reference import (
    fire_token_weights_ref,
    group_advantages_ref,
    trajectory_scores_ref,
)

DTYPES = [torch.float32, torch.float64]
SHAPES = [(1, 1), (3, 7), (16, 129), (5, 1000)]


def tols(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)


def close(actual, expected, dtype, name):
    assert_close(actual, expected, **tols(dtype), what=name)


def make_batch(B, T, *, dtype=torch.float64, device="cpu", seed=0, empty_rows=(), noncontig=False):
    """Random per-token signals with prefix response masks and NaN in the padding.

    With `noncontig`, every float tensor is a column slice of a wider buffer
    (row stride > T), which the kernels must read without a copy.
    """
    g = torch.Generator().manual_seed(seed)
    pad = 3 if noncontig else 0
    length = torch.randint(1, T + 1, (B,), generator=g)
    for r in empty_rows:
        length[r] = 0
    mask = torch.arange(T).unsqueeze(0) < length.unsqueeze(1)
    wide_mask = torch.zeros(B, T + 2 * pad, dtype=torch.bool)
    wide_mask[:, pad : pad + T] = mask
    out = {}
    for name, scale in (("teacher_logprob", -5.0), ("student_logprob", -5.0), ("kl", 2.0),
                        ("teacher_entropy", 3.0), ("student_entropy", 3.0)):
        x = torch.rand(B, T + 2 * pad, generator=g, dtype=torch.float64) * scale
        x = x.masked_fill(~wide_mask, math.nan)  # padding garbage must never leak into a result
        out[name] = x.to(dtype).to(device)[:, pad : pad + T]
    if noncontig and B > 1:
        assert not out["kl"].is_contiguous()
    out["mask"] = mask.to(device)
    return out


def ref_inputs(b):
    """The reference runs in float64 on the very values the kernel saw."""
    return {k: (v.double() if v.is_floating_point() else v) for k, v in b.items()}


# ---- trajectory_scores --------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.0, 20.0, 37.5, 100.0])
def test_trajectory_scores_matches_reference(device, dtype, shape, p):
    B, T = shape
    b = make_batch(B, T, dtype=dtype, device=device, empty_rows=(1,) if B > 2 else (), noncontig=T > 5)
    args = {k: b[k] for k in ("kl", "teacher_entropy", "student_entropy")}
    got = trajectory_scores(b["teacher_logprob"], b["mask"], p=p, **args)
    r = ref_inputs(b)
    exp = trajectory_scores_ref(r["teacher_logprob"], r["mask"], p=p, **{k: r[k] for k in args})
    assert got.score.dtype == dtype and got.length.dtype == torch.int64
    for name in ("score", "mean_kl", "mean_teacher_entropy", "mean_student_entropy", "threshold"):
        close(getattr(got, name), getattr(exp, name), dtype, name)
        assert not getattr(got, name).isnan().any(), name
    for name in ("keep", "length", "num_scored", "num_dropped"):
        assert torch.equal(getattr(got, name).cpu(), getattr(exp, name).cpu()), name


def dropped(scores, p, lengths=None):
    s = torch.tensor(scores, dtype=torch.float64)
    m = torch.ones(len(scores), 3, dtype=torch.bool)
    if lengths is not None:
        m = torch.arange(3).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    out = trajectory_scores(s.unsqueeze(1).expand(-1, 3), m, p=p)
    return out


@pytest.mark.parametrize("p", [0, 0.5, 7, 10, 12.5, 20, 25, 33.3, 50, 66.7, 99.9, 100])
def test_filter_drops_exactly_floor_and_keeps_ceil(p):
    g = torch.Generator().manual_seed(1)
    for n in range(1, 41):
        scores = torch.randperm(1000, generator=g)[:n].double() / 7.0  # distinct
        out = dropped(scores.tolist(), p)
        k = math.floor(Fraction(str(p)) * n / 100)
        keep_n = math.ceil(Fraction(100 - Fraction(str(p))) * n / 100)
        assert int((~out.keep).sum()) == k == int(out.num_dropped[0]), (n, p)
        assert int(out.keep.sum()) == keep_n, (n, p)
        # the dropped ones are the k lowest scores
        if 0 < k < n:
            assert scores[~out.keep].max() < scores[out.keep].min()


def test_filter_ties_at_threshold_are_all_kept_and_order_free():
    scores = [1.0, 2.0, 2.0, 2.0, 3.0]
    out = dropped(scores, 40)  # k = 2, threshold = 3rd smallest = 2.0
    assert out.threshold.item() == 2.0
    assert out.keep.tolist() == [False, True, True, True, True]  # fewer than k dropped, never order-dependent
    perm = torch.tensor([3, 0, 4, 2, 1])
    out_p = dropped([scores[i] for i in perm], 40)
    assert torch.equal(out_p.keep, out.keep[perm])


@pytest.mark.parametrize("p", [0.0, 20.0, 99.0, 100.0])
def test_filter_all_equal_scores(p):
    out = dropped([-1.5] * 8, p)
    expect_keep = p < 100
    assert out.keep.all().item() is expect_keep
    assert not out.score.isnan().any() and not out.threshold.isnan().any()


def test_empty_rollouts_are_dropped_and_not_counted():
    # rows 0 and 3 empty: n = 3 non-empty rollouts, p = 34 -> floor(1.02) = 1 dropped
    out = dropped([5.0, 1.0, 2.0, 9.0, 3.0], 34, lengths=[0, 3, 2, 0, 1])
    assert out.keep.tolist() == [False, False, True, False, True]
    assert out.score[0] == 0 and out.score[3] == 0 and out.length.tolist() == [0, 3, 2, 0, 1]
    assert int(out.num_scored[0]) == 3 and int(out.num_dropped[0]) == 1
    # every rollout empty: nothing to rank, nothing kept, no NaN
    b = make_batch(4, 6, empty_rows=range(4))
    out = trajectory_scores(b["teacher_logprob"], b["mask"], kl=b["kl"], p=20)
    assert not out.keep.any() and int(out.num_scored[0]) == 0
    assert out.threshold.item() == -math.inf
    for t in (out.score, out.mean_kl):
        assert torch.equal(t, torch.zeros_like(t))
    # empty batch and zero-length responses
    z = trajectory_scores(torch.zeros(0, 5), p=50)
    assert z.keep.shape == (0,) and z.threshold.item() == -math.inf
    z = trajectory_scores(torch.zeros(3, 0), p=50)
    assert not z.keep.any() and torch.equal(z.length, torch.zeros(3, dtype=torch.int64))


def test_filter_is_batch_level_a_micro_batch_of_one_never_filters():
    b = make_batch(20, 16, seed=3)
    whole = trajectory_scores(b["teacher_logprob"], b["mask"], p=20)
    assert int((~whole.keep).sum()) == 4
    # What the paper's released code effectively does: one sequence per call.
    per_seq = torch.cat([trajectory_scores(b["teacher_logprob"][i : i + 1], b["mask"][i : i + 1], p=20).keep for i in range(20)])
    assert per_seq.all()


def test_trajectory_filter_alone():
    b = make_batch(12, 10, seed=8, empty_rows=(4,))
    ts = trajectory_scores(b["teacher_logprob"], b["mask"], p=25)
    f = trajectory_filter(ts.score, ts.length, p=25)
    assert torch.equal(f.keep, ts.keep) and torch.equal(f.threshold, ts.threshold)
    assert int(f.num_scored[0]) == 11 and int(f.num_dropped[0]) == 2
    with pytest.raises(ValueError, match="length must have shape \\(12,\\)"):
        trajectory_filter(ts.score, ts.length[:5])
    with pytest.raises(ValueError, match="score must be a 1-D floating-point tensor"):
        trajectory_filter(ts.score.unsqueeze(0), ts.length)
    with pytest.raises(ValueError, match="p must be a percentage"):
        trajectory_filter(ts.score, ts.length, p=101)


def test_multi_teacher_filter_is_per_teacher():
    b = make_batch(24, 9, seed=4)
    teacher = torch.tensor([0, 2] * 12)  # teacher 1 has no rollout
    got = trajectory_scores(b["teacher_logprob"], b["mask"], p=25, teacher_index=teacher, num_teachers=3)
    exp = trajectory_scores_ref(b["teacher_logprob"], b["mask"], p=25, teacher_index=teacher, num_teachers=3)
    assert torch.equal(got.keep, exp.keep)
    close(got.threshold, exp.threshold, torch.float64, "threshold")
    assert got.num_scored.tolist() == [12, 0, 12] and got.num_dropped.tolist() == [3, 0, 3]
    assert got.threshold[1].item() == -math.inf
    for k in (0, 2):  # ranks each teacher's samples against each other only
        assert int((~got.keep[teacher == k]).sum()) == 3


def test_nan_at_a_valid_position_propagates_to_its_row_only():
    b = make_batch(6, 8, seed=5)
    lq = b["teacher_logprob"].clone()
    lq[2, 0] = math.nan  # position 0 is always valid
    out = trajectory_scores(lq, b["mask"], p=20)
    assert out.score[2].isnan() and not out.keep[2]
    assert not out.score[[0, 1, 3, 4, 5]].isnan().any()


def test_mask_dtypes_and_none():
    b = make_batch(5, 7, seed=6)
    ref = trajectory_scores(b["teacher_logprob"], b["mask"], p=40)
    for m in (b["mask"].to(torch.int64), b["mask"].to(torch.float32)):
        out = trajectory_scores(b["teacher_logprob"], m, p=40)
        assert torch.equal(out.score, ref.score) and torch.equal(out.keep, ref.keep)
    full = torch.nan_to_num(b["teacher_logprob"], nan=-1.0)
    a = trajectory_scores(full, None, p=40)
    c = trajectory_scores(full, torch.ones(5, 7, dtype=torch.bool), p=40)
    assert torch.equal(a.score, c.score) and torch.equal(a.keep, c.keep)


def test_bf16_inputs_are_upcast():
    b = make_batch(4, 9, seed=7)
    lq = torch.nan_to_num(b["teacher_logprob"], nan=0.0).to(torch.bfloat16)
    out = trajectory_scores(lq, b["mask"], p=0)
    exp = trajectory_scores_ref(lq.double(), b["mask"], p=0)
    assert out.score.dtype == torch.float32
    close(out.score, exp.score, torch.float32, "score")


def test_trajectory_scores_bad_arguments():
    b = make_batch(4, 5)
    lq, m = b["teacher_logprob"], b["mask"]
    with pytest.raises(ValueError, match="p must be a percentage in \\[0, 100\\]"):
        trajectory_scores(lq, m, p=100.5)
    with pytest.raises(ValueError, match="p must be"):
        trajectory_scores(lq, m, p=-1)
    with pytest.raises(ValueError, match="p must be finite"):
        trajectory_scores(lq, m, p=math.nan)
    with pytest.raises(ValueError, match="mask must have the shape of teacher_logprob"):
        trajectory_scores(lq, m[:, :3])
    with pytest.raises(ValueError, match="kl must have the shape of teacher_logprob"):
        trajectory_scores(lq, m, kl=b["kl"][:3])
    with pytest.raises(ValueError, match="teacher_logprob must have shape \\(batch, seqlen\\)"):
        trajectory_scores(lq[0], None)
    with pytest.raises(TypeError, match="teacher_logprob must be a floating-point tensor"):
        trajectory_scores(m.long(), m)
    with pytest.raises(ValueError, match="teacher_index must have shape \\(4,\\)"):
        trajectory_scores(lq, m, teacher_index=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="teacher_index must be an integer tensor"):
        trajectory_scores(lq, m, teacher_index=torch.zeros(4))
    with pytest.raises(ValueError, match="teacher_index must be < num_teachers=2"):
        trajectory_scores(lq, m, teacher_index=torch.tensor([0, 1, 2, 0]), num_teachers=2)
    with pytest.raises(ValueError, match="teacher_index must be >= 0"):
        trajectory_scores(lq, m, teacher_index=torch.tensor([0, -1, 0, 0]))
    with pytest.raises(RuntimeError, match="sync=True needs torch.distributed"):
        trajectory_scores(lq, m, sync=True)


def test_binding_checks_name_the_field():
    prm = _C.TrajectoryStatsParams()
    prm.rows, prm.cols = 2, 3
    with pytest.raises(ValueError, match="length must not be null"):
        _C.trajectory_stats(prm)
    x = torch.zeros(2, 3)
    prm.length = torch.zeros(2, dtype=torch.int64).data_ptr()
    prm.teacher_logprob, prm.teacher_logprob_row_stride = x.data_ptr(), 2
    with pytest.raises(ValueError, match="teacher_logprob_row_stride must be >= cols"):
        _C.trajectory_stats(prm)
    fw = _C.FireWeightsParams()
    fw.rows, fw.cols = 1, 1
    with pytest.raises(ValueError, match="teacher_entropy must not be null"):
        _C.fire_weights(fw)
    ga = _C.GroupAdvParams()
    ga.rows, ga.cols, ga.clip_low, ga.clip_high = 1, 1, 1.0, 0.0
    ga.teacher_logprob = ga.student_logprob = x.data_ptr()
    ga.teacher_logprob_row_stride = ga.student_logprob_row_stride = 3
    with pytest.raises(ValueError, match="clip_low must be < clip_high"):
        _C.group_reward_moments(ga)


# ---- fire_token_weights -------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", ["trajectory", "batch"])
def test_fire_token_weights_matches_reference(device, dtype, shape, normalize):
    B, T = shape
    b = make_batch(B, T, dtype=dtype, device=device, seed=11, empty_rows=(0,) if B > 2 else (), noncontig=T > 5)
    keep = trajectory_scores(b["teacher_logprob"], b["mask"], p=30).keep
    got = fire_token_weights(b["teacher_entropy"], b["student_entropy"], b["mask"], keep=keep, normalize=normalize, alpha=0.7, beta=1.3)
    r = ref_inputs(b)
    exp = fire_token_weights_ref(r["teacher_entropy"], r["student_entropy"], r["mask"], keep=keep, normalize=normalize, alpha=0.7, beta=1.3)
    assert got.weight.dtype == dtype and got.weight.is_contiguous()
    close(got.weight, exp.weight, dtype, "weight")
    close(got.max_teacher_entropy, exp.max_teacher_entropy, dtype, "max_teacher_entropy")
    close(got.max_student_entropy, exp.max_student_entropy, dtype, "max_student_entropy")
    assert not got.weight.isnan().any()
    w = got.weight.double().cpu()
    valid = (b["mask"] & keep.unsqueeze(1)).cpu()
    assert torch.equal(w[~valid], torch.zeros_like(w[~valid]))
    if valid.any():
        if normalize == "trajectory":
            n = valid.sum(1)
            rows = n > 0
            torch.testing.assert_close(w.sum(1)[rows] / n[rows], torch.ones(int(rows.sum()), dtype=torch.float64), **tols(dtype))
        else:
            torch.testing.assert_close(w[valid].mean(), torch.tensor(1.0, dtype=torch.float64), **tols(dtype))


def test_fire_weights_multi_teacher_normalise_per_teacher():
    b = make_batch(10, 12, seed=12)
    teacher = torch.tensor([0, 1] * 5)
    ht = b["teacher_entropy"].clone()
    ht[teacher == 1] *= 10  # a much less confident teacher
    got = fire_token_weights(ht, b["student_entropy"], b["mask"], teacher_index=teacher)
    exp = fire_token_weights_ref(ht, b["student_entropy"], b["mask"], teacher_index=teacher)
    close(got.weight, exp.weight, torch.float64, "weight")
    assert got.max_teacher_entropy.shape == (2,)
    close(got.max_teacher_entropy, exp.max_teacher_entropy, torch.float64, "max_teacher_entropy")


def test_fire_weights_zero_entropies_and_unit_weights():
    m = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    z = torch.zeros(3, 3, dtype=torch.float64)
    for normalize in ("trajectory", "batch"):
        out = fire_token_weights(z, z, m, normalize=normalize)  # max H = 0: c_t = 1, c_s = 0
        assert torch.equal(out.weight, m.double()), normalize
        assert out.max_teacher_entropy.item() == 0 and out.max_student_entropy.item() == 0
    # alpha = beta = 0: exactly 1 on every kept valid token, whatever the entropies
    b = make_batch(6, 10, seed=13)
    out = fire_token_weights(b["teacher_entropy"], b["student_entropy"], b["mask"], alpha=0, beta=0)
    assert torch.equal(out.weight, b["mask"].double())
    # unnormalised shape of the weight: the most confident teacher token / most confused student
    ht = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    hs = torch.tensor([[4.0, 0.0]], dtype=torch.float64)
    out = fire_token_weights(ht, hs, None, normalize="trajectory")
    raw = torch.tensor([(1 + 1) * (1 + 1), (1 + 0) * (1 + 0)], dtype=torch.float64)
    torch.testing.assert_close(out.weight[0], raw / raw.mean())


def test_fire_weights_dropped_rollouts_do_not_set_the_maxima():
    b = make_batch(4, 6, seed=14)
    ht = b["teacher_entropy"].clone()
    ht[1] = 1e6
    ht[3, 0] = math.nan  # NaN on a dropped rollout is ignored too
    keep = torch.tensor([True, False, True, False])
    out = fire_token_weights(ht, b["student_entropy"], b["mask"], keep=keep)
    assert out.max_teacher_entropy.item() < 3.0 and not out.weight.isnan().any()
    assert torch.equal(out.weight[1], torch.zeros(6, dtype=torch.float64))
    # ...while NaN on a kept rollout's valid position reaches the weights (never silently finite)
    ht[0, 0] = math.nan
    out = fire_token_weights(ht, b["student_entropy"], b["mask"], keep=keep)
    assert out.max_teacher_entropy.isnan().all() and out.weight[0, 0].isnan()


def test_fire_weights_are_detached():
    b = make_batch(3, 4, seed=15)
    ht = b["teacher_entropy"].nan_to_num(0).requires_grad_()
    hs = b["student_entropy"].nan_to_num(0).requires_grad_()
    out = fire_token_weights(ht, hs, b["mask"])
    assert not out.weight.requires_grad


def test_fire_weights_bad_arguments():
    b = make_batch(4, 5)
    ht, hs, m = b["teacher_entropy"], b["student_entropy"], b["mask"]
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        fire_token_weights(ht, hs, m, alpha=-0.5)
    with pytest.raises(ValueError, match="normalize must be 'trajectory' or 'batch'"):
        fire_token_weights(ht, hs, m, normalize="token")
    with pytest.raises(ValueError, match="student_entropy must have the shape of teacher_entropy"):
        fire_token_weights(ht, hs[:, :2], m)
    with pytest.raises(TypeError, match="keep must be a bool tensor"):
        fire_token_weights(ht, hs, m, keep=torch.ones(4))
    with pytest.raises(ValueError, match="keep must have shape \\(4,\\)"):
        fire_token_weights(ht, hs, m, keep=torch.ones(5, dtype=torch.bool))


# ---- group_advantages ---------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (16, 129), (6, 1000)])
def test_group_advantages_matches_reference(device, dtype, shape):
    B, T = shape
    b = make_batch(B, T, dtype=dtype, device=device, seed=21, empty_rows=(2,) if B > 2 else (), noncontig=T > 5)
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([-7, 2**60, 3, 3])[torch.randint(0, 4, (B,), generator=g)].to(device)
    got = group_advantages(b["teacher_logprob"], b["student_logprob"], b["mask"], ids)
    r = ref_inputs(b)
    exp = group_advantages_ref(r["teacher_logprob"], r["student_logprob"], r["mask"], ids)
    assert got.advantage.dtype == dtype
    close(got.advantage, exp.advantage, dtype, "advantage")
    for name in ("reward_mean", "group_mean", "group_std"):
        close(getattr(got, name), getattr(exp, name), dtype, name)
    assert torch.equal(got.group_count.cpu(), exp.group_count.cpu())
    assert not got.advantage.isnan().any()


def test_group_advantages_normalise_each_pooled_group():
    b = make_batch(12, 40, seed=22)
    ids = torch.arange(12) // 4
    out = group_advantages(b["teacher_logprob"], b["student_logprob"], b["mask"], ids, clip_low=-1, clip_high=1, bonus=0.5)
    for g in range(3):
        sel = b["mask"] & (ids == g).unsqueeze(1)
        a = out.advantage[sel]
        assert abs(a.mean().item()) < 1e-12
        assert abs(a.std(unbiased=False).item() - 1.0) < 1e-4  # std / (std + 1e-6)


def test_group_advantages_edge_cases():
    T = 5
    lq = torch.zeros(5, T, dtype=torch.float64)
    lp = torch.zeros(5, T, dtype=torch.float64)
    lq[0:2] = 10.0  # group 0: reward clipped to 5 + 0.02 everywhere -> all equal
    lq[2, 0] = -1.0  # group 1: a single valid token
    lq[3:5] = torch.randn(2, T, dtype=torch.float64)  # group 2: one rollout with tokens, one empty
    mask = torch.ones(5, T, dtype=torch.bool)
    mask[2, 1:] = False
    mask[4] = False
    ids = torch.tensor([0, 0, 1, 2, 2])
    out = group_advantages(lq, lp, mask, ids)
    assert torch.equal(out.advantage[0:3], torch.zeros(3, T, dtype=torch.float64))  # exactly 0, not 1e-11
    assert out.group_std[0] == 0 and out.group_mean[0] == 5.02
    assert torch.equal(out.advantage[4], torch.zeros(T, dtype=torch.float64))
    assert out.group_count.tolist() == [10, 10, 1, 5, 5]
    assert not out.advantage.isnan().any()
    # a group of one rollout is normalised over its own tokens
    torch.testing.assert_close(out.advantage[3].mean(), torch.tensor(0.0, dtype=torch.float64), atol=1e-12, rtol=0)
    # every row empty, and an empty batch
    out = group_advantages(lq, lp, torch.zeros_like(mask), ids)
    assert torch.equal(out.advantage, torch.zeros_like(lq)) and not out.group_std.isnan().any()
    out = group_advantages(lq[:0], lp[:0], None, ids[:0])
    assert out.advantage.shape == (0, T)


def test_group_advantages_relabel_and_permutation_invariant():
    b = make_batch(9, 11, seed=23)
    ids = torch.tensor([5, 5, 1, 1, 1, 9, 5, 9, 1])
    out = group_advantages(b["teacher_logprob"], b["student_logprob"], b["mask"], ids)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    out_p = group_advantages(b["teacher_logprob"][perm], b["student_logprob"][perm], b["mask"][perm], ids[perm] * 1000 - 3)
    torch.testing.assert_close(out_p.advantage, out.advantage[perm], rtol=1e-12, atol=1e-12)


def test_group_advantages_bad_arguments():
    b = make_batch(4, 5)
    lq, lp, m = b["teacher_logprob"], b["student_logprob"], b["mask"]
    ids = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="group_index must have shape \\(4,\\)"):
        group_advantages(lq, lp, m, ids[:3])
    with pytest.raises(TypeError, match="group_index must be an integer tensor"):
        group_advantages(lq, lp, m, ids.float())
    with pytest.raises(ValueError, match="student_logprob must have the shape of teacher_logprob"):
        group_advantages(lq, lp[:, :4], m, ids)
    with pytest.raises(ValueError, match="eps must be > 0"):
        group_advantages(lq, lp, m, ids, eps=0.0)
    with pytest.raises(ValueError, match="clip_low must be < clip_high"):
        group_advantages(lq, lp, m, ids, clip_low=5, clip_high=-3)


# ---- numeric ranges and argument types (all four entry points) ----------------------


def test_fire_weights_reject_coefficients_float32_cannot_hold():
    b = make_batch(4, 5)
    ht, hs, m = b["teacher_entropy"], b["student_entropy"], b["mask"]
    # (1 + alpha)(1 + beta) is the largest weight; it must be a finite float32
    for alpha, beta in ((1e39, 1.0), (1.0, 1e39), (1e20, 1e19)):
        with pytest.raises(ValueError, match=r"alpha and beta are too large.*float32"):
            fire_token_weights(ht, hs, m, alpha=alpha, beta=beta)
    with pytest.raises(ValueError, match="alpha must be finite"):
        fire_token_weights(ht, hs, m, alpha=math.inf)
    with pytest.raises(ValueError, match="beta must be finite"):
        fire_token_weights(ht, hs, m, beta=math.nan)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        fire_token_weights(ht, hs, m, beta=-1e-9)
    with pytest.raises(TypeError, match="alpha must be a number"):
        fire_token_weights(ht, hs, m, alpha=True)
    # the largest representable coefficients give finite weights, in float32 too
    for dtype in (torch.float32, torch.float64):
        out = fire_token_weights(ht.nan_to_num(0).to(dtype), hs.nan_to_num(0).to(dtype), m,
                                 alpha=1e38, beta=0.0)
        assert bool(out.weight.isfinite().all())
        exp = fire_token_weights_ref(ht.nan_to_num(0).to(dtype).double(), hs.nan_to_num(0).double(), m,
                                     alpha=1e38, beta=0.0)
        close(out.weight, exp.weight, dtype, f"weight {dtype}")


def test_signal_scalars_are_checked_with_their_range():
    b = make_batch(4, 5)
    lq, lp, ht, hs, m = (b[k] for k in ("teacher_logprob", "student_logprob", "teacher_entropy",
                                        "student_entropy", "mask"))
    ids = torch.tensor([0, 0, 1, 1])
    cases = [
        (lambda: trajectory_scores(lq, m, p=math.inf), ValueError, "p must be finite"),
        (lambda: trajectory_scores(lq, m, p=True), TypeError, "p must be a number"),
        (lambda: trajectory_scores(lq, m, p="20"), TypeError, "p must be a number"),
        (lambda: trajectory_scores(lq, m, teacher_index=ids, num_teachers=0), ValueError,
         r"num_teachers must be an int in \[1, 2147483647\]"),
        (lambda: trajectory_scores(lq, m, teacher_index=ids, num_teachers=2.0), TypeError,
         "num_teachers must be an int"),
        (lambda: trajectory_scores(lq, m, teacher_index=ids, num_teachers=2**40), ValueError,
         "num_teachers must be an int in"),
        (lambda: trajectory_scores(lq, m, num_teachers=2), ValueError, "num_teachers needs teacher_index"),
        (lambda: trajectory_scores(lq, m, sync="yes"), TypeError, "sync must be None, True or False"),
        (lambda: trajectory_scores(lq, m.to(torch.complex64)), TypeError, "mask must be bool, integer or floating"),
        (lambda: trajectory_filter(lq, torch.ones(4, dtype=torch.int64)), ValueError,
         "score must be a 1-D floating-point tensor"),
        (lambda: trajectory_filter(lq[:, 0], torch.ones(4)), TypeError, "length must be an integer tensor"),
        (lambda: trajectory_filter(lq[:, 0], torch.ones(4, dtype=torch.int64), p=101), ValueError,
         r"p must be a percentage in \[0, 100\]"),
        (lambda: trajectory_filter(lq[:, 0], torch.ones(4, dtype=torch.int64), teacher_index=ids,
                                   num_teachers=1), ValueError, "teacher_index must be < num_teachers=1"),
        (lambda: fire_token_weights(ht, hs, m, teacher_index=ids, num_teachers=-1), ValueError,
         "num_teachers must be an int in"),
        (lambda: fire_token_weights(ht, hs, m, sync=1), TypeError, "sync must be None, True or False"),
        (lambda: group_advantages(lq, lp, m, ids, clip_low=math.nan), ValueError, "clip_low must be finite"),
        (lambda: group_advantages(lq, lp, m, ids, clip_high=math.inf), ValueError, "clip_high must be finite"),
        (lambda: group_advantages(lq, lp, m, ids, bonus=-math.inf), ValueError, "bonus must be finite"),
        (lambda: group_advantages(lq, lp, m, ids, eps=math.inf), ValueError, "eps must be finite"),
        (lambda: group_advantages(lq, lp, m, ids, eps=-1.0), ValueError, r"eps must be > 0.*allowed: \(0, inf\)"),
        (lambda: group_advantages(lq, lp, m, ids, clip_low=1.0, clip_high=1.0), ValueError,
         "clip_low must be < clip_high"),
        (lambda: group_advantages(lq, lp, m, ids, bonus="0.1"), TypeError, "bonus must be a number"),
        (lambda: group_advantages(lq, lp, m, ids, sync="no"), TypeError, "sync must be None, True or False"),
        (lambda: group_advantages(lq, lp.long(), m, ids), TypeError,
         "student_logprob must be a floating-point tensor"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()


def test_teacher_count_inferred_from_ids_is_bounded():
    b = make_batch(2, 3)
    with pytest.raises(ValueError, match="teacher_index must be < 2147483648"):
        trajectory_scores(b["teacher_logprob"], b["mask"], teacher_index=torch.tensor([0, 2**40]))
