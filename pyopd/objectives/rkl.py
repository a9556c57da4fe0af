"""The analytic full-vocabulary reverse KL(p || q), differentiated directly (fused kernel).

'rkl' weights every response token 1; 'fire-rkl' applies FiRe-OPD's filter and
token weights to the same exact KL.
"""
from __future__ import annotations

from pyopd.losses import reverse_kl_loss_from_logits
from pyopd.objectives.base import MicroBatch, Objective, ScoredBatch, Signals, register
from pyopd.objectives.fire import fire_signals


@register
class ReverseKL(Objective):
    name = "rkl"
    summary = "exact full-vocabulary reverse KL to the teacher (no sampling estimator)"
    needs_teacher_logits = True
    options = ("agg",)

    def loss(self, micro: MicroBatch):
        keep = micro.signals.get("keep")
        weight = micro.signals.get("weight")
        return reverse_kl_loss_from_logits(
            micro.logits, micro.teacher_logits(), micro.mask, tokens=micro.tokens,
            temperature=micro.temperature, weight=weight, keep=keep, agg=self.cfg.agg,
            denominator=micro.denominator)


@register
class FiReReverseKL(ReverseKL):
    name = "fire-rkl"
    summary = "exact reverse KL with FiRe-OPD's filter and token weights"
    options = ("percentile", "alpha", "beta", "weight_norm", "preset", "agg")

    def signals(self, batch: ScoredBatch) -> Signals:
        return fire_signals(self.cfg, batch)
