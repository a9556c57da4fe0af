"""pyopd: fused kernels and thin trainers for on-policy distillation."""
from __future__ import annotations

from typing import NamedTuple

from pyopd import _C

__version__: str = _C.build_info().get("version", "0.0.0")


def build_info() -> dict:
    """What the extension was compiled with: version, CPU ISA path, CUDA and its archs."""
    return dict(_C.build_info())


def cuda_available() -> bool:
    """True when the CUDA kernels were compiled in and a CUDA device is visible.

    `cuda_status()` says why not when this is False.
    """
    return bool(_C.build_info()["cuda"]) and _C.cuda_device_count() > 0


class CudaStatus(NamedTuple):
    """Whether pyopd's CUDA kernels can run here (see `cuda_status`)."""

    available: bool
    reason: str  # "" when available; else why not (no driver, old driver, no device, CPU build)
    driver_version: int  # CUDA version the driver supports, 1000 * major + 10 * minor; 0 if none
    runtime_version: int  # CUDA runtime linked into the build (e.g. 13000); 0 for a CPU build


def cuda_status() -> CudaStatus:
    """Can the CUDA kernels run, and if not, why: e.g. no NVIDIA driver, or a
    driver older than the CUDA runtime linked into this build (13.0 needs >= 580)."""
    available, reason, driver, runtime = _C.cuda_status()
    return CudaStatus(bool(available), str(reason), int(driver), int(runtime))


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
    "cuda_status",
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
