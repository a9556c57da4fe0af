"""Shared pieces of the losses: argument checks, masked aggregation, the PPO surrogate."""
from __future__ import annotations

import math
from typing import Optional

import torch

from pyopd import _checks
from pyopd.config import AGG_MODES, PRESETS  # noqa: F401  (one home for the choices)



# ---- argument checks ----------------------------------------------------------------


# The argument checks are pyopd's one set (pyopd._checks), shared with the ops.


def check_2d(name: str, x) -> None:
    _checks.floating_2d(name, x)


def check_like(name: str, x, like: torch.Tensor, like_name: str, *, floating: bool = True) -> None:
    _checks.like(name, x, like, like_name, floating=floating)


def check_rows(name: str, x, B: int, device: torch.device, *, kind: str) -> None:
    _checks.per_row(name, x, B, device, kind=kind, what="logprob")


def check_number(name: str, v, *, lo: Optional[float] = None, lo_open: bool = False,
                 hi: Optional[float] = None, hi_open: bool = False) -> float:
    return _checks.number(name, v, lo=lo, lo_open=lo_open, hi=hi, hi_open=hi_open)


def check_preset(preset) -> str:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    return preset


def as_mask(mask: Optional[torch.Tensor], like: torch.Tensor, like_name: str = "logprob") -> torch.Tensor:
    """[B, T] bool response mask (nonzero = valid); None = all valid."""
    if mask is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    check_like("mask", mask, like, like_name, floating=False)
    return mask if mask.dtype == torch.bool else mask != 0


def select_teacher(name: str, x: Optional[torch.Tensor], teacher_index: Optional[torch.Tensor], B: int):
    """Each sample's own teacher's signal: x[teacher_index[i], i] for [K, B, T] x; [B, T] x as is."""
    if x is None or x.dim() != 3:
        return x
    if teacher_index is None:
        raise ValueError(f"{name} has shape (teachers, batch, seqlen) {tuple(x.shape)}: pass teacher_index")
    check_rows("teacher_index", teacher_index, B, x.device, kind="int")
    if x.shape[1] != B:
        raise ValueError(f"{name} must have shape (teachers, {B}, seqlen), got {tuple(x.shape)}")
    idx = teacher_index.to(torch.int64)
    if B and (int(idx.min()) < 0 or int(idx.max()) >= x.shape[0]):
        raise ValueError(f"teacher_index must lie in [0, {x.shape[0]}) for {name} of {x.shape[0]} teachers")
    return x[idx, torch.arange(B, device=x.device)]


def check_ppo_args(clip_ratio, clip_ratio_low, clip_ratio_high, dual_clip, agg, denominator):
    eps = check_number("clip_ratio", clip_ratio, lo=0.0)
    lo = eps if clip_ratio_low is None else check_number("clip_ratio_low", clip_ratio_low, lo=0.0)
    hi = eps if clip_ratio_high is None else check_number("clip_ratio_high", clip_ratio_high, lo=0.0)
    if lo > 1.0:
        raise ValueError(f"clip_ratio_low must be <= 1 (the ratio is clipped below at 1 - clip_ratio_low), got {lo}")
    if dual_clip is not None:
        dual_clip = check_number("dual_clip", dual_clip, lo=1.0, lo_open=True)
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    if denominator is not None:
        denominator = check_number("denominator", denominator, lo=0.0, lo_open=True)
    return lo, hi, dual_clip, denominator


# ---- aggregation --------------------------------------------------------------------


def aggregate_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token-mean",
    *,
    denominator: Optional[float] = None,
) -> torch.Tensor:
    """Scalar from a [B, T] per-token loss over the positions where `mask` [B, T] bool is true.

    token-mean:           sum_{i,t} l / D, D = number of valid tokens
    seq-mean-token-mean:  sum_i (sum_t l / n_i) / D, D = rows with n_i > 0
    seq-mean-token-sum:   sum_{i,t} l / D, D = rows with n_i > 0

    Rows without valid positions count nowhere (no NaN); an empty batch gives 0.
    `denominator` replaces D: when one batch is split into micro-batches for
    gradient accumulation, pass the whole batch's D to every micro-batch and the
    micro-batch losses sum to the whole-batch loss (and gradient).
    """
    zero = torch.zeros((), dtype=loss_mat.dtype, device=loss_mat.device)
    masked = torch.where(mask, loss_mat, zero)  # select: a NaN / inf at padding stays out
    n = mask.sum(-1)
    if agg == "token-mean":
        num, den = masked.sum(), n.sum()
    elif agg == "seq-mean-token-mean":
        num = (masked.sum(-1) / n.clamp(min=1).to(loss_mat.dtype)).sum()
        den = (n > 0).sum()
    elif agg == "seq-mean-token-sum":
        num, den = masked.sum(), (n > 0).sum()
    else:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    if denominator is not None:
        return num / denominator
    return num / den.clamp(min=1).to(loss_mat.dtype)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(mask, x, zero).sum() / mask.sum().clamp(min=1).to(x.dtype)


