"""COPSD: distillation from a constitution-conditioned teacher with dense group advantages.

See docs/design.md (COPSD). The teacher scores the student's rollout with the
constitution wrapped around the prompt (the caller builds that input); this
module turns the per-token log-probs into the loss.

Micro-batching: the group statistics pool every rollout of a prompt, so
compute `pyopd.group_advantages` once on the whole batch (across ranks when
torch.distributed is initialised) and pass slices of `.advantage` as
`advantages=` with the whole batch's `denominator`.
"""
from __future__ import annotations

from typing import Optional

import torch

from pyopd.losses._common import (
    as_mask,
    check_2d,
    check_like,
    check_number,
    check_ppo_args,
    check_preset,
    check_rows,
    distill,
    masked_mean,
    to_floats,
)
from pyopd.ops.signals import group_advantages

__all__ = ["copsd_loss", "copsd_signals", "k3_kl"]


# Where r - l is clamped before exp: pyopd keeps the exp finite in float32
# (preset "paper"); the released COPSD code clamps the k3 value itself to [-10, 10].
K3_CLAMP = {"paper": None, "released": 10.0}


def k3_kl(logprob: torch.Tensor, ref_logprob: torch.Tensor, clamp: Optional[float] = None) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref): exp(r - l) - (r - l) - 1 >= 0, r - l clamped to [-20, 20].

    `clamp`: additionally clamp the k3 value to [-clamp, clamp] (the released COPSD code).
    """
    d = torch.clamp(ref_logprob.detach() - logprob, min=-20.0, max=20.0)
    k3 = torch.exp(d) - d - 1.0
    return k3 if clamp is None else torch.clamp(k3, min=-clamp, max=clamp)


def copsd_loss(
    logprob: torch.Tensor,
    old_logprob: Optional[torch.Tensor],
    teacher_logprob: Optional[torch.Tensor],
    mask: Optional[torch.Tensor] = None,
    group_index: Optional[torch.Tensor] = None,
    *,
    advantages: Optional[torch.Tensor] = None,
    ref_logprob: Optional[torch.Tensor] = None,
    kl_coef: float = 0.005,
    reward_clip: tuple[float, float] = (-3.0, 5.0),
    reward_bonus: float = 0.02,
    adv_eps: float = 1e-6,
    clip_ratio: float = 0.2,
    clip_ratio_low: Optional[float] = None,
    clip_ratio_high: Optional[float] = None,
    dual_clip: Optional[float] = 3.0,
    agg: str = "token-mean",
    denominator: Optional[float] = None,
    preset: str = "paper",
    process_group=None,
    sync: Optional[bool] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """COPSD loss: dense group advantage + PPO (clip 0.2, dual clip 3) + k3 KL to a reference.

    Args:
        logprob: [B, T] student log-prob of the sampled token (with grad).
        old_logprob: [B, T] rollout policy's; None = logprob.detach().
        teacher_logprob: [B, T] constitution-conditioned teacher's log-prob;
            may be None when `advantages` is given.
        mask: [B, T] response mask; None = all valid.
        group_index: [B] int prompt id of each rollout (for the group advantage).
        advantages: [B, T] precomputed `pyopd.group_advantages(...).advantage`
            of the whole batch (micro-batch path); replaces group_index.
        ref_logprob: [B, T] log-prob under the initial student; None = no KL term.
        kl_coef: weight of the k3 KL term (0.005).
        reward_clip, reward_bonus, adv_eps: r_t = clip(log q - log p_old, *reward_clip)
            + reward_bonus; A = (r - group mean) / (group std + adv_eps).
        PPO arguments as in `ppo_policy_loss`.

    Loss = PPO(A) + kl_coef * agg(k3), both aggregated with `agg` / `denominator`.
    Metrics: the PPO ones, advantage_mean/min/max, num_tokens, and when
    computed here reward_mean and group_std_mean; kl_ref and kl_loss with a
    reference.
    """
    check_2d("logprob", logprob)
    B = logprob.shape[0]
    old = logprob.detach() if old_logprob is None else old_logprob.detach()
    if old_logprob is not None:
        check_like("old_logprob", old_logprob, logprob, "logprob")
    m = as_mask(mask, logprob)
    check_ppo_args(clip_ratio, clip_ratio_low, clip_ratio_high, dual_clip, agg, denominator)
    check_preset(preset)
    kl_coef = check_number("kl_coef", kl_coef, lo=0.0)
    metrics: dict = {}
    if advantages is None:
        if group_index is None or teacher_logprob is None:
            raise ValueError("copsd_loss needs teacher_logprob and group_index, or precomputed advantages")
        check_like("teacher_logprob", teacher_logprob, logprob, "logprob")
        check_rows("group_index", group_index, B, logprob.device, kind="int")
        adv, metrics = copsd_signals(
            teacher_logprob, old, m, group_index, reward_clip=reward_clip, reward_bonus=reward_bonus,
            adv_eps=adv_eps, preset=preset, process_group=process_group, sync=sync,
        )
    else:
        if group_index is not None:
            raise ValueError("pass either advantages or group_index, not both")
        check_like("advantages", advantages, logprob, "logprob")
        adv = advantages.detach()
    penalty = None
    if ref_logprob is not None:
        check_like("ref_logprob", ref_logprob, logprob, "logprob")
        penalty = (kl_coef, k3_kl(logprob, ref_logprob, clamp=K3_CLAMP[preset]))
    return distill(
        logprob, old, adv, m, clip_ratio=clip_ratio, clip_ratio_low=clip_ratio_low,
        clip_ratio_high=clip_ratio_high, dual_clip=dual_clip, agg=agg, denominator=denominator,
        penalty=penalty, extra=metrics,
    )


def copsd_signals(
    teacher_logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    mask: torch.Tensor,
    group_index: torch.Tensor,
    *,
    reward_clip: tuple[float, float] = (-3.0, 5.0),
    reward_bonus: float = 0.02,
    adv_eps: float = 1e-6,
    preset: str = "paper",
    process_group=None,
    sync: Optional[bool] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """COPSD's dense group advantages of a whole rollout batch, and their metrics.

    Returns ([B, T] advantage, {"reward_mean", "group_std_mean"}). Take it once on
    the whole batch and pass slices as `copsd_loss(advantages=...)`.
    """
    check_preset(preset)
    check_2d("old_logprob", old_logprob)
    m = as_mask(mask, old_logprob, "old_logprob")
    if not (isinstance(reward_clip, (tuple, list)) and len(reward_clip) == 2):
        raise ValueError(f"reward_clip must be a (low, high) pair, got {reward_clip!r}")
    if preset == "released":
        from pyopd.presets.released import group_advantages_released as group_advantages_fn
    else:
        group_advantages_fn = group_advantages
    ga = group_advantages_fn(
        teacher_logprob, old_logprob.detach(), m, group_index, clip_low=reward_clip[0],
        clip_high=reward_clip[1], bonus=reward_bonus, eps=adv_eps, process_group=process_group, sync=sync,
    )
    nonempty = m.any(-1)
    w = m.sum(-1).to(torch.float64)
    metrics = {"reward_mean": (ga.reward_mean * w).sum() / w.sum().clamp(min=1),
               "group_std_mean": masked_mean(ga.group_std, nonempty)}
    # The released advantage is NaN on rollouts of a group with no valid token; those
    # positions never enter the loss, and a 0 keeps NaN out of the gradient.
    adv = torch.where(m, ga.advantage, torch.zeros((), dtype=ga.advantage.dtype, device=m.device))
    return adv.to(old_logprob.dtype), to_floats(metrics)
