"""Vanilla on-policy distillation and the baselines that share its interface.

Every loss here takes [B, T] per-token tensors (the student's log-prob of the
sampled token under the current parameters, with grad; the rollout policy's,
and the teacher's) and returns `(loss, metrics)`, metrics being plain floats.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from pyopd.losses._common import (
    as_mask,
    check_2d,
    check_like,
    check_number,
    check_ppo_args,
    distill,
    ppo_terms,
    to_floats,
)

__all__ = ["exopd_loss", "opd_loss", "ppo_policy_loss", "tip_loss", "tip_token_mask"]


def _old(logprob: torch.Tensor, old_logprob: Optional[torch.Tensor]) -> torch.Tensor:
    if old_logprob is None:  # one update per rollout: the rollout policy is the current one
        return logprob.detach()
    check_like("old_logprob", old_logprob, logprob, "logprob")
    return old_logprob.detach()


def ppo_policy_loss(
    logprob: torch.Tensor,
    old_logprob: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    clip_ratio: float = 0.2,
    clip_ratio_low: Optional[float] = None,
    clip_ratio_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    agg: str = "token-mean",
    denominator: Optional[float] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate over given advantages (verl's `compute_policy_loss`).

    Args:
        logprob: [B, T] log pi(y_t) under the current parameters (with grad).
        old_logprob: [B, T] log pi_old(y_t) of the rollout policy; None = logprob.detach().
        advantages: [B, T] (detached here).
        mask: [B, T] positions that count (bool or nonzero); None = all.
        clip_ratio: eps of clip(ratio, 1 - eps, 1 + eps); clip_ratio_low / clip_ratio_high
            override either side (DAPO's clip-higher).
        dual_clip: c > 1 bounds the loss of negative advantages at -c A; None = off.
        agg: "token-mean", "seq-mean-token-mean" or "seq-mean-token-sum" (see `aggregate_loss`).
        denominator: the aggregation's divisor for micro-batching (see `aggregate_loss`).

    Returns:
        (loss, {"pg_clipfrac", "ppo_kl", ["pg_clipfrac_lower"], "pg_loss"}).
    """
    check_2d("logprob", logprob)
    old = _old(logprob, old_logprob)
    check_like("advantages", advantages, logprob, "logprob")
    m = as_mask(mask, logprob)
    lo, hi, dual_clip, denominator = check_ppo_args(
        clip_ratio, clip_ratio_low, clip_ratio_high, dual_clip, agg, denominator
    )
    loss, metrics = ppo_terms(
        logprob, old, advantages, m, clip_low=lo, clip_high=hi, dual_clip=dual_clip, agg=agg, denominator=denominator
    )
    return loss, to_floats(metrics)


