"""The objective interface: what one OPD method needs, its batch signals, its micro-batch loss.

An objective is a small class registered under a name. The trainer (and the
engine integrations) drive every objective the same way:

1. ``obj.signals(batch)`` ONCE on the whole scored rollout batch (all ranks):
   the filter, token weights, group advantages, token selection... anything
   that is a batch-level quantity. It returns a `Signals`: the tokens that
   enter the loss (``loss_mask``), per-rollout tensors to be sliced per
   micro-batch (``rows``), and metrics.
2. for each optimizer step, ``obj.denominators(signals, micro_rows)`` gives each
   micro-batch's aggregation denominator (shared, so micro-batch losses sum to
   the mini-batch loss and micro-batching never changes the result);
3. ``obj.loss(micro)`` per micro-batch, with the student's logits (with grad).

What an objective needs from the trainer is declared on the class:
``needs_reference`` (the frozen initial student's log-probs),
``needs_teacher_logits`` (each row's teacher logits per micro-batch, for the
analytic full-vocabulary KL). Teacher log-probs and entropies of the sampled
tokens are always there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional, Sequence

import torch

import pyopd


@dataclass
class Scores:
    """Per-token signals of one model on the rollout tokens (no grad)."""

    logprob: torch.Tensor  # [B, T] log-prob of the sampled token (at the run's temperature), 0 off the mask
    entropy: torch.Tensor  # [B, T] entropy of the next-token distribution


@dataclass
class ScoredBatch:
    """The whole rollout batch, scored without grad: what `Objective.signals` sees."""

    tokens: torch.Tensor          # [B, T] sampled response ids
    mask: torch.Tensor            # [B, T] bool response mask
    group: torch.Tensor           # [B] prompt index of each rollout (rollouts of one prompt share it)
    old: Scores                   # the student that sampled (the "old" policy)
    teacher: Scores               # each row's own teacher
    teacher_index: torch.Tensor   # [B] which teacher scored each row
    num_teachers: int
    reference: Optional[Scores] = None  # the frozen initial student (when needed)

    @property
    def size(self) -> int:
        return self.tokens.shape[0]


@dataclass
class Signals:
    """Batch-level signals of an objective (computed once per rollout batch)."""

    loss_mask: torch.Tensor                     # [B, T] bool: tokens in the loss and its denominator
    rows: dict = field(default_factory=dict)    # name -> [B] or [B, T] tensor, sliced per micro-batch
    metrics: dict = field(default_factory=dict)  # plain floats for the log


@dataclass
class MicroBatch:
    """One micro-batch: the student's output (with grad), and its slices of the batch.

    The student's output is either ``logits`` [b, T, V], or, when its head is a
    plain linear map, ``hidden`` [b, T, H] with ``head`` (weight, bias): then
    `logprob()` and the fused-linear ops never build the logits, and
    `student_logits()` builds them only for an objective that asks.
    """

    rows: torch.Tensor            # [b] indices into the rollout batch
    logits: Optional[torch.Tensor]  # [b, T, V] student logits (with grad), or None with hidden
    tokens: torch.Tensor          # [b, T]
    mask: torch.Tensor            # [b, T] response mask
    loss_mask: torch.Tensor       # [b, T] the objective's tokens
    old: Scores                   # sliced
    teacher: Scores               # sliced
    reference: Optional[Scores]   # sliced (when the objective needs it)
    signals: dict                 # the objective's `Signals.rows`, sliced
    denominator: float
    temperature: float
    teacher_logits_fn: Optional[Callable[[], torch.Tensor]] = None
    hidden: Optional[torch.Tensor] = None   # [b, T, H] student last hidden states (with grad)
    head: Optional[object] = None           # the student's linear head (weight [V, H], bias)
    # [(rows of this micro-batch, teacher hidden [k, T, Ht], teacher head)] per teacher, or None
    teacher_parts_fn: Optional[Callable[[], Optional[list]]] = None
    # fused path: the loss's gradient taken in the forward pass where the objective can
    # (`pyopd.fused_linear_reverse_kl_loss`; --fused-linear grad-in-forward)
    grad_in_forward: bool = False
    _logprob: Optional[torch.Tensor] = None

    def logprob(self) -> torch.Tensor:
        """[b, T] the student's log-prob of the sampled tokens, with grad (fused kernels)."""
        if self._logprob is None:
            if self.logits is None:
                self._logprob = pyopd.fused_linear_token_stats(
                    self.hidden, self.head.weight, self.tokens, mask=self.mask, temperature=self.temperature,
                    bias=self.head.bias).logprob
            else:
                self._logprob = pyopd.token_stats(self.logits, self.tokens, mask=self.mask,
                                                  temperature=self.temperature).logprob
        return self._logprob

    def student_logits(self) -> torch.Tensor:
        """[b, T, V] the student's logits (built from the hidden states if needed)."""
        if self.logits is None:
            self.logits = torch.nn.functional.linear(self.hidden, self.head.weight, self.head.bias)
        return self.logits

    def teacher_parts(self) -> Optional[list]:
        """Each teacher's rows, hidden states and linear head, for `pyopd.fused_linear_reverse_kl`;
        None when the fused path is off or a teacher's head is not a plain linear map."""
        return None if self.teacher_parts_fn is None or self.hidden is None else self.teacher_parts_fn()

    def teacher_logits(self) -> torch.Tensor:
        """[b, T, Vt] each row's own teacher's logits (only for objectives that declare the need)."""
        if self.teacher_logits_fn is None:
            raise RuntimeError("this objective did not declare needs_teacher_logits = True")
        return self.teacher_logits_fn()