# ---- PPO surrogate ------------------------------------------------------------------


def ppo_terms(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: Optional[float],
    agg: str,
    denominator: Optional[float],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate (verl's formulation) and its diagnostics as 0-d tensors.

    ratio = exp(clamp(logp - logp_old, -20, 20)); per token
    l = max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high)), and with a
    dual clip c, l = min(l, -c A) where A < 0 (bounds the loss of a negative
    advantage when the ratio explodes).
    """
    adv = advantages.detach()
    log_ratio = torch.clamp(logprob - old_logprob.detach(), min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    l12 = torch.maximum(l1, l2)
    per_token = l12
    metrics = {
        "pg_clipfrac": masked_mean((l2 > l1).to(log_ratio.dtype), mask),
        "ppo_kl": masked_mean(-log_ratio.detach(), mask),
    }
    if dual_clip is not None:
        l3 = -adv * dual_clip
        neg = adv < 0
        per_token = torch.where(neg, torch.minimum(l12, l3), l12)
        metrics["pg_clipfrac_lower"] = masked_mean(((l12 > l3) & neg).to(log_ratio.dtype), mask)
    loss = aggregate_loss(per_token, mask, agg, denominator=denominator)
    metrics["pg_loss"] = loss.detach()
    return loss, metrics


def distill(
    logprob: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    reward: Optional[torch.Tensor] = None,
    clip_ratio: float,
    clip_ratio_low: Optional[float],
    clip_ratio_high: Optional[float],
    dual_clip: Optional[float],
    agg: str,
    denominator: Optional[float],
    penalty: Optional[tuple[float, torch.Tensor]] = None,
    extra: Optional[dict] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The tail every policy-gradient distillation loss shares.

    PPO surrogate of the advantages `adv` over `mask`, plus an optional
    ``penalty = (coef, per_token)`` aggregated the same way (e.g. COPSD's k3
    KL to a reference), and the common metrics: the PPO ones,
    advantage_mean/min/max, reward_mean (when `reward` is given), num_tokens,
    kl_ref / kl_loss (with a penalty), `extra`, loss.
    """
    lo, hi, dual_clip, denominator = check_ppo_args(
        clip_ratio, clip_ratio_low, clip_ratio_high, dual_clip, agg, denominator
    )
    loss, metrics = ppo_terms(
        logprob, old, adv, mask, clip_low=lo, clip_high=hi, dual_clip=dual_clip, agg=agg, denominator=denominator
    )
    metrics.update(token_stats(adv, mask, "advantage"))
    if reward is not None:
        # log q(y) - log p_old(y) averaged over sampled tokens: minus the sampled-token
        # estimate of KL(p_old || q).
        metrics["reward_mean"] = masked_mean(reward, mask)
    metrics["num_tokens"] = mask.sum()
    if penalty is not None:
        coef, per_token = penalty
        pen = aggregate_loss(per_token, mask, agg, denominator=denominator)
        metrics["kl_ref"] = masked_mean(per_token.detach(), mask)
        metrics["kl_loss"] = pen.detach()
        loss = loss + coef * pen
    if extra:
        metrics.update(extra)
    metrics["loss"] = loss.detach()
    return loss, to_floats(metrics)


def to_floats(metrics: dict) -> dict[str, float]:
    """Plain floats for a logger, with one device sync for all tensor entries."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
    if keys:
        vals = torch.stack([metrics[k].detach().to(torch.float64).reshape(()) for k in keys]).cpu().tolist()
        out.update(zip(keys, vals))
    return {k: out[k] for k in metrics}


def token_stats(x: torch.Tensor, mask: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """mean / min / max of x over mask (0 for an empty mask), without a device sync."""
    x = x.detach()
    if x.numel() == 0:
        z = torch.zeros((), dtype=x.dtype, device=x.device)
        return {f"{prefix}_mean": z, f"{prefix}_min": z, f"{prefix}_max": z}
    inf = torch.tensor(math.inf, dtype=x.dtype, device=x.device)
    any_ = mask.any()
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return {
        f"{prefix}_mean": masked_mean(x, mask),
        f"{prefix}_min": torch.where(any_, torch.where(mask, x, inf).amin(), zero),
        f"{prefix}_max": torch.where(any_, torch.where(mask, x, -inf).amax(), zero),
    }
