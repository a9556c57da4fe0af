"""OPD / FiRe-OPD / COPSD losses: plain functions over [B, T] per-token tensors.

Each returns `(loss, metrics)`: a scalar tensor to backpropagate and a dict of
plain floats to log. They run equally from the built-in trainers, TRL or verl.
"""
from __future__ import annotations

from pyopd.losses._common import AGG_MODES, PRESETS, aggregate_loss
from pyopd.losses.copsd import copsd_loss, copsd_signals, k3_kl
from pyopd.losses.fire import FireSignals, fire_opd_loss, fire_opd_signals
from pyopd.losses.opd import exopd_loss, opd_loss, ppo_policy_loss, tip_loss, tip_token_mask
from pyopd.losses.reverse_kl import kl_coefficients, reverse_kl_loss, reverse_kl_loss_from_logits

__all__ = [
    "AGG_MODES",
    "PRESETS",
    "FireSignals",
    "aggregate_loss",
    "copsd_loss",
    "copsd_signals",
    "exopd_loss",
    "fire_opd_loss",
    "fire_opd_signals",
    "k3_kl",
    "opd_loss",
    "ppo_policy_loss",
    "kl_coefficients",
    "reverse_kl_loss",
    "reverse_kl_loss_from_logits",
    "tip_loss",
    "tip_token_mask",
]
