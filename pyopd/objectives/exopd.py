"""ExOPD / G-OPD reward scaling against the frozen initial student r.

A_t = -[(log p_old - log r) - lambda (log q - log r)]; lambda = 1 is vanilla OPD.
"""
from __future__ import annotations

from pyopd.losses import exopd_loss
from pyopd.objectives.base import MicroBatch, Objective, register


@register
class ExOPD(Objective):
    name = "exopd"
    summary = "ExOPD: OPD reward extrapolated past the teacher (reference: the initial student)"
    needs_reference = True
    options = ("exopd_lambda", "clip", "dual_clip", "agg")

    def loss(self, micro: MicroBatch):
        return exopd_loss(micro.logprob(), micro.old.logprob, micro.teacher.logprob,
                          micro.reference.logprob, micro.mask, lam=self.cfg.exopd_lambda,
                          **self.ppo_kwargs(micro))
