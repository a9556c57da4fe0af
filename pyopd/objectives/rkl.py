"""The analytic full-vocabulary reverse KL(p || q), differentiated directly (fused kernel).

'rkl' weights every response token 1; 'fire-rkl' applies FiRe-OPD's filter and
token weights to the same exact KL.
"""
from __future__ import annotations

import torch

import pyopd
from pyopd.losses import kl_coefficients, reverse_kl_loss, reverse_kl_loss_from_logits
from pyopd.losses._common import masked_mean, to_floats
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
        parts = micro.teacher_parts()
        if parts is None:  # materialised logits of both models
            return reverse_kl_loss_from_logits(
                micro.student_logits(), micro.teacher_logits(), micro.mask, tokens=micro.tokens,
                temperature=micro.temperature, weight=weight, keep=keep, agg=self.cfg.agg,
                denominator=micro.denominator)
        # fused linear: from the hidden states and the heads, no [tokens, vocab] tensor at all
        mask = micro.mask if keep is None else micro.mask & keep[:, None]
        b, t = micro.tokens.shape
        kl = torch.zeros(b, t, dtype=torch.float32, device=micro.tokens.device)
        hs, ht = torch.zeros_like(kl), torch.zeros_like(kl)
        if micro.grad_in_forward:
            # The loss is linear in the KL: its coefficients are known now, so each chunk's
            # gradient is taken while its logits exist (4 matmuls, no recompute).
            coef = kl_coefficients(mask, weight=weight, agg=self.cfg.agg, denominator=micro.denominator)
            total = None
            for idx, t_hidden, t_head in parts:
                part, r = pyopd.fused_linear_reverse_kl_loss(
                    micro.hidden[idx], micro.head.weight, t_hidden, t_head.weight,
                    coef[idx].to(torch.float32), micro.tokens[idx], mask=mask[idx],
                    temperature=micro.temperature, student_bias=micro.head.bias, teacher_bias=t_head.bias)
                total = part if total is None else total + part
                kl[idx] = r.kl.float()
                hs[idx], ht[idx] = r.student_entropy.float(), r.teacher_entropy.float()
            _, metrics = reverse_kl_loss(kl, mask, weight=weight, agg=self.cfg.agg,
                                         denominator=micro.denominator)  # the same metrics
            loss = total.to(torch.float32)
            metrics["loss"] = float(loss.detach())
        else:
            for idx, t_hidden, t_head in parts:
                r = pyopd.fused_linear_reverse_kl(
                    micro.hidden[idx], micro.head.weight, t_hidden, t_head.weight, micro.tokens[idx],
                    mask=mask[idx], temperature=micro.temperature, student_bias=micro.head.bias,
                    teacher_bias=t_head.bias)
                kl = kl.index_put((idx,), r.kl.to(kl.dtype))
                hs[idx], ht[idx] = r.student_entropy.detach().float(), r.teacher_entropy.detach().float()
            loss, metrics = reverse_kl_loss(kl, mask, weight=weight, agg=self.cfg.agg,
                                            denominator=micro.denominator)
        metrics.update(to_floats({"student_entropy_mean": masked_mean(hs, mask),
                                  "teacher_entropy_mean": masked_mean(ht, mask)}))
        return loss, metrics


@register
class FiReReverseKL(ReverseKL):
    name = "fire-rkl"
    summary = "exact reverse KL with FiRe-OPD's filter and token weights"
    options = ("percentile", "alpha", "beta", "weight_norm", "preset", "agg")

    def signals(self, batch: ScoredBatch) -> Signals:
        return fire_signals(self.cfg, batch)
