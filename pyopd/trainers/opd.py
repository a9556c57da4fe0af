"""The on-policy distillation loop (vanilla OPD, FiRe-OPD, the analytic reverse KL, baselines).

Read it top to bottom in `OPDTrainer.train`: each step

1. samples `prompts_per_step` prompts and `n` student responses per prompt;
2. scores them without grad: the student's old log-probs, and each row's own
   teacher's log-probs and entropies (`pyopd.token_stats`, logits freed per
   micro-batch; multi-teacher rows are routed by name);
3. asks the objective (`pyopd.objectives`, looked up by ``cfg.loss``) for its
   batch-level signals (FiRe-OPD's filter and weights, COPSD's group
   advantages, ...) ONCE over the whole rollout batch, so micro-batching can
   never change them;
4. updates the student in `mini_batches` optimizer steps, each accumulating
   micro-batches whose losses share the objective's denominator; a NaN/inf
   loss or gradient norm stops the run before the step is applied;
5. logs metrics (JSONL + progress bar), evaluates, checkpoints.

One temperature T (``cfg.temperature``) is used throughout: sampling, the old,
teacher and reference log-probs and entropies, and the student's log-probs in
the losses.

Each step's randomness is derived from (seed, step) and the RNG states are
checkpointed, so a resumed run reproduces an uninterrupted one exactly.

Several processes (``torchrun``, torch.distributed initialised): each rank
samples its share of the step's prompts (``prompts_per_step`` is global);
the objective's batch-level signals and the loss denominators are taken over
all ranks, gradients are summed across ranks before the optimizer step, so a
step equals one process on the same global batch. Rank 0 alone evaluates and
writes logs and checkpoints; checkpoints hold no rank state, so a run resumes
with any number of processes.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np
import torch

from pyopd._hf import no_progress_bars
from pyopd.config import OPDConfig
from pyopd.objectives import (
    MicroBatch,
    ScoredBatch,
    Scores,
    make_objective,
    micro_partition,
    objective_names,
    slice_rows,
)
from pyopd.trainers import checkpoint as ckpt_io
from pyopd.trainers import sharding
from pyopd.trainers.records import JsonlLog
from pyopd.trainers.rollout import (
    Rollouts,
    grad_in_forward,
    layout,
    linear_head,
    response_hidden,
    response_logits,
    sample_rollouts,
    score,
    wants_fused,
)

__all__ = ["NonFiniteError", "OPDConfig", "OPDTrainer", "PromptBatch", "objective_names"]



class NonFiniteError(RuntimeError):
    """The loss or the gradient norm became NaN/inf: the step was not applied."""


@dataclass
class PromptBatch:
    prompts: list[str]
    teachers: list[str]                   # the teacher name of each prompt
    teacher_prompts: Optional[list[str]] = None  # what the teacher sees (default: prompts)
    meta: list = field(default_factory=list)     # anything the caller wants back (e.g. Examples)


PromptSource = Callable[[int, int, random.Random], PromptBatch]
Evaluator = Callable[[torch.nn.Module], dict]
RolloutMetrics = Callable[[PromptBatch, Rollouts], dict]  # extra per-step diagnostics


def dist_info() -> tuple[int, int]:
    """(rank, world size) of torch.distributed, or (0, 1) when it is not in use."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
                 rollout_metrics: Optional[RolloutMetrics] = None, label: Optional[str] = None) -> None:
        cfg.validate()
        self.label = label or cfg.loss  # names the progress bar (e.g. "OPSD" vs "COPSD")
        self.rank, self.world = dist_info()
        if cfg.prompts_per_step % self.world:
            raise ValueError(f"prompts_per_step ({cfg.prompts_per_step}) must be a multiple of the number "
                             f"of processes ({self.world}): each rank samples an equal share")
        # FSDP: every forward is a collective, so every rank evaluates (rank 0 reports).
        self.sharded = bool(cfg.fsdp) and self.world > 1
        if cfg.fsdp and self.world == 1:
            log("[pyopd] --fsdp with one process: nothing to shard, the model stays whole")
        if self.rank != 0:  # rank 0 alone reports, evaluates and writes
            log, progress = (lambda *_: None), False
            evaluate = evaluate if self.sharded else None
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
        self.objective = make_objective(cfg)
        self.reference = reference  # frozen initial student: ExOPD's r, COPSD's KL anchor
        if self.objective.needs_reference and reference is None:
            raise ValueError(f"loss {cfg.loss!r} needs reference= (the frozen initial student)")
        if reference is not None:
            reference.eval().requires_grad_(False)
        for t in self.teachers.values():
            t.eval().requires_grad_(False)
        self.fused_mode = cfg.fused_linear
        if self.sharded:
            self._shard_models(log)
        self.out_dir = Path(cfg.out_dir)
        self.opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.step = 0
        self.history: list[dict] = []

    def _shard_models(self, log) -> None:
        """FSDP2 over all ranks (see pyopd/trainers/sharding.py for what changes)."""
        if self.fused_mode in ("on", "recompute", "grad-in-forward"):
            log("[pyopd] --fsdp: the fused-linear path reads the sharded lm_head outside the "
                "model's forward; using materialised logits")
        self.fused_mode = "off"
        sharding.shard(self.student)
        if self.reference is not None:
            sharding.shard(self.reference)
        if len(self.teachers) == 1:  # every rank scores all its rows with it: same forwards
            sharding.shard(next(iter(self.teachers.values())))
        else:
            log(f"[pyopd] --fsdp: {len(self.teachers)} routed teachers score different numbers of "
                "rows per rank, so they stay whole on every rank; the student is sharded")

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

    def save(self) -> Optional[Path]:
        """Write a checkpoint (rank 0). Sharded: every rank must call it (the full weights
        and optimizer state are gathered), the others return None."""
        weights = None
        if self.sharded:
            weights = sharding.full_model_state(self.student)
            optim = sharding.full_optimizer_state(self.student, self.opt)
            if self.rank != 0:
                return None
        else:
            optim = self.opt.state_dict()
        state = {"optimizer": optim, "scheduler": self.sched.state_dict(),
                 "history": self.history, "config": asdict(self.cfg)}
        return ckpt_io.save_checkpoint(self.out_dir, self.step, self.student, self.tok, state,
                                       keep_last=self.cfg.keep_last, log=self.log, weights=weights)

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
        # by index (a replicated run) or by name (a sharded one): either loads into either
        sharding.load_optimizer_state(self.student, self.opt, state["optimizer"])
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

    def local_share(self, batch: PromptBatch) -> tuple[PromptBatch, int]:
        """This rank's contiguous share of the step's (global) prompts, and its offset."""
        if self.world == 1:
            return batch, 0
        per = len(batch.prompts) // self.world
        lo, hi = self.rank * per, (self.rank + 1) * per
        cut = lambda xs: None if xs is None else list(xs[lo:hi])  # noqa: E731
        return PromptBatch(cut(batch.prompts), cut(batch.teachers), cut(batch.teacher_prompts),
                           cut(batch.meta) or []), lo

    def rollout_and_score(self, batch: PromptBatch, group_offset: int = 0) -> dict:
        """Sample the rollouts and score them (no grad): {"rollouts", "batch": ScoredBatch, ...}.

        ``group_offset``: added to the prompt index of each row, so that the rollouts of
        one prompt share a group id across ranks (this rank's prompts start there).
        """
        cfg = self.cfg
        ro = sample_rollouts(self.student, self.tok, batch.prompts, cfg.n,
                             max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             top_p=cfg.top_p)
        pad, T = self.tok.pad_token_id, cfg.temperature
        sk = dict(micro_batch=cfg.micro_batch, temperature=T, fused=self.fused_mode, log=self.log)
        old = score(self.student, ro.prompt_ids, ro, pad, **sk)
        row_teacher = [batch.teachers[g] for g in ro.group.tolist()]
        unknown = sorted(set(row_teacher) - set(self.teachers))
        if unknown:
            raise ValueError(f"prompts name teachers {unknown} that were not given; have {self.teacher_names}")
        teacher_index = torch.tensor([self.teacher_names.index(t) for t in row_teacher], device=ro.mask.device)
        tprompt_ids = self._teacher_prompt_ids(batch, ro)
        teacher = Scores(torch.zeros_like(old.logprob), torch.zeros_like(old.entropy))
        for k, name in enumerate(self.teacher_names):
            rows = (teacher_index == k).nonzero().flatten()
            if rows.numel():
                s = score(self.teachers[name], tprompt_ids, ro, pad, rows=rows, **sk)
                teacher.logprob[rows], teacher.entropy[rows] = s.logprob[rows], s.entropy[rows]
        ref = None
        if self.objective.needs_reference:
            ref = score(self.reference, ro.prompt_ids, ro, pad, **sk)
        scored = ScoredBatch(tokens=ro.response, mask=ro.mask, group=ro.group + group_offset, old=old,
                             teacher=teacher,
                             teacher_index=teacher_index, num_teachers=len(self.teacher_names),
                             reference=ref)
        return {"rollouts": ro, "batch": scored, "teacher_prompt_ids": tprompt_ids}

    def train_step(self, batch: PromptBatch) -> dict:
        """One step on the step's global prompt batch (this rank samples its share)."""
        cfg, obj = self.cfg, self.objective
        t0 = time.perf_counter()
        batch, offset = self.local_share(batch)
        sc = self.rollout_and_score(batch, group_offset=offset)
        ro: Rollouts = sc["rollouts"]
        scored: ScoredBatch = sc["batch"]
        t_roll = time.perf_counter() - t0
        signals = obj.signals(scored)
        self.student.train()
        r = ro.response.shape[1]
        pad = self.tok.pad_token_id
        micro_metrics: dict = {}
        for micros in micro_partition(ro.size, cfg):
            self.opt.zero_grad(set_to_none=True)
            for micro, denom in zip(micros, obj.denominators(signals, micros)):
                inputs = layout([ro.prompt_ids[i] for i in micro.tolist()], ro.response[micro],
                                ro.mask[micro], pad)
                head = linear_head(self.student, inputs, self.log) \
                    if wants_fused(self.fused_mode, micro.numel(), r, self.student) else None
                out = dict(hidden=response_hidden(self.student, inputs, r), head=head, logits=None,
                           teacher_parts_fn=(lambda micro=micro: self._teacher_parts(sc, micro, r))
                           if obj.needs_teacher_logits else None) \
                    if head is not None else dict(logits=response_logits(self.student, inputs, r))
                mb = MicroBatch(
                    rows=micro, **out, tokens=ro.response[micro],
                    mask=ro.mask[micro], loss_mask=signals.loss_mask[micro],
                    old=slice_rows(scored.old, micro), teacher=slice_rows(scored.teacher, micro),
                    reference=slice_rows(scored.reference, micro),
                    signals={k: v[micro] for k, v in signals.rows.items()}, denominator=denom,
                    temperature=cfg.temperature, grad_in_forward=head is not None
                    and grad_in_forward(self.fused_mode, head.weight),
                    teacher_logits_fn=(lambda micro=micro: self._teacher_logits(sc, micro, r))
                    if obj.needs_teacher_logits else None)
                loss, m = obj.loss(mb)
                # (several ranks: a NaN loss shows in the all-reduced gradient norm on every rank)
                if self.world == 1 and not torch.isfinite(loss):
                    raise NonFiniteError(self._nonfinite("loss", float(loss.detach())))
                loss.backward()
                for k, v in m.items():
                    # micro-batch losses share the denominator: they sum to the mini-batch loss
                    share = 1.0 / cfg.mini_batches if k == "loss" else micro.numel() / ro.size
                    micro_metrics[k] = micro_metrics.get(k, 0.0) + v * share
            if self.world > 1 and not self.sharded:  # FSDP sums them in its reduce-scatter
                self._sum_gradients_across_ranks()
            grad_norm = sharding.full_tensor(
                torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.max_grad_norm))
            if not torch.isfinite(grad_norm):
                raise NonFiniteError(self._nonfinite("gradient norm", float(grad_norm)))
            self.opt.step()
            self.sched.step()
        tokens = ro.mask.sum()
        if self.world > 1:
            micro_metrics, tokens = self._reduce_metrics(micro_metrics, tokens)
        metrics = {**micro_metrics, **signals.metrics}  # batch-level signals win over micro averages
        if self.rollout_metrics is not None:
            metrics.update(self.rollout_metrics(batch, ro))
        metrics.update(
            step=self.step + 1, lr=self.sched.get_last_lr()[0], grad_norm=float(grad_norm),
            response_length=float(ro.lengths().float().mean()),
            teacher_logprob=float(_masked_mean(scored.teacher.logprob, ro.mask)),
            student_logprob=float(_masked_mean(scored.old.logprob, ro.mask)),
            student_entropy=float(_masked_mean(scored.old.entropy, ro.mask)),
            tokens=int(tokens),
            tokens_per_s=float(tokens) / (time.perf_counter() - t0),
            rollout_s=t_roll, step_s=time.perf_counter() - t0)
        return metrics

    def _sum_gradients_across_ranks(self) -> None:
        """Each rank's loss already divides by the global denominator: the global gradient is the sum."""
        import torch.distributed as dist

        params = [p for p in self.student.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
            offset += n

    def _reduce_metrics(self, metrics: dict, tokens: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """Micro-batch metrics over all ranks: the loss sums (global denominators), the rest average."""
        import torch.distributed as dist

        keys = sorted(metrics)
        vals = torch.tensor([float(metrics[k]) for k in keys] + [float(tokens)], dtype=torch.float64)
        dist.all_reduce(vals, op=dist.ReduceOp.SUM)
        out = {k: float(v) if k == "loss" else float(v) / self.world for k, v in zip(keys, vals[:-1])}
        return out, vals[-1]

    def _nonfinite(self, what: str, value: float) -> str:
        last = ckpt_io.latest_checkpoint(self.out_dir)
        kept = f"the last checkpoint, {last}, is intact" if last else "no checkpoint was written yet"
        return (f"step {self.step + 1}: the {what} is {value} (loss {self.cfg.loss!r}, lr {self.cfg.lr:g}); "
                f"the update was not applied and the run stopped; {kept}. Lower --lr or "
                f"--max-grad-norm, or check the inputs")

    @torch.no_grad()
    def _teacher_parts(self, sc: dict, micro: torch.Tensor, r: int) -> Optional[list]:
        """Per teacher of the micro-batch: (its rows in the micro-batch, hidden [k, R, Ht], head);
        None when some teacher's head is not a plain linear map (then logits are used)."""
        ro: Rollouts = sc["rollouts"]
        idx = sc["batch"].teacher_index[micro]
        parts = []
        for k in idx.unique().tolist():
            local = (idx == k).nonzero().flatten()
            rows = micro[local.cpu()]
            inputs = layout([sc["teacher_prompt_ids"][i] for i in rows.tolist()], ro.response[rows],
                            ro.mask[rows], self.tok.pad_token_id)
            teacher = self.teachers[self.teacher_names[k]]
            head = linear_head(teacher, inputs, self.log)
            if head is None:
                return None
            parts.append((local, response_hidden(teacher, inputs, r), head))
        return parts

    @torch.no_grad()
    def _teacher_logits(self, sc: dict, micro: torch.Tensor, r: int) -> torch.Tensor:
        """Each row's own teacher's logits [b, R, Vmax] for the analytic KL (padded with -inf)."""
        ro: Rollouts = sc["rollouts"]
        idx = sc["batch"].teacher_index[micro]
        outs, vmax = {}, 0
        for k in idx.unique().tolist():
            rows = micro[(idx == k).to(micro.device)]  # micro: CPU row ids; idx: the model's device
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
        if self.rank == 0:
            ckpt_io.clean_temp(self.out_dir, self.log)  # what a killed save left behind
        resumed = self.resume() if resume else None
        log = JsonlLog(self.out_dir / "metrics.jsonl", resume_step=self.step if resumed else None,
                       log=self.log) if self.rank == 0 else None
        if self.sharded:  # evaluating is collective: all ranks skip it if rank 0 has the result
            given = torch.tensor([float(initial_eval is not None)])
            torch.distributed.all_reduce(given, op=torch.distributed.ReduceOp.MAX)
            if given.item() and initial_eval is None:
                initial_eval = {}
        if resumed is None and self.evaluate is not None:
            first = initial_eval if initial_eval is not None else self.evaluate(self.student)
            rec = {"step": 0, **{f"eval/{k}": v for k, v in first.items()}}
            self.history.append(rec)
            if log is not None:
                log.write(rec)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            # leave=True: the finished bar stays on screen with its final figures.
            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{self.label:<10}", leave=True,
                       dynamic_ncols=True, unit="step")
        shown: dict = {}
        tokens, seconds = 0, 0.0
        while self.step < cfg.steps:
            # the prompts are drawn from (seed, step) alike on every rank; sampling differs per rank
            seed_everything(_step_seed(cfg.seed, self.step) + self.rank)
            batch = self.prompts(self.step, cfg.prompts_per_step, random.Random(_step_seed(cfg.seed, self.step)))
            metrics = self.train_step(batch)
            self.step += 1
            if self.evaluate is not None and (self.step == cfg.steps or
                                              (cfg.eval_every and self.step % cfg.eval_every == 0)):
                metrics.update({f"eval/{k}": v for k, v in self.evaluate(self.student).items()})
            self.history.append(metrics)
            if log is not None:
                log.write(metrics)
            tokens, seconds = tokens + metrics["tokens"], seconds + metrics["step_s"]
            if bar is not None:
                shown.update({k.removeprefix("eval/"): f"{metrics[k]:.3g}" for k in
                              ("loss", "keep_ratio", "eval/accuracy", "eval/avg@4", "eval/safe_rate",
                               "eval/helpfulness") if k in metrics})
                shown["tok/s"] = f"{tokens / max(seconds, 1e-9):.0f}"  # total tokens / total time
                bar.set_postfix(shown, refresh=False)
                bar.update(1)
            if (self.rank == 0 or self.sharded) and cfg.save_every and (
                    self.step % cfg.save_every == 0 or self.step == cfg.steps):
                with no_progress_bars():
                    self.save()
        if bar is not None:
            bar.close()
        return self.history


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)
