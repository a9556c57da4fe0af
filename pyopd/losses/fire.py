"""FiRe-OPD: filter low-quality rollouts, then reweight tokens (docs/design.md, FiRe-OPD).

Micro-batching: the filter and the weight normalisers are batch-level. Compute
them once on the whole rollout batch with `fire_opd_signals` (they are cheap
[B]/[B, T] reductions, synchronised across ranks when torch.distributed is
initialised), then slice `keep` / `weight` per micro-batch and pass them to
`fire_opd_loss` together with the whole batch's `denominator`:

    sig = fire_opd_signals(teacher_logprob, mask, teacher_entropy=ht, student_entropy=hs)
    D = (mask & sig.keep[:, None]).sum()        # token-mean over the batch (all ranks: all-reduce it)
    for idx in micro_batches:
        loss, metrics = fire_opd_loss(logprob[idx], old[idx], teacher_logprob[idx], mask[idx],
                                      keep=sig.keep[idx], weight=sig.weight[idx], denominator=D)
        loss.backward()

Calling `fire_opd_loss` without keep / weight computes them from that call's
tensors, which is right only when the call sees the whole batch.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from pyopd.losses._common import (
    as_mask,
    check_2d,
    check_like,
    check_ppo_args,
    check_preset,
    check_rows,
    distill,
    masked_mean,
    select_teacher,
    to_floats,
    token_stats,
)
from pyopd.ops.signals import FireWeights, TrajectoryScores, fire_token_weights, trajectory_scores

__all__ = ["FireSignals", "fire_opd_loss", "fire_opd_signals"]


class FireSignals(NamedTuple):
    """What FiRe-OPD needs from the whole batch, plus the diagnostics behind it."""

    keep: torch.Tensor  # [B] bool
    weight: torch.Tensor  # [B, T] detached; 0 on dropped rollouts and masked positions
    scores: Optional[TrajectoryScores]  # None with preset="released"
    weights: Optional[FireWeights]
    # plain floats: keep_ratio, num_kept, filter_threshold (per teacher: filter_threshold_k),
    # score_mean, response_length_mean, teacher/student_entropy_mean, kl_mean (when kl
    # was given), weight_mean/min/max over kept tokens
    metrics: dict


def _signal_metrics(s: TrajectoryScores, weight: torch.Tensor, with_kl: bool) -> dict[str, float]:
    nonempty = s.length > 0
    f64 = torch.float64
    d: dict = {
        "keep_ratio": s.keep.sum().to(f64) / nonempty.sum().clamp(min=1).to(f64),
        "num_kept": s.keep.sum(),
        "score_mean": masked_mean(s.score.to(f64), nonempty),
        "response_length_mean": masked_mean(s.length.to(f64), nonempty),
        "teacher_entropy_mean": masked_mean(s.mean_teacher_entropy.to(f64), nonempty),
        "student_entropy_mean": masked_mean(s.mean_student_entropy.to(f64), nonempty),
    }
    if with_kl:
        d["kl_mean"] = masked_mean(s.mean_kl.to(f64), nonempty)
    thr = s.threshold
    if thr.numel() == 1:
        d["filter_threshold"] = thr[0]
    else:
        d.update({f"filter_threshold_{k}": thr[k] for k in range(thr.numel())})
    d.update(token_stats(weight, weight > 0, "weight"))
    return to_floats(d)


def fire_opd_signals(
    teacher_logprob: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    teacher_entropy: torch.Tensor,
    student_entropy: torch.Tensor,
    kl: Optional[torch.Tensor] = None,
    p: float = 20.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    normalize: str = "trajectory",
    teacher_index: Optional[torch.Tensor] = None,
    num_teachers: Optional[int] = None,
    preset: str = "paper",
    micro_batch=None,
    process_group=None,
    sync: Optional[bool] = None,
) -> FireSignals:
    """The FiRe-OPD filter and soft weights of a whole rollout batch.

    Args:
        teacher_logprob, teacher_entropy, kl: [B, T], or [K, B, T] (every
            teacher's signal) with `teacher_index` [B] picking each sample's.
        student_entropy: [B, T] H_s.
        mask: [B, T] response mask; None = all valid.
        p, teacher_index, num_teachers: see `pyopd.trajectory_scores` (with
            several teachers, the filter ranks each teacher's samples apart).
        alpha, beta, normalize: see `pyopd.fire_token_weights`.
        process_group, sync: see `pyopd.trajectory_scores`.
        preset: "paper" (default) or "released": reproduce the authors' released
            code (its filter count, tie and empty-rollout handling, the token set of
            the entropy maxima and weight mean; see docs/presets.md). The released
            code takes them per micro-batch: pass `micro_batch` (rows per
            micro-batch, or a [B] micro-batch id per row); `normalize` and
            `process_group` do not apply, and `scores`/`weights` are None.
    """
    check_preset(preset)
    if preset == "released":
        from pyopd.presets.released import fire_signals_released

        if micro_batch is None:
            raise ValueError("preset 'released' takes the FiRe signals per micro-batch: pass micro_batch")
        rs = fire_signals_released(teacher_logprob, mask, teacher_entropy=teacher_entropy,
                                   student_entropy=student_entropy, micro_batch=micro_batch, p=p,
                                   alpha=alpha, beta=beta, teacher_index=teacher_index,
                                   num_teachers=num_teachers)
        return FireSignals(keep=rs.keep, weight=rs.weight, scores=None, weights=None, metrics=rs.metrics)
    check_2d("student_entropy", student_entropy)
    B = student_entropy.shape[0]
    lq = select_teacher("teacher_logprob", teacher_logprob, teacher_index, B)
    ht = select_teacher("teacher_entropy", teacher_entropy, teacher_index, B)
    kl = select_teacher("kl", kl, teacher_index, B)
    scores = trajectory_scores(
        lq, mask, kl=kl, teacher_entropy=ht, student_entropy=student_entropy, p=p,
        teacher_index=teacher_index, num_teachers=num_teachers, process_group=process_group, sync=sync,
    )
    weights = fire_token_weights(
        ht, student_entropy, mask, keep=scores.keep, alpha=alpha, beta=beta, normalize=normalize,
        teacher_index=teacher_index, num_teachers=scores.threshold.numel() if teacher_index is not None else None,
        process_group=process_group, sync=sync,
    )
    return FireSignals(
        keep=scores.keep,
        weight=weights.weight,
        scores=scores,
        weights=weights,
        metrics=_signal_metrics(scores, weights.weight, kl is not None),
    )


def fire_opd_loss(
    logprob: torch.Tensor,
    old_logprob: Optional[torch.Tensor],
    teacher_logprob: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    keep: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    teacher_entropy: Optional[torch.Tensor] = None,
    student_entropy: Optional[torch.Tensor] = None,
    p: float = 20.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    normalize: str = "trajectory",
    teacher_index: Optional[torch.Tensor] = None,
    num_teachers: Optional[int] = None,
    clip_ratio: float = 0.2,
    clip_ratio_low: Optional[float] = None,
    clip_ratio_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    agg: str = "token-mean",
    denominator: Optional[float] = None,
    process_group=None,
    sync: Optional[bool] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """FiRe-OPD: A_t = w_t (log q(y_t) - log p_old(y_t)) on kept rollouts, PPO clipped surrogate.

    Dropped rollouts leave the loss entirely (also its denominator). Either pass
    `keep` [B] and `weight` [B, T] from `fire_opd_signals` on the whole batch
    (the micro-batch path, see the module doc), or `teacher_entropy` and
    `student_entropy` to compute them from this call's tensors (with `p`,
    `alpha`, `beta`, `normalize`, `teacher_index`, as in `fire_opd_signals`).
    `teacher_logprob` may be [K, B, T] with `teacher_index`. With p = 0 and
    alpha = beta = 0 this is exactly `opd_loss`. PPO arguments as in
    `ppo_policy_loss` (paper default: clip 0.2, token-mean).

    Metrics: the PPO ones, advantage_mean/min/max, reward_mean, num_tokens,
    weight_mean/min/max over the kept tokens, keep_ratio, and when the signals
    are computed here, the `FireSignals.metrics` ones too.
    """
    check_2d("logprob", logprob)
    B = logprob.shape[0]
    old = logprob.detach() if old_logprob is None else old_logprob.detach()
    if old_logprob is not None:
        check_like("old_logprob", old_logprob, logprob, "logprob")
    lq = select_teacher("teacher_logprob", teacher_logprob, teacher_index, B)
    check_like("teacher_logprob", lq, logprob, "logprob")
    m = as_mask(mask, logprob)
    check_ppo_args(clip_ratio, clip_ratio_low, clip_ratio_high, dual_clip, agg, denominator)
    signal_metrics: dict = {}
    if keep is None and weight is None:
        if teacher_entropy is None or student_entropy is None:
            raise ValueError("fire_opd_loss needs keep and weight (from fire_opd_signals) or teacher_entropy and student_entropy")
        sig = fire_opd_signals(
            teacher_logprob, m, teacher_entropy=teacher_entropy, student_entropy=student_entropy, p=p,
            alpha=alpha, beta=beta, normalize=normalize, teacher_index=teacher_index,
            num_teachers=num_teachers, process_group=process_group, sync=sync,
        )
        keep, weight = sig.keep, sig.weight
        signal_metrics = sig.metrics
    elif keep is None or weight is None:
        raise ValueError("pass keep and weight together (both from fire_opd_signals on the whole batch)")
    else:
        if teacher_entropy is not None or student_entropy is not None:
            raise ValueError("pass either keep/weight or teacher_entropy/student_entropy, not both")
        check_rows("keep", keep, B, logprob.device, kind="bool")
        check_like("weight", weight, logprob, "logprob")
    loss_mask = m & keep.view(B, 1)
    reward = lq.detach() - old
    adv = weight.detach().to(reward.dtype) * reward
    nonempty = m.any(-1)
    loss, out = distill(
        logprob, old, adv, loss_mask, reward=reward, clip_ratio=clip_ratio, clip_ratio_low=clip_ratio_low,
        clip_ratio_high=clip_ratio_high, dual_clip=dual_clip, agg=agg, denominator=denominator,
        extra={**token_stats(weight, loss_mask, "weight"),
               "keep_ratio": (keep & nonempty).sum().double() / nonempty.sum().clamp(min=1).double()},
    )
    for k, v in signal_metrics.items():
        out.setdefault(k, v)
    return loss, out