def opd_loss(
    logprob: torch.Tensor,
    old_logprob: Optional[torch.Tensor],
    teacher_logprob: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    clip_ratio: float = 0.2,
    clip_ratio_low: Optional[float] = None,
    clip_ratio_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    agg: str = "token-mean",
    denominator: Optional[float] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Vanilla OPD: A_t = log q(y_t) - log p_old(y_t), PPO clipped surrogate.

    The advantage is the sampled-token reverse-KL reward (its expectation under
    p_old is -KL(p_old || q)). Shapes [B, T]; see `ppo_policy_loss` for the
    PPO arguments. Metrics: pg_loss, pg_clipfrac, ppo_kl, advantage_mean/min/max,
    reward_mean, num_tokens (and pg_clipfrac_lower with a dual clip).
    """
    check_2d("logprob", logprob)
    old = _old(logprob, old_logprob)
    check_like("teacher_logprob", teacher_logprob, logprob, "logprob")
    m = as_mask(mask, logprob)
    reward = teacher_logprob.detach() - old
    return distill(
        logprob, old, reward, m, reward=reward,
        clip_ratio=clip_ratio, clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high,
        dual_clip=dual_clip, agg=agg, denominator=denominator,
    )


def exopd_loss(
    logprob: torch.Tensor,
    old_logprob: Optional[torch.Tensor],
    teacher_logprob: torch.Tensor,
    ref_logprob: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    lam: float = 1.0,
    clip_ratio: float = 0.2,
    clip_ratio_low: Optional[float] = None,
    clip_ratio_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    agg: str = "token-mean",
    denominator: Optional[float] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """ExOPD / G-OPD reward scaling: A_t = -[(log p_old - log r) - lam (log q - log r)].

    r is a reference policy (typically the initial student), `ref_logprob` its
    [B, T] log-prob of the sampled token. lam = 1 is vanilla OPD; lam > 1
    extrapolates past the teacher (ExOPD), lam < 1 interpolates toward r.
    """
    check_2d("logprob", logprob)
    old = _old(logprob, old_logprob)
    check_like("teacher_logprob", teacher_logprob, logprob, "logprob")
    check_like("ref_logprob", ref_logprob, logprob, "logprob")
    lam = check_number("lam", lam)
    m = as_mask(mask, logprob)
    lr = ref_logprob.detach()
    adv = -((old - lr) - lam * (teacher_logprob.detach() - lr))
    return distill(
        logprob, old, adv, m, reward=teacher_logprob.detach() - old,
        clip_ratio=clip_ratio, clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high,
        dual_clip=dual_clip, agg=agg, denominator=denominator, extra={"lam": lam},
    )


def _norm_by_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    mx = torch.clamp(torch.where(mask, x, zero).amax(), min=0) if x.numel() else zero
    return torch.where(mx > 0, x / torch.where(mx > 0, mx, torch.ones_like(mx)), zero)


def tip_token_mask(
    student_entropy: torch.Tensor,
    divergence: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    rho: float = 0.5,
) -> torch.Tensor:
    """TIP-style hard token selection: the top-rho valid tokens by soft-OR score.

    With a = H_s / max H_s and b = D / max D (maxima over the valid tokens of
    the call, x / 0 = 0), u = a + b - a b = 1 - (1 - a)(1 - b). Of the N valid
    tokens, those with u >= the ceil(rho N)-th largest u are selected: exactly
    ceil(rho N) without ties, every token tied with the threshold with them.

    Returns [B, T] bool. Taken over this call's tokens only: call it once on the
    whole batch and slice it per micro-batch.
    """
    check_2d("student_entropy", student_entropy)
    check_like("divergence", divergence, student_entropy, "student_entropy")
    m = as_mask(mask, student_entropy, "student_entropy")
    rho = check_number("rho", rho, lo=0.0, lo_open=True, hi=1.0)
    a = _norm_by_max(student_entropy.detach().to(torch.float64), m).clamp(0, 1)
    b = _norm_by_max(divergence.detach().to(torch.float64), m).clamp(0, 1)
    u = a + b - a * b
    n = int(m.sum())
    if n == 0:
        return m.clone()
    k = min(n, max(1, math.ceil(rho * n - 1e-9)))
    kth = torch.topk(u[m], k).values[-1]
    return m & (u >= kth)


def tip_loss(
    logprob: torch.Tensor,
    old_logprob: Optional[torch.Tensor],
    teacher_logprob: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    student_entropy: Optional[torch.Tensor] = None,
    divergence: Optional[torch.Tensor] = None,
    rho: float = 0.5,
    selection: Optional[torch.Tensor] = None,
    clip_ratio: float = 0.2,
    clip_ratio_low: Optional[float] = None,
    clip_ratio_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    agg: str = "token-mean",
    denominator: Optional[float] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """OPD restricted to TIP-selected tokens (see `tip_token_mask`).

    Either pass `selection` ([B, T] bool, computed once on the whole batch) or
    `student_entropy` (and optionally `divergence`, default |log q - log p_old|,
    e.g. the per-token KL of `pyopd.reverse_kl`) to select here. Unselected
    tokens leave the loss (and its denominator) entirely.
    """
    check_2d("logprob", logprob)
    old = _old(logprob, old_logprob)
    check_like("teacher_logprob", teacher_logprob, logprob, "logprob")
    m = as_mask(mask, logprob)
    reward = teacher_logprob.detach() - old
    if selection is None:
        if student_entropy is None:
            raise ValueError("tip_loss needs selection or student_entropy")
        check_like("student_entropy", student_entropy, logprob, "logprob")
        div = reward.abs() if divergence is None else divergence
        selection = tip_token_mask(student_entropy, div, m, rho=rho)
    else:
        if student_entropy is not None or divergence is not None:
            raise ValueError("pass either selection or student_entropy/divergence, not both")
        check_like("selection", selection, logprob, "logprob", floating=False)
        if selection.dtype != torch.bool:
            raise TypeError(f"selection must be a bool tensor, got {selection.dtype}")
    sel = m & selection
    extra = {"selected_ratio": sel.sum() / m.sum().clamp(min=1)}
    return distill(
        logprob, old, reward, sel, reward=reward,
        clip_ratio=clip_ratio, clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high,
        dual_clip=dual_clip, agg=agg, denominator=denominator, extra=extra,
    )
