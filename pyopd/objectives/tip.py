"""TIP-style hard token selection: OPD on the top-rho tokens by student entropy OR divergence."""
from __future__ import annotations

from pyopd.losses import tip_loss, tip_token_mask
from pyopd.objectives.base import MicroBatch, Objective, ScoredBatch, Signals, register


@register
class TIP(Objective):
    name = "tip"
    summary = "OPD on the tokens TIP selects (top rho by entropy / teacher-student divergence)"
    options = ("tip_rho", "clip", "dual_clip", "agg")

    def signals(self, batch: ScoredBatch) -> Signals:
        from pyopd.ops.distributed import sync_group

        if sync_group(None, None) is not None:
            raise NotImplementedError("loss 'tip' ranks tokens over the whole batch and has no cross-rank "
                                      "version yet: run it in one process")
        # The selection ranks tokens over the whole batch: taken once, sliced per micro-batch.
        div = (batch.teacher.logprob - batch.old.logprob).abs()
        sel = tip_token_mask(batch.old.entropy, div, batch.mask, rho=self.cfg.tip_rho)
        return Signals(loss_mask=batch.mask & sel, rows={"selection": sel},
                       metrics={"selected_ratio": float(sel.sum() / batch.mask.sum().clamp(min=1))})

    def loss(self, micro: MicroBatch):
        return tip_loss(micro.logprob(), micro.old.logprob, micro.teacher.logprob, micro.mask,
                        selection=micro.signals["selection"], **self.ppo_kwargs(micro))
