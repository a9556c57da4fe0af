"""The on-policy distillation loop (vanilla OPD, FiRe-OPD, the analytic reverse KL, baselines).

Read it top to bottom in `OPDTrainer.train`: each step

1. samples `prompts_per_step` prompts and `n` student responses per prompt;
2. scores them without grad: the student's old log-probs, and each row's own
   teacher's log-probs and entropies (`pyopd.token_stats`, logits freed per
   micro-batch; multi-teacher rows are routed by name);
3. takes the batch-level signals (FiRe-OPD's filter and weights, ...) ONCE over
   the whole rollout batch, so micro-batching can never change them;
4. updates the student in `mini_batches` optimizer steps, each accumulating
   micro-batches whose loss shares the mini-batch's denominator;
5. logs metrics (JSONL + progress bar), evaluates, checkpoints.

Each step's randomness is derived from (seed, step) and the RNG states are
checkpointed, so a resumed run reproduces an uninterrupted one exactly.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch

import pyopd
from pyopd.trainers import checkpoint as ckpt_io
from pyopd.trainers.records import JsonlLog
from pyopd.trainers.rollout import Rollouts, Scores, layout, response_logits, sample_rollouts, score

LOSSES = ("opd", "fire", "rkl", "fire-rkl", "exopd", "tip", "copsd")


@dataclass
class OPDConfig:
    """Hyperparameters; defaults follow the FiRe-OPD paper where it gives one."""

    loss: str = "fire"              # one of LOSSES
    percentile: float = 20.0        # FiRe-OPD: drop rollouts below this percentile of S_i
    alpha: float = 1.0              # teacher-confidence weight
    beta: float = 1.0               # student-confusion weight
    weight_norm: str = "trajectory"  # "trajectory" (paper Eq. 8) or "batch" (released code)
    clip: float = 0.2               # PPO clip ratio
    dual_clip: Optional[float] = None
    agg: str = "token-mean"
    exopd_lambda: float = 1.25      # ExOPD / G-OPD reward scale (reference = initial student)
    tip_rho: float = 0.5            # TIP: fraction of tokens kept
    kl_coef: float = 0.005          # COPSD: k3 KL to the reference (initial) student
    reward_clip: tuple = (-3.0, 5.0)  # COPSD: per-token reward clip
    reward_bonus: float = 0.02      # COPSD: per-token reward bonus
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"   # "constant" or "cosine"
    max_grad_norm: float = 1.0
    steps: int = 40
    prompts_per_step: int = 16
    n: int = 4                      # responses per prompt
    micro_batch: int = 16
    mini_batches: int = 1           # optimizer steps per rollout batch
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    eval_every: int = 10
    save_every: int = 10
    keep_last: int = 2
    seed: int = 0
    out_dir: str = "runs/opd"

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not 0.0 <= self.percentile <= 100.0:
            raise ValueError(f"percentile must lie in [0, 100], got {self.percentile}")
        if self.weight_norm not in ("trajectory", "batch"):
            raise ValueError(f"weight_norm must be 'trajectory' or 'batch', got {self.weight_norm!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        for name in ("steps", "prompts_per_step", "n", "micro_batch", "mini_batches", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prompts_per_step * self.n < self.mini_batches:
            raise ValueError("mini_batches must not exceed prompts_per_step * n")
        for name in ("lr", "temperature", "clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


@dataclass
class PromptBatch:
    prompts: list[str]
    teachers: list[str]                   # the teacher name of each prompt
    teacher_prompts: Optional[list[str]] = None  # what the teacher sees (default: prompts)
    meta: list = field(default_factory=list)     # anything the caller wants back (e.g. Examples)


PromptSource = Callable[[int, int, random.Random], PromptBatch]
Evaluator = Callable[[torch.nn.Module], dict]
RolloutMetrics = Callable[[PromptBatch, Rollouts], dict]  # extra per-step diagnostics


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + 17) % (2**63)


class OPDTrainer:
    """On-policy distillation of ``student`` from one or several named teachers."""

    def __init__(self, cfg: OPDConfig, student, teachers: Mapping[str, torch.nn.Module], tokenizer,
                 prompts: PromptSource, evaluate: Optional[Evaluator] = None,
                 reference=None, log: Callable[[str], None] = print, progress: bool = True,
                 rollout_metrics: Optional[RolloutMetrics] = None) -> None:
        cfg.validate()
        if not teachers:
            raise ValueError("teachers must name at least one teacher model")
        v = student.get_output_embeddings().weight.shape[0]
        for name, t in teachers.items():
            vt = t.get_output_embeddings().weight.shape[0]
            if vt < v:
                raise ValueError(
                    f"teacher {name!r} has a vocabulary of {vt} < the student's {v}: the teacher must "
                    f"cover every student token id (same tokenizer, vocabulary padded at most)")
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("tokenizer needs pad_token_id and eos_token_id")
        self.cfg, self.student, self.teachers, self.tok = cfg, student, dict(teachers), tokenizer
        self.teacher_names = sorted(self.teachers)
        self.prompts, self.evaluate, self.log, self.progress = prompts, evaluate, log, progress
        self.rollout_metrics = rollout_metrics
        self.reference = reference  # frozen initial student: ExOPD's r, COPSD's KL anchor
        if cfg.loss == "exopd" and reference is None:
            raise ValueError("loss 'exopd' needs reference= (the frozen initial student)")
        if reference is not None:
            reference.eval().requires_grad_(False)
        for t in self.teachers.values():
            t.eval().requires_grad_(False)
        self.out_dir = Path(cfg.out_dir)
        self.opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.step = 0
        self.history: list[dict] = []

    # ------------------------------------------------------------------ schedule

    def _lr_factor(self, step: int) -> float:
        cfg = self.cfg
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            total = max(1, cfg.steps * cfg.mini_batches - cfg.warmup_steps)
            done = min(1.0, (step - cfg.warmup_steps) / total)
            return 0.5 * (1 + math.cos(math.pi * done))
        return 1.0

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        state = {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                 "history": self.history, "config": asdict(self.cfg)}
        return ckpt_io.save_checkpoint(self.out_dir, self.step, self.student, self.tok, state,
                                       keep_last=self.cfg.keep_last, log=self.log)

    def resume(self) -> Optional[Path]:
        """Load the newest checkpoint under out_dir that loads completely, if any; returns its path.

        Newer broken checkpoints are skipped with a log line; a directory whose
        checkpoints all fail raises ``checkpoint.CheckpointError`` (see `load_latest`).
        """
        found = ckpt_io.load_latest(self.out_dir, self.student, self.log,
                                    required=("optimizer", "scheduler"))
        if found is None:
            return None
        path, state = found
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        ckpt_io.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        self.log(f"[pyopd] resumed from {path} at step {self.step}")
        return path

    # ------------------------------------------------------------------ one step

    def _teacher_prompt_ids(self, batch: PromptBatch, ro: Rollouts) -> list[list[int]]:
        if batch.teacher_prompts is None:
            return ro.prompt_ids
        ids = [self.tok(p)["input_ids"] for p in batch.teacher_prompts]  # as the student prompt
        return [ids[g] for g in ro.group.tolist()]

    def rollout_and_score(self, batch: PromptBatch) -> dict:
        cfg = self.cfg
        ro = sample_rollouts(self.student, self.tok, batch.prompts, cfg.n,
                             max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             top_p=cfg.top_p)
        pad = self.tok.pad_token_id
        old = score(self.student, ro.prompt_ids, ro, pad, micro_batch=cfg.micro_batch)
        row_teacher = [batch.teachers[g] for g in ro.group.tolist()]
        unknown = sorted(set(row_teacher) - set(self.teachers))
        if unknown:
            raise ValueError(f"prompts name teachers {unknown} that were not given; have {self.teacher_names}")
        teacher_index = torch.tensor([self.teacher_names.index(t) for t in row_teacher])
        tprompt_ids = self._teacher_prompt_ids(batch, ro)
        teacher = Scores(torch.zeros_like(old.logprob), torch.zeros_like(old.entropy))
        for k, name in enumerate(self.teacher_names):
            rows = (teacher_index == k).nonzero().flatten()
            if rows.numel():
                s = score(self.teachers[name], tprompt_ids, ro, pad, rows=rows,
                          micro_batch=cfg.micro_batch)
                teacher.logprob[rows], teacher.entropy[rows] = s.logprob[rows], s.entropy[rows]
        ref = None
        if self.reference is not None and cfg.loss in ("exopd", "copsd"):
            ref = score(self.reference, ro.prompt_ids, ro, pad, micro_batch=cfg.micro_batch)
        return {"rollouts": ro, "old": old, "teacher": teacher, "teacher_index": teacher_index,
                "teacher_prompt_ids": tprompt_ids, "reference": ref}

    def train_step(self, batch: PromptBatch) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        sc = self.rollout_and_score(batch)
        ro: Rollouts = sc["rollouts"]
        t_roll = time.perf_counter() - t0
        signals, metrics = batch_signals(cfg, sc, len(self.teacher_names))
        self.student.train()
        order = torch.arange(ro.size)
        r = ro.response.shape[1]
        pad = self.tok.pad_token_id
        micro_metrics: dict = {}
        for mini in order.chunk(cfg.mini_batches):
            self.opt.zero_grad(set_to_none=True)
            denom = loss_denominator(cfg, signals, mini)
            for micro in mini.split(cfg.micro_batch):
                inputs = layout([ro.prompt_ids[i] for i in micro.tolist()], ro.response[micro],
                                ro.mask[micro], pad)
                logits = response_logits(self.student, inputs, r)
                teacher_logits = None
                if cfg.loss in ("rkl", "fire-rkl"):
                    teacher_logits = self._teacher_logits(sc, micro, r)
                loss, m = micro_loss(cfg, logits, teacher_logits, ro.response[micro],
                                     ro.mask[micro], signals, sc, micro, denom)
                loss.backward()
                for k, v in m.items():
                    # micro-batch losses share the denominator: they sum to the mini-batch loss
                    share = 1.0 / cfg.mini_batches if k == "loss" else micro.numel() / ro.size
                    micro_metrics[k] = micro_metrics.get(k, 0.0) + v * share
            grad_norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.max_grad_norm)
            self.opt.step()
            self.sched.step()
        metrics = {**micro_metrics, **metrics}  # batch-level signals win over micro averages
        if self.rollout_metrics is not None:
            metrics.update(self.rollout_metrics(batch, ro))
        metrics.update(
            step=self.step + 1, lr=self.sched.get_last_lr()[0], grad_norm=float(grad_norm),
            response_length=float(ro.lengths().float().mean()),
            teacher_logprob=float(_masked_mean(sc["teacher"].logprob, ro.mask)),
            student_logprob=float(_masked_mean(sc["old"].logprob, ro.mask)),
            student_entropy=float(_masked_mean(sc["old"].entropy, ro.mask)),
            tokens=int(ro.mask.sum()),
            tokens_per_s=float(ro.mask.sum()) / (time.perf_counter() - t0),
            rollout_s=t_roll, step_s=time.perf_counter() - t0)
        return metrics

    @torch.no_grad()
    def _teacher_logits(self, sc: dict, micro: torch.Tensor, r: int) -> torch.Tensor:
        """Each row's own teacher's logits [b, R, Vmax] for the analytic KL (padded with -inf)."""
        ro: Rollouts = sc["rollouts"]
        idx = sc["teacher_index"][micro]
        outs, vmax = {}, 0
        for k in idx.unique().tolist():
            rows = micro[idx == k]
            inputs = layout([sc["teacher_prompt_ids"][i] for i in rows.tolist()], ro.response[rows],
                            ro.mask[rows], self.tok.pad_token_id)
            outs[k] = response_logits(self.teachers[self.teacher_names[k]], inputs, r)
            vmax = max(vmax, outs[k].shape[-1])
        first = next(iter(outs.values()))
        full = first.new_full((micro.numel(), r, vmax), float("-inf"))
        for k, lg in outs.items():
            full[(idx == k).nonzero().flatten(), :, :lg.shape[-1]] = lg
        return full

    # ------------------------------------------------------------------ the loop

    def train(self, resume: bool = True, initial_eval: Optional[dict] = None) -> list[dict]:
        """Run to cfg.steps; with ``resume`` continue from the newest checkpoint in out_dir.

        ``initial_eval``: the evaluation of this very starting student, when the caller
        already has it (several runs from one start); logged as step 0 instead of
        evaluating again.
        """
        cfg = self.cfg
        resumed = self.resume() if resume else None
        log = JsonlLog(self.out_dir / "metrics.jsonl", resume_step=self.step if resumed else None,
                       log=self.log)
        if resumed is None and self.evaluate is not None:
            first = initial_eval if initial_eval is not None else self.evaluate(self.student)
            rec = {"step": 0, **{f"eval/{k}": v for k, v in first.items()}}
            self.history.append(rec)
            log.write(rec)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.loss}", leave=False,
                       dynamic_ncols=True)
        while self.step < cfg.steps:
            seed_everything(_step_seed(cfg.seed, self.step))
            batch = self.prompts(self.step, cfg.prompts_per_step, random.Random(_step_seed(cfg.seed, self.step)))
            metrics = self.train_step(batch)
            self.step += 1
            if self.evaluate is not None and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                metrics.update({f"eval/{k}": v for k, v in self.evaluate(self.student).items()})
            self.history.append(metrics)
            log.write(metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{metrics[k]:.3g}" for k in
                                 ("loss", "keep_ratio", "teacher_logprob", "eval/accuracy")
                                 if k in metrics})
            if cfg.save_every and (self.step % cfg.save_every == 0 or self.step == cfg.steps):
                self.save()
        if bar is not None:
            bar.close()
        return self.history


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


# ---------------------------------------------------------------------------- signals and losses


def batch_signals(cfg: OPDConfig, sc: dict, num_teachers: int) -> tuple[dict, dict]:
    """Batch-level signals over the WHOLE rollout batch: FiRe-OPD filter + weights, TIP selection.

    Returns (signals, metrics). ``signals["loss_mask"]`` [B, T] is the set of
    tokens that enter the loss (and its denominator).
    """
    from pyopd.losses import fire_opd_signals, tip_token_mask

    ro: Rollouts = sc["rollouts"]
    m = ro.mask
    sig = {"keep": None, "weight": None, "selection": None, "loss_mask": m}
    metrics: dict = {}
    if cfg.loss in ("fire", "fire-rkl"):
        multi = num_teachers > 1
        fs = fire_opd_signals(
            sc["teacher"].logprob, m, teacher_entropy=sc["teacher"].entropy,
            student_entropy=sc["old"].entropy, p=cfg.percentile, alpha=cfg.alpha, beta=cfg.beta,
            normalize=cfg.weight_norm, teacher_index=sc["teacher_index"] if multi else None,
            num_teachers=num_teachers if multi else None)
        sig.update(keep=fs.keep, weight=fs.weight, loss_mask=m & fs.keep[:, None])
        metrics.update(fs.metrics)
    elif cfg.loss == "copsd":
        ga = pyopd.group_advantages(sc["teacher"].logprob, sc["old"].logprob, m, ro.group,
                                    clip_low=cfg.reward_clip[0], clip_high=cfg.reward_clip[1],
                                    bonus=cfg.reward_bonus)
        sig["advantage"] = ga.advantage
        w = m.sum(-1).double()
        metrics["reward_mean"] = float((ga.reward_mean * w).sum() / w.sum().clamp(min=1))
    elif cfg.loss == "tip":
        div = (sc["teacher"].logprob - sc["old"].logprob).abs()
        sel = tip_token_mask(sc["old"].entropy, div, m, rho=cfg.tip_rho)
        sig.update(selection=sel, loss_mask=m & sel)
    return sig, metrics


def loss_denominator(cfg: OPDConfig, signals: dict, rows: torch.Tensor) -> float:
    """The aggregation denominator of the rows of one optimizer step (shared by its micro-batches)."""
    lm = signals["loss_mask"][rows]
    n = lm.sum(-1)
    d = n.sum() if cfg.agg == "token-mean" else (n > 0).sum()
    return max(1.0, float(d))


def micro_loss(cfg: OPDConfig, logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
               response: torch.Tensor, mask: torch.Tensor, signals: dict, sc: dict,
               rows: torch.Tensor, denominator: float) -> tuple[torch.Tensor, dict]:
    """The loss of one micro-batch ``rows`` from the student's logits [b, R, V] (with grad)."""
    from pyopd import losses

    keep = None if signals["keep"] is None else signals["keep"][rows]
    weight = None if signals["weight"] is None else signals["weight"][rows]
    ppo = dict(clip_ratio=cfg.clip, dual_clip=cfg.dual_clip, agg=cfg.agg, denominator=denominator)
    if cfg.loss in ("rkl", "fire-rkl"):
        return losses.reverse_kl_loss_from_logits(
            logits, teacher_logits, mask, tokens=response, weight=weight, keep=keep,
            agg=cfg.agg, denominator=denominator)
    logprob = pyopd.token_stats(logits, response, mask=mask).logprob
    old = sc["old"].logprob[rows]
    lq = sc["teacher"].logprob[rows]
    if cfg.loss == "opd":
        return losses.opd_loss(logprob, old, lq, mask, **ppo)
    if cfg.loss == "fire":
        return losses.fire_opd_loss(logprob, old, lq, mask, keep=keep, weight=weight, **ppo)
    if cfg.loss == "exopd":
        return losses.exopd_loss(logprob, old, lq, sc["reference"].logprob[rows], mask,
                                 lam=cfg.exopd_lambda, **ppo)
    if cfg.loss == "copsd":
        ref = sc["reference"].logprob[rows] if sc["reference"] is not None else None
        return losses.copsd_loss(logprob, old, None, mask, advantages=signals["advantage"][rows],
                                 ref_logprob=ref, kl_coef=cfg.kl_coef, **ppo)
    if cfg.loss == "tip":
        return losses.tip_loss(logprob, old, lq, mask, selection=signals["selection"][rows], **ppo)
    raise ValueError(f"unknown loss {cfg.loss!r}")
