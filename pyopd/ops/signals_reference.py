"""Pure-PyTorch references of the trajectory / token-weight / group-advantage kernels.

These compute, with plain whole-batch tensor ops, exactly what
`pyopd.trajectory_scores`, `pyopd.fire_token_weights` and
`pyopd.group_advantages` compute (see those for the documented rules). They
are the ground truth of the tests (run them in float64) and the eager
baseline of the benchmarks. They see one process's batch only: no
`torch.distributed`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

# The result types and the drop count live in a leaf module shared with the
# fast path; re-exported here, where they used to be defined.
from pyopd.ops.types import (
    FLOOR_SLACK,
    FireWeights,
    GroupAdvantages,
    TrajectoryFilter,
    TrajectoryScores,
    num_to_drop,
)

__all__ = [
    "FireWeights",
    "GroupAdvantages",
    "TrajectoryFilter",
    "TrajectoryScores",
    "filter_threshold_ref",
    "fire_token_weights_ref",
    "group_advantages_ref",
    "num_to_drop",
    "trajectory_scores_ref",
]


def _bool_mask(mask: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    return mask if mask.dtype == torch.bool else mask != 0


def _masked_mean_rows(x: Optional[torch.Tensor], valid: torch.Tensor, length: torch.Tensor, dtype):
    if x is None:
        return torch.zeros(valid.shape[0], dtype=dtype, device=valid.device)
    s = torch.where(valid, x.to(dtype), torch.zeros((), dtype=dtype, device=x.device)).sum(-1)
    return torch.where(length > 0, s / length.clamp(min=1).to(dtype), torch.zeros_like(s))


def filter_threshold_ref(
    score: torch.Tensor, nonempty: torch.Tensor, teacher: torch.Tensor, num_teachers: int, p: float
):
    """The documented quantile rule, one teacher at a time, with a Python loop.

    Returns (threshold [K] float64, num_scored [K], num_dropped [K]).
    """
    thr, ns, ks = [], [], []
    for k in range(num_teachers):
        s = score[nonempty & (teacher == k)].to(torch.float64)
        n = int(s.numel())
        drop = int(math.floor(n * (float(p) / 100.0) + FLOOR_SLACK))
        if drop == 0:
            thr.append(-math.inf)
        elif drop >= n:
            thr.append(math.inf)
        else:
            thr.append(float(torch.sort(s).values[drop]))
        ns.append(n)
        ks.append(drop)
    dev = score.device
    return (
        torch.tensor(thr, dtype=torch.float64, device=dev),
        torch.tensor(ns, dtype=torch.int64, device=dev),
        torch.tensor(ks, dtype=torch.int64, device=dev),
    )


def trajectory_scores_ref(
    teacher_logprob: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    kl: Optional[torch.Tensor] = None,
    teacher_entropy: Optional[torch.Tensor] = None,
    student_entropy: Optional[torch.Tensor] = None,
    p: float = 20.0,
    teacher_index: Optional[torch.Tensor] = None,
    num_teachers: Optional[int] = None,
) -> TrajectoryScores:
    """Reference of `pyopd.trajectory_scores` (one process; see it for the rules)."""
    lq = teacher_logprob.detach()
    dtype = torch.float64 if lq.dtype == torch.float64 else torch.float32
    valid = _bool_mask(mask, lq)
    length = valid.sum(-1)
    score = _masked_mean_rows(lq, valid, length, dtype)
    B = lq.shape[0]
    if teacher_index is None:
        teacher = torch.zeros(B, dtype=torch.int64, device=lq.device)
        K = 1
    else:
        teacher = teacher_index.to(torch.int64)
        K = num_teachers if num_teachers is not None else (int(teacher.max()) + 1 if B else 1)
    nonempty = length > 0
    thr, ns, ks = filter_threshold_ref(score, nonempty, teacher, K, p)
    keep = nonempty & ((ks[teacher] == 0) | (score.to(torch.float64) >= thr[teacher]))
    return TrajectoryScores(
        score=score,
        keep=keep,
        threshold=thr,
        length=length,
        mean_kl=_masked_mean_rows(kl, valid, length, dtype),
        mean_teacher_entropy=_masked_mean_rows(teacher_entropy, valid, length, dtype),
        mean_student_entropy=_masked_mean_rows(student_entropy, valid, length, dtype),
        num_scored=ns,
        num_dropped=ks,
    )


def _safe_ratio(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # x / m, taken as 0 where m == 0 (every valid x is then 0 too); NaN m propagates.
    return torch.where(m <= 0, torch.zeros_like(x), x / torch.where(m <= 0, torch.ones_like(m), m))


def fire_token_weights_ref(
    teacher_entropy: torch.Tensor,
    student_entropy: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    keep: Optional[torch.Tensor] = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    normalize: str = "trajectory",
    teacher_index: Optional[torch.Tensor] = None,
    num_teachers: Optional[int] = None,
) -> FireWeights:
    """Reference of `pyopd.fire_token_weights` (one process; see it for the rules)."""
    ht = teacher_entropy.detach()
    hs = student_entropy.detach()
    dtype = torch.float64 if ht.dtype == torch.float64 else torch.float32
    ht, hs = ht.to(dtype), hs.to(dtype)
    B = ht.shape[0]
    valid = _bool_mask(mask, ht)
    if keep is not None:
        valid = valid & keep.view(B, 1)
    zero = torch.zeros((), dtype=dtype, device=ht.device)
    teacher = (
        torch.zeros(B, dtype=torch.int64, device=ht.device)
        if teacher_index is None
        else teacher_index.to(torch.int64)
    )
    K = 1 if teacher_index is None else (num_teachers if num_teachers is not None else int(teacher.max()) + 1)
    # Maxima over valid positions of kept rollouts, floored at 0 (clamp and amax
    # keep NaN); H_t per teacher, H_s over the batch.
    T = ht.shape[1]
    row_t = torch.where(valid, ht, zero).amax(-1) if T else torch.zeros(B, dtype=dtype, device=ht.device)
    row_s = torch.where(valid, hs, zero).amax(-1) if T else torch.zeros(B, dtype=dtype, device=ht.device)
    max_t = torch.stack([torch.clamp(row_t[teacher == k].amax(), min=0) if (teacher == k).any() else zero
                         for k in range(K)])
    max_s = torch.clamp(row_s.amax(), min=0) if B else zero
    c_t = torch.clamp(1 - _safe_ratio(ht, max_t[teacher].view(B, 1)), 0, 1)
    c_s = torch.clamp(_safe_ratio(hs, max_s), 0, 1)
    w = torch.where(valid, (1 + alpha * c_t) * (1 + beta * c_s), zero)
    n = valid.sum(-1, keepdim=True)
    if normalize == "trajectory":
        row_mean = w.sum(-1, keepdim=True) / n.clamp(min=1)
        w = torch.where(n > 0, w / torch.where(n > 0, row_mean, torch.ones_like(row_mean)), w)
    elif normalize == "batch":
        total = n.sum()
        if total > 0:
            w = w / (w.sum() / total)
    else:
        raise ValueError(f"normalize must be 'trajectory' or 'batch', got {normalize!r}")
    return FireWeights(weight=w, max_teacher_entropy=max_t, max_student_entropy=max_s)


def group_advantages_ref(
    teacher_logprob: torch.Tensor,
    student_logprob: torch.Tensor,
    mask: Optional[torch.Tensor],
    group_index: torch.Tensor,
    *,
    clip_low: float = -3.0,
    clip_high: float = 5.0,
    bonus: float = 0.02,
    eps: float = 1e-6,
) -> GroupAdvantages:
    """Reference of `pyopd.group_advantages` (one process; see it for the rules).

    Textbook two-pass mean / variance over the pooled tokens of each group,
    computed in the dtype of the inputs (float64 in the tests).
    """
    lq = teacher_logprob.detach()
    dtype = torch.float64 if lq.dtype == torch.float64 else torch.float32
    valid = _bool_mask(mask, lq)
    zero = torch.zeros((), dtype=dtype, device=lq.device)
    r = torch.clamp(lq.to(dtype) - student_logprob.detach().to(dtype), clip_low, clip_high) + bonus
    _, inv = torch.unique(group_index, return_inverse=True)
    G = int(inv.max()) + 1 if inv.numel() else 0
    length = valid.sum(-1)
    rv = torch.where(valid, r, zero)
    count_g = torch.zeros(G, dtype=torch.int64, device=lq.device).index_add_(0, inv, length)
    n_g = count_g.clamp(min=1).to(dtype)
    mean_g = torch.zeros(G, dtype=dtype, device=lq.device).index_add_(0, inv, rv.sum(-1)) / n_g
    dev = torch.where(valid, r - mean_g[inv].unsqueeze(-1), zero)
    var_g = torch.zeros(G, dtype=dtype, device=lq.device).index_add_(0, inv, (dev * dev).sum(-1)) / n_g
    std_g = var_g.sqrt()
    adv = torch.where(valid, dev / (std_g[inv].unsqueeze(-1) + eps), zero)
    return GroupAdvantages(
        advantage=adv,
        reward_mean=(rv.sum(-1) / length.clamp(min=1)).double(),
        group_mean=mean_g[inv].double(),
        group_std=std_g[inv].double(),
        group_count=count_g[inv],
    )
