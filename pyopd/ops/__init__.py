"""Autograd ops over the pyopd kernels, with their pure-PyTorch references."""
from __future__ import annotations

from pyopd.ops.reference import ReverseKL, TokenStats, reverse_kl_ref, token_stats_ref
from pyopd.ops.signals import (
    FireWeights,
    GroupAdvantages,
    TrajectoryFilter,
    TrajectoryScores,
    fire_token_weights,
    group_advantages,
    trajectory_filter,
    trajectory_scores,
)
from pyopd.ops.signals_reference import (
    fire_token_weights_ref,
    group_advantages_ref,
    trajectory_scores_ref,
)
from pyopd.ops.vocab import reverse_kl, reverse_kl_backward, token_stats
from pyopd.ops.fused_linear import (
    fused_linear_reverse_kl,
    fused_linear_reverse_kl_ref,
    fused_linear_token_stats,
    fused_linear_token_stats_ref,
)
from pyopd.ops.fused_linear_loss import fused_linear_reverse_kl_loss

__all__ = [
    "FireWeights",
    "GroupAdvantages",
    "ReverseKL",
    "TokenStats",
    "TrajectoryFilter",
    "TrajectoryScores",
    "fire_token_weights",
    "fire_token_weights_ref",
    "fused_linear_reverse_kl",
    "fused_linear_reverse_kl_loss",
    "fused_linear_reverse_kl_ref",
    "fused_linear_token_stats",
    "fused_linear_token_stats_ref",
    "group_advantages",
    "group_advantages_ref",
    "reverse_kl",
    "reverse_kl_backward",
    "reverse_kl_ref",
    "token_stats",
    "token_stats_ref",
    "trajectory_filter",
    "trajectory_scores",
    "trajectory_scores_ref",
]
