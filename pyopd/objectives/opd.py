"""Vanilla on-policy distillation: A_t = log q(y_t) - log p_old(y_t), PPO clipped surrogate."""
from __future__ import annotations

from pyopd.losses import opd_loss
from pyopd.objectives.base import MicroBatch, Objective, register

# The authors' OPD baseline (released code) runs PPO with a dual clip of 3. Its
# rollout importance weights correct for a separate inference engine; pyopd's
# trainer samples and scores with the same model, so they are exactly 1 here.
RELEASED_DUAL_CLIP = 3.0


@register
class OPD(Objective):
    name = "opd"
    summary = "vanilla OPD: sampled-token reverse-KL reward, PPO surrogate"
    options = ("clip", "dual_clip", "agg")

    def loss(self, micro: MicroBatch):
        kw = self.ppo_kwargs(micro)
        if self.cfg.preset == "released" and kw["dual_clip"] is None:
            kw["dual_clip"] = RELEASED_DUAL_CLIP
        return opd_loss(micro.logprob(), micro.old.logprob, micro.teacher.logprob, micro.mask, **kw)
