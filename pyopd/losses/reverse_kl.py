"""The analytic full-vocabulary reverse KL as a directly differentiated loss.

Where the OPD family estimates KL(p || q) from the sampled token (a
high-variance policy-gradient signal), this differentiates the exact
per-token KL(p || q) = sum_j p_j (log p_j - log q_j) that the fused
`pyopd.reverse_kl` kernel computes over the whole vocabulary. It combines with
FiRe-OPD's filter and weights (`keep`, `weight` from `fire_opd_signals`) and
with COPSD's constitution-conditioned teacher (pass that teacher's logits).
"""
from __future__ import annotations

from typing import Optional

import torch

from pyopd.losses._common import (
    AGG_MODES,
    aggregate_loss,
    as_mask,
    check_2d,
    check_like,
    check_number,
    check_rows,
    masked_mean,
    to_floats,
    token_stats,
)

__all__ = ["kl_coefficients", "reverse_kl_loss", "reverse_kl_loss_from_logits"]


def reverse_kl_loss(
    kl: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    weight: Optional[torch.Tensor] = None,
    keep: Optional[torch.Tensor] = None,
    agg: str = "token-mean",
    denominator: Optional[float] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """agg(weight * kl) over valid positions of kept rollouts.

    Args:
        kl: [B, T] per-token KL(p || q) with grad w.r.t. the student (e.g.
            `pyopd.reverse_kl(...).kl`).
        mask: [B, T] response mask; None = all valid.
        weight: [B, T] token weights (detached here), e.g. FiRe-OPD's; None = 1.
        keep: [B] bool rollout filter; dropped rollouts leave the loss entirely.
        agg, denominator: see `aggregate_loss`.

    Metrics: loss, kl_mean (unweighted, over the positions that count),
    weight_mean/min/max (with weights), num_tokens.
    """
    loss, m = _weighted_kl(kl, mask, weight, keep, agg, denominator)
    metrics: dict = {"kl_mean": masked_mean(kl.detach(), m)}
    if weight is not None:
        metrics.update(token_stats(weight, m, "weight"))
    metrics["num_tokens"] = m.sum()
    metrics["loss"] = loss.detach()
    return loss, to_floats(metrics)


def _weighted_kl(kl, mask, weight, keep, agg, denominator) -> tuple[torch.Tensor, torch.Tensor]:
    """`reverse_kl_loss` without its metrics: (loss, the [B, T] mask of the positions that count)."""
    check_2d("kl", kl)
    B = kl.shape[0]
    m = as_mask(mask, kl, "kl")
    if keep is not None:
        check_rows("keep", keep, B, kl.device, kind="bool")
        m = m & keep.view(B, 1)
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    if denominator is not None:
        denominator = check_number("denominator", denominator, lo=0.0, lo_open=True)
    per_token = kl
    if weight is not None:
        check_like("weight", weight, kl, "kl")
        per_token = weight.detach().to(kl.dtype) * kl
    return aggregate_loss(per_token, m, agg, denominator=denominator), m


def kl_coefficients(
    mask: torch.Tensor,
    *,
    weight: Optional[torch.Tensor] = None,
    keep: Optional[torch.Tensor] = None,
    agg: str = "token-mean",
    denominator: Optional[float] = None,
) -> torch.Tensor:
    """[B, T] coefficients c with ``reverse_kl_loss(kl, mask, ...) == (c * kl).sum()`` for every kl.

    The loss is linear in the per-token KL, so its gradient w.r.t. the KL does
    not depend on the KL: it is taken here, once, through the loss of
    `reverse_kl_loss` itself (no second copy of the aggregation rules; its
    metrics, which wait for the device, are not computed). A fused op that computes
    the gradient in its forward pass (`pyopd.fused_linear_reverse_kl_loss`)
    needs these up front. Zero at positions outside the loss.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        got = f"{mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) \
            else type(mask).__name__
        raise TypeError(f"mask must be a [B, T] bool tensor, got {got}")
    with torch.enable_grad():
        probe = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device, requires_grad=True)
        w = None if weight is None else weight.detach().to(torch.float64)
        loss, _ = _weighted_kl(probe, mask, w, keep, agg, denominator)
        (coef,) = torch.autograd.grad(loss, probe, allow_unused=True)
    return torch.zeros_like(probe) if coef is None else coef


def _fused_reverse_kl():
    # The one indirection to the fused vocabulary kernel; no fallback: a
    # missing kernel is an error, never a silent switch to the slow reference.
    from pyopd.ops import reverse_kl

    return reverse_kl


def reverse_kl_loss_from_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    tokens: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    weight: Optional[torch.Tensor] = None,
    keep: Optional[torch.Tensor] = None,
    agg: str = "token-mean",
    denominator: Optional[float] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """`reverse_kl_loss` on the fused kernel's KL of [B, T, V] student / [B, T, Vt] teacher logits.

    Positions outside `mask` (and of dropped rollouts) are masked in the kernel
    too, so they cost no vocabulary traffic. Adds student_entropy_mean and
    teacher_entropy_mean to the metrics.
    """
    if not isinstance(student_logits, torch.Tensor) or student_logits.dim() != 3:
        raise ValueError("student_logits must be a tensor of shape (batch, seqlen, vocab)")
    B, T = student_logits.shape[:2]
    check_number("temperature", temperature, lo=0.0, lo_open=True)
    m = as_mask(mask, student_logits[..., 0], "student_logits[..., 0]")
    if keep is not None:
        check_rows("keep", keep, B, student_logits.device, kind="bool")
        m = m & keep.view(B, 1)
    sig = _fused_reverse_kl()(student_logits, teacher_logits, tokens, mask=m, temperature=temperature)
    loss, metrics = reverse_kl_loss(sig.kl, m, weight=weight, agg=agg, denominator=denominator)
    extra = to_floats({
        "student_entropy_mean": masked_mean(sig.student_entropy.detach(), m),
        "teacher_entropy_mean": masked_mean(sig.teacher_entropy.detach(), m),
    })
    metrics.update(extra)
    return loss, metrics
