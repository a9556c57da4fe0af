"""Vanilla on-policy distillation: A_t = log q(y_t) - log p_old(y_t), PPO clipped surrogate."""
from __future__ import annotations

from pyopd.losses import opd_loss
from pyopd.objectives.base import MicroBatch, Objective, register


@register
class OPD(Objective):
    name = "opd"
    summary = "vanilla OPD: sampled-token reverse-KL reward, PPO surrogate"
    options = ("clip", "dual_clip", "agg")

    def loss(self, micro: MicroBatch):
        return opd_loss(micro.logprob(), micro.old.logprob, micro.teacher.logprob, micro.mask,
                        **self.ppo_kwargs(micro))
