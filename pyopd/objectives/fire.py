"""FiRe-OPD: filter the weakest rollouts, then reweight tokens (sampled-token OPD reward)."""
from __future__ import annotations

from pyopd.losses import fire_opd_loss, fire_opd_signals
from pyopd.objectives.base import MicroBatch, Objective, ScoredBatch, Signals, micro_ids, register


def fire_signals(cfg, batch: ScoredBatch) -> Signals:
    """The filter and token weights of the whole rollout batch (shared by 'fire' and 'fire-rkl').

    preset 'released' takes them per micro-batch of the trainer's partition, as
    the released code does (docs/presets.md).
    """
    multi = batch.num_teachers > 1
    released = cfg.preset == "released"
    fs = fire_opd_signals(
        batch.teacher.logprob, batch.mask, teacher_entropy=batch.teacher.entropy,
        student_entropy=batch.old.entropy, p=cfg.percentile, alpha=cfg.alpha, beta=cfg.beta,
        normalize=cfg.weight_norm, teacher_index=batch.teacher_index if multi else None,
        num_teachers=batch.num_teachers if multi else None, preset=cfg.preset,
        micro_batch=micro_ids(batch.size, cfg) if released else None)
    return Signals(loss_mask=batch.mask & fs.keep[:, None], rows={"keep": fs.keep, "weight": fs.weight},
                   metrics=fs.metrics)


@register
class FiReOPD(Objective):
    name = "fire"
    summary = "FiRe-OPD: rollout filter + teacher-confidence / student-confusion token weights"
    options = ("percentile", "alpha", "beta", "weight_norm", "preset", "clip", "dual_clip", "agg")

    def signals(self, batch: ScoredBatch) -> Signals:
        return fire_signals(self.cfg, batch)

    def loss(self, micro: MicroBatch):
        return fire_opd_loss(micro.logprob(), micro.old.logprob, micro.teacher.logprob, micro.mask,
                             keep=micro.signals["keep"], weight=micro.signals["weight"],
                             **self.ppo_kwargs(micro))
