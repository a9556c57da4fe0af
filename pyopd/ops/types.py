"""Result types of the pyopd ops and the filter's drop count.

A leaf module: the fast ops (`pyopd.ops.vocab`, `pyopd.ops.signals`) and the
pure-PyTorch references (`pyopd.ops.reference`, `pyopd.ops.signals_reference`)
both import from here, so neither side depends on the other.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "FireWeights",
    "GroupAdvantages",
    "ReverseKL",
    "TokenStats",
    "TrajectoryFilter",
    "TrajectoryScores",
    "num_to_drop",
]


class TokenStats(NamedTuple):
    """Per-token statistics of one model's distribution p = softmax(logits / T).

    Every field is shaped like the leading dims of the logits ([N] or [B, T]).
    """

    logprob: torch.Tensor  # log p(y); 0 where tokens is None or the row is masked
    entropy: torch.Tensor  # H(p) = -sum_j p_j log p_j
    lse: torch.Tensor  # logsumexp(logits / T)


class ReverseKL(NamedTuple):
    """Per-token signals of student p = softmax(s / T) vs teacher q = softmax(t / T)."""

    kl: torch.Tensor  # KL(p || q) = sum_j p_j (log p_j - log q_j)
    student_entropy: torch.Tensor
    teacher_entropy: torch.Tensor
    student_logprob: torch.Tensor  # log p(y)
    teacher_logprob: torch.Tensor  # log q(y)
    student_lse: torch.Tensor
    teacher_lse: torch.Tensor


class TrajectoryScores(NamedTuple):
    """Per-rollout summaries of [B, T] per-token signals and the FiRe-OPD filter.

    B rollouts, K teachers (K = 1 without `teacher_index`). Means are over the
    valid (mask) positions of the row and 0 for a row with none, or when the
    signal was not given.
    """

    score: torch.Tensor  # [B] S_i = mean teacher log-prob (length-normalised)
    keep: torch.Tensor  # [B] bool: length > 0 and (nothing to drop or S_i >= threshold)
    threshold: torch.Tensor  # [K] float64: -inf when nothing is dropped, +inf when all are
    length: torch.Tensor  # [B] int64 number of valid positions
    mean_kl: torch.Tensor  # [B]
    mean_teacher_entropy: torch.Tensor  # [B]
    mean_student_entropy: torch.Tensor  # [B]
    num_scored: torch.Tensor  # [K] int64 non-empty rollouts the threshold was taken over (all ranks)
    num_dropped: torch.Tensor  # [K] int64 k = floor(p * num_scored / 100), the target drop count


class TrajectoryFilter(NamedTuple):
    """The FiRe-OPD rollout filter alone (see `pyopd.trajectory_filter`)."""

    keep: torch.Tensor  # [B] bool
    threshold: torch.Tensor  # [K] float64
    num_scored: torch.Tensor  # [K] int64
    num_dropped: torch.Tensor  # [K] int64


class FireWeights(NamedTuple):
    """FiRe-OPD soft token weights (detached)."""

    weight: torch.Tensor  # [B, T]; 0 at masked positions and on dropped rollouts
    max_teacher_entropy: torch.Tensor  # [K] the H_t normaliser of each teacher (all ranks)
    max_student_entropy: torch.Tensor  # [] the H_s normaliser (all ranks)


class GroupAdvantages(NamedTuple):
    """COPSD dense group advantages; per-row fields describe the row's group."""

    advantage: torch.Tensor  # [B, T]; 0 at masked positions
    reward_mean: torch.Tensor  # [B] float64 mean reward r over the row's valid positions
    group_mean: torch.Tensor  # [B] float64 pooled mean of r over the group's valid positions
    group_std: torch.Tensor  # [B] float64 pooled population std (ddof 0)
    group_count: torch.Tensor  # [B] int64 valid positions pooled in the group


# Slack against rounding in k = floor(p * n / 100): p * n / 100 computed in
# float64 is within a few ulp of the exact value, so an exact integer must
# not fall to the integer below.
FLOOR_SLACK = 1e-9


def num_to_drop(p: float, n: torch.Tensor) -> torch.Tensor:
    """k = floor(p * n / 100) for an int tensor of population sizes n (any shape)."""
    return torch.floor(n.to(torch.float64) * (float(p) / 100.0) + FLOOR_SLACK).to(torch.int64)
