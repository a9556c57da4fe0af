"""Autograd ops over the pyopd kernels, with their pure-PyTorch references."""
from __future__ import annotations

from pyopd.ops.reference import ReverseKL, TokenStats, reverse_kl_ref, token_stats_ref
from pyopd.ops.vocab import reverse_kl, reverse_kl_backward, token_stats

__all__ = [
    "ReverseKL",
    "TokenStats",
    "reverse_kl",
    "reverse_kl_backward",
    "reverse_kl_ref",
    "token_stats",
    "token_stats_ref",
]
