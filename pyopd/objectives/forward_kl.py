"""A minimal worked example of an objective: forward KL(q || p) from the student's own samples.

With samples y ~ p_old, grad KL(q || p) = -E_q[grad log p(y)] = -E_{p_old}[(q/p_old)(y) grad log p(y)],
so the per-token loss is -w_t log p(y_t) with the importance weight
w_t = min(q(y_t) / p_old(y_t), cap), detached. This file is the whole method:
it registers itself, and the trainer and `pyopd fire-opd --loss forward-kl`
find it by name (see tests/test_objectives.py).
"""
from __future__ import annotations

import torch

from pyopd.losses import aggregate_loss
from pyopd.objectives.base import MicroBatch, Objective, register

WEIGHT_CAP = 10.0  # bounds the importance weight's variance


@register
class ForwardKL(Objective):
    name = "forward-kl"
    summary = "example: importance-weighted forward KL(q || p) on the sampled tokens"
    options = ("agg",)

    def loss(self, micro: MicroBatch):
        logprob = micro.logprob()
        w = torch.exp(micro.teacher.logprob - micro.old.logprob).clamp(max=WEIGHT_CAP).detach()
        loss = aggregate_loss(-w * logprob, micro.mask, self.cfg.agg, denominator=micro.denominator)
        return loss, {"loss": float(loss.detach()), "is_weight_mean": float(w[micro.mask].mean())
                      if micro.mask.any() else 0.0}
