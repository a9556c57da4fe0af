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


# The ops, losses and the rest import torch: load them on first use, so that
# `import pyopd.cli` (and `pyopd -h`) stays fast and torch-free.
_OPS = (
    "FireWeights", "GroupAdvantages", "ReverseKL", "TokenStats", "TrajectoryFilter", "TrajectoryScores",
    "fire_token_weights", "fused_linear_reverse_kl", "fused_linear_reverse_kl_loss",
    "fused_linear_token_stats", "group_advantages",
    "reverse_kl", "reverse_kl_backward", "token_stats", "trajectory_filter", "trajectory_scores",
)
_SUBMODULES = ("losses", "objectives", "ops", "presets", "trainers", "config")


def __getattr__(name: str):
    import importlib

    if name in _OPS:
        value = getattr(importlib.import_module("pyopd.ops"), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"pyopd.{name}")
    else:
        raise AttributeError(f"module 'pyopd' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_OPS) | set(_SUBMODULES))


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
    "fused_linear_reverse_kl_loss",
    "fused_linear_token_stats",
    "group_advantages",
    "losses",
    "reverse_kl",
    "reverse_kl_backward",
    "token_stats",
    "trajectory_filter",
    "trajectory_scores",
]
