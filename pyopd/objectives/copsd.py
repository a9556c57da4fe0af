"""COPSD: dense group advantage of the constitution-conditioned teacher's reward, PPO + k3 KL.

r_t = clip(log q - log p_old, low, high) + bonus; A_t = (r_t - group mean) / (group std + eps)
over all valid tokens of the rollouts of one prompt (taken once over the whole
batch); loss = PPO(A) + kl_coef * k3(p || initial student).
"""
from __future__ import annotations

from pyopd.losses import copsd_loss, copsd_signals
from pyopd.objectives.base import MicroBatch, Objective, ScoredBatch, Signals, register


@register
class COPSD(Objective):
    name = "copsd"
    summary = "COPSD: group-normalised teacher reward, PPO with dual clip, k3 KL to the initial student"
    needs_reference = True
    options = ("reward_clip", "reward_bonus", "kl_coef", "preset", "clip", "dual_clip", "agg")

    def signals(self, batch: ScoredBatch) -> Signals:
        adv, metrics = copsd_signals(batch.teacher.logprob, batch.old.logprob, batch.mask, batch.group,
                                     reward_clip=self.cfg.reward_clip, reward_bonus=self.cfg.reward_bonus,
                                     preset=self.cfg.preset)
        return Signals(loss_mask=batch.mask, rows={"advantage": adv}, metrics=metrics)

    def loss(self, micro: MicroBatch):
        ref = micro.reference.logprob if micro.reference is not None else None
        return copsd_loss(micro.logprob(), micro.old.logprob, None, micro.mask,
                          advantages=micro.signals["advantage"], ref_logprob=ref,
                          kl_coef=self.cfg.kl_coef, preset=self.cfg.preset, **self.ppo_kwargs(micro))
