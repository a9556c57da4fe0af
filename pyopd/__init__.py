"""pyopd: fused kernels and thin trainers for on-policy distillation."""
from __future__ import annotations

from pyopd import _C

__version__: str = _C.build_info().get("version", "0.0.0")


def build_info() -> dict:
    """What the extension was compiled with: version, CPU ISA path, CUDA and its archs."""
    return dict(_C.build_info())


def cuda_available() -> bool:
    """True when the CUDA kernels were compiled in and a CUDA device is visible."""
    return bool(_C.build_info()["cuda"]) and _C.cuda_device_count() > 0


from pyopd.ops import (  # noqa: E402  (after _C is loaded)
    FireWeights,
    GroupAdvantages,
    ReverseKL,
    TokenStats,
    TrajectoryFilter,
    TrajectoryScores,
    fire_token_weights,
    fused_linear_reverse_kl,
    fused_linear_token_stats,
    group_advantages,
    reverse_kl,
    reverse_kl_backward,
    token_stats,
    trajectory_filter,
    trajectory_scores,
)
from pyopd import losses  # noqa: E402

__all__ = [
    "FireWeights",
    "GroupAdvantages",
    "ReverseKL",
    "TokenStats",
    "TrajectoryFilter",
    "TrajectoryScores",
    "build_info",
    "cuda_available",
    "fire_token_weights",
    "fused_linear_reverse_kl",
    "fused_linear_token_stats",
    "group_advantages",
    "losses",
    "reverse_kl",
    "reverse_kl_backward",
    "token_stats",
    "trajectory_filter",
    "trajectory_scores",
]