def slice_rows(x, rows: torch.Tensor):
    if x is None:
        return None
    if isinstance(x, Scores):
        return Scores(x.logprob[rows], x.entropy[rows])
    return x[rows]


class Objective:
    """Base class: vanilla token-mean aggregation over the response mask; override what differs."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_reference: ClassVar[bool] = False
    needs_teacher_logits: ClassVar[bool] = False
    options: ClassVar[tuple[str, ...]] = ()  # the config fields it reads (documentation, help)

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    # ---- batch level
    def signals(self, batch: ScoredBatch) -> Signals:
        return Signals(loss_mask=batch.mask)

    def denominators(self, signals: Signals, micro_rows: Sequence[torch.Tensor]) -> list[float]:
        """Each micro-batch's denominator; by default the whole optimizer step's (shared)."""
        return shared_denominators(self.cfg, signals.loss_mask, micro_rows)

    # ---- micro-batch level
    def loss(self, micro: MicroBatch) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    # ---- helpers for subclasses
    def ppo_kwargs(self, micro: MicroBatch) -> dict:
        return dict(clip_ratio=self.cfg.clip, dual_clip=self.cfg.dual_clip, agg=self.cfg.agg,
                    denominator=micro.denominator)


def micro_partition(num_rows: int, cfg) -> list[list[torch.Tensor]]:
    """The rows of each micro-batch of each optimizer step, as the trainer runs them.

    ``cfg.mini_batches`` consecutive chunks of the rollout batch, each split into
    micro-batches of ``cfg.micro_batch`` rows. The released preset needs this
    partition when it computes its (per micro-batch) signals.
    """
    return [list(mini.split(cfg.micro_batch)) for mini in torch.arange(num_rows).chunk(cfg.mini_batches)]


def micro_ids(num_rows: int, cfg) -> torch.Tensor:
    """[B] the index of each row's micro-batch in `micro_partition` (counted over all steps)."""
    ids = torch.empty(num_rows, dtype=torch.long)
    k = 0
    for mini in micro_partition(num_rows, cfg):
        for rows in mini:
            ids[rows] = k
            k += 1
    return ids


def shared_denominators(cfg, loss_mask: torch.Tensor, micro_rows: Sequence[torch.Tensor]) -> list[float]:
    """Each micro-batch's denominator for one optimizer step over ``micro_rows``.

    ``preset='paper'``: one denominator for all, as if the step were one batch,
    so micro-batching never changes the result. ``preset='released'``: the
    released code's verl aggregation, a token mean per micro-batch weighted by
    its share of the step's rows (`pyopd.presets.released_denominator`).
    """
    from pyopd.ops.distributed import sync_group

    group = sync_group(None, None)  # several ranks: their gradients are summed (see OPDTrainer)
    if getattr(cfg, "preset", "paper") == "released":
        from pyopd.presets.released import released_denominator

        if cfg.agg != "token-mean":
            raise ValueError("preset 'released' aggregates with token-mean only (agg='token-mean')")
        # verl averages the ranks' gradients; with summed gradients that is a world-size factor
        world = 1 if group is None else torch.distributed.get_world_size(group)
        rows = sum(int(r.numel()) for r in micro_rows)
        return [released_denominator(loss_mask[r], rows * world) for r in micro_rows]

    every = torch.cat(list(micro_rows)) if len(micro_rows) else torch.zeros(0, dtype=torch.long)
    n = loss_mask[every].sum(-1)
    d = (n.sum() if cfg.agg == "token-mean" else (n > 0).sum()).to(torch.float64)
    if group is not None:  # the whole step's count, over every rank
        torch.distributed.all_reduce(d, group=group)
    return [max(1.0, float(d))] * len(micro_rows)


# ---- registry ---------------------------------------------------------------------------

_REGISTRY: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make ``cls`` available under ``cls.name`` (trainer, CLI, integrations)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"objective {cls.name!r} is registered twice "
                         f"({_REGISTRY[cls.name].__module__} and {cls.__module__})")
    _REGISTRY[cls.name] = cls
    return cls
