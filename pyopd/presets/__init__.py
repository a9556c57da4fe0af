"""Presets: alternative definitions of the batch-level signals, selectable by name.

`paper` is pyopd's default (the functions in `pyopd.losses` and `pyopd.ops`);
`released` (`pyopd.presets.released`) reproduces the official FiRe-OPD and COPSD
code. docs/presets.md lists every difference.
"""
from __future__ import annotations

from pyopd.config import PRESETS  # one home for the choices
from pyopd.presets.released import (
    ReleasedFireSignals,
    aggregate_released,
    copsd_loss_released,
    copsd_rewards_released,
    fire_opd_loss_released,
    fire_signals_released,
    group_advantages_released,
    k3_kl_released,
    micro_batch_ids,
    opd_loss_released,
    ppo_token_loss_released,
    released_denominator,
    rollout_is_weights_released,
)

__all__ = [
    "PRESETS",
    "ReleasedFireSignals",
    "aggregate_released",
    "copsd_loss_released",
    "copsd_rewards_released",
    "fire_opd_loss_released",
    "fire_signals_released",
    "group_advantages_released",
    "k3_kl_released",
    "micro_batch_ids",
    "opd_loss_released",
    "ppo_token_loss_released",
    "released_denominator",
    "rollout_is_weights_released",
]
