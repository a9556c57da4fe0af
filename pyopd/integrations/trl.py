"""TRL plug-in: `GKDTrainer` with pyopd's fused reverse KL and FiRe-OPD's filter and weights.

`PyOPDGKDTrainer` is a drop-in subclass of ``trl.experimental.gkd.GKDTrainer``
(TRL >= 1.16). Everything GKD does around the loss is inherited unchanged:
the data collator, on-policy generation with probability ``lmbda`` (and
``seq_kd``), the teacher forward in eval mode under ``no_grad``, and the
Trainer's gradient-accumulation scaling. Only ``compute_loss`` is replaced:

- GKD with ``beta=1`` computes ``F.kl_div(log q, log p, log_target=True)``,
  i.e. the reverse KL(p || q) per token, over materialised ``[B, T, V]``
  log-softmaxes. Here the same per-token KL comes from `pyopd.reverse_kl`
  (one pass over the vocabulary, gradient recomputed in backward), or from
  `pyopd.fused_linear_reverse_kl` on the last hidden states and the
  ``lm_head`` weights (``use_fused_linear=True``: no ``[B, T, V]`` logits at all).
- Aggregation is GKD's, exactly: the sum of the per-token KL over completion
  positions (shifted ``labels != -100``) divided by ``num_items_in_batch``
  when the Trainer passes it, else by the number of those positions
  (at least 1). That is a token mean, not a mean over sequences.
- Temperature is GKD's: ``GKDConfig.temperature`` is the *sampling*
  temperature of on-policy generation, and GKD's ``compute_loss`` evaluates
  the divergence at temperature 1. ``loss_temperature`` changes that.
- ``fire=True`` (or a `FireOptions`) applies FiRe-OPD: `fire_opd_signals`
  runs once per ``compute_loss`` call on the whole batch, from the kernel's
  own teacher log-probs and both entropies; rollouts it drops contribute 0 and
  kept tokens are weighted by its token weights. The denominator stays GKD's
  (see `gkd_reverse_kl_loss`).
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import nn

try:
    import trl
    from packaging.version import Version
    from trl.experimental.gkd import GKDConfig, GKDTrainer
except ImportError as exc:  # pragma: no cover - exercised only without TRL
    raise ImportError(
        "pyopd.integrations.trl needs TRL >= 1.16 (pip install 'pyopd[trl]'); "
        f"importing trl.experimental.gkd failed: {exc}") from exc

if Version(trl.__version__).release < (1, 16):  # pragma: no cover - exercised only with an old TRL
    raise ImportError(f"pyopd.integrations.trl needs TRL >= 1.16, found {trl.__version__}")

from pyopd.losses.fire import FireSignals, fire_opd_signals
from pyopd.ops.fused_linear import fused_linear_reverse_kl
from pyopd.ops.types import ReverseKL
from pyopd.ops.vocab import reverse_kl

__all__ = ["FireOptions", "GKDLoss", "PyOPDGKDTrainer", "gkd_reverse_kl_loss"]

IGNORE_INDEX = -100  # TRL's (and transformers') label value for positions outside the loss


@dataclasses.dataclass(frozen=True)
class FireOptions:
    """FiRe-OPD hyperparameters, as in `pyopd.losses.fire_opd_signals`.

    p: percentile of rollouts dropped by length-normalised teacher log-prob.
    alpha, beta: exponents of teacher confidence and student confusion in the
    token weights; normalize: how the weights are normalised ("trajectory").
    """

    p: float = 20.0
    alpha: float = 1.0
    beta: float = 1.0
    normalize: str = "trajectory"


class GKDLoss(NamedTuple):
    """What `gkd_reverse_kl_loss` computed."""

    loss: torch.Tensor  # scalar, differentiable w.r.t. the student
    signals: ReverseKL  # per-token kernel outputs, each [B, T-1]
    mask: torch.Tensor  # [B, T-1] bool: completion positions (shifted labels != -100)
    fire: Optional[FireSignals]  # None without FiRe


def _as_fire(fire: Union[bool, FireOptions, None]) -> Optional[FireOptions]:
    if fire is None or fire is False:
        return None
    if fire is True:
        return FireOptions()
    if isinstance(fire, FireOptions):
        return fire
    raise TypeError(f"fire must be a bool or a FireOptions, got {type(fire).__name__}")


def _gkd_denominator(mask: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor | Any:
    # GKD's reduction: the Trainer's global token count when given (gradient
    # accumulation correct), else this batch's completion tokens, at least 1.
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            return num_items_in_batch.to(mask.device)
        return num_items_in_batch
    return mask.sum().clamp_min(1)


def gkd_reverse_kl_loss(
    student: torch.Tensor | tuple[torch.Tensor, nn.Linear],
    teacher: torch.Tensor | tuple[torch.Tensor, nn.Linear],
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    num_items_in_batch: Any = None,
    fire: Union[bool, FireOptions, None] = None,
) -> GKDLoss:
    """GKD's ``generalized_jsd_loss(beta=1)`` on pyopd's fused kernel, optionally with FiRe-OPD.

    Args:
        student: shifted student logits [B, T, V], or ``(hidden [B, T, H],
            lm_head)`` with a plain ``nn.Linear`` head (fused-linear path).
        teacher: shifted teacher logits [B, T, Vt >= V], or ``(hidden, lm_head)``;
            never differentiated.
        labels: [B, T] shifted labels; ``-100`` marks positions outside the
            loss, every other value is the sampled token.
        temperature: divergence temperature (GKD's ``compute_loss`` uses 1).
        num_items_in_batch: the Trainer's token count; see the module doc.
        fire: FiRe-OPD on/off or its options.

    Returns:
        `GKDLoss`. Without FiRe, ``loss = sum(kl[mask]) / D``; with FiRe,
        ``loss = sum((w * kl)[mask & keep]) / D``; D is GKD's denominator
        (``num_items_in_batch``, else ``mask.sum()`` clamped to 1) in both cases,
        so dropped rollouts count 0 in the numerator but stay in D.
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(f"labels must be a [B, T] tensor, got {getattr(labels, 'shape', type(labels))}")
    opts = _as_fire(fire)
    mask = labels != IGNORE_INDEX
    # Masked positions are never read by the kernel; 0 keeps the range check quiet.
    tokens = torch.where(mask, labels, torch.zeros_like(labels))
    if isinstance(student, tuple) != isinstance(teacher, tuple):
        raise TypeError("student and teacher must both be logits or both be (hidden, lm_head) pairs")
    if isinstance(student, tuple):
        (s_h, s_head), (t_h, t_head) = student, teacher
        for name, head in (("student lm_head", s_head), ("teacher lm_head", t_head)):
            if type(head) is not nn.Linear:
                raise TypeError(f"{name} must be a plain torch.nn.Linear, got {type(head).__name__}")
        sig = fused_linear_reverse_kl(
            s_h, s_head.weight, t_h.detach(), t_head.weight.detach(), tokens, mask,
            temperature=temperature, student_bias=s_head.bias,
            teacher_bias=None if t_head.bias is None else t_head.bias.detach())
    else:
        sig = reverse_kl(student, teacher.detach(), tokens, mask=mask, temperature=temperature)
    denom = _gkd_denominator(mask, num_items_in_batch)
    if opts is None:
        return GKDLoss(loss=sig.kl[mask].sum() / denom, signals=sig, mask=mask, fire=None)
    # The filter and weights are batch-level statistics of detached signals:
    # computed once here, on every row of this call (synchronised across ranks
    # by fire_opd_signals when torch.distributed is initialised).
    fs = fire_opd_signals(
        sig.teacher_logprob.detach(), mask, teacher_entropy=sig.teacher_entropy.detach(),
        student_entropy=sig.student_entropy.detach(), p=opts.p, alpha=opts.alpha, beta=opts.beta,
        normalize=opts.normalize)
    counted = mask & fs.keep[:, None]
    weighted = fs.weight.detach().to(sig.kl.dtype) * sig.kl
    return GKDLoss(loss=weighted[counted].sum() / denom, signals=sig, mask=mask, fire=fs)


def _head(model: nn.Module, who: str) -> nn.Linear:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        raise ValueError(f"use_fused_linear=True needs the {who}'s output embeddings to be a plain "
                         f"torch.nn.Linear, got {type(head).__name__}")
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for attr in ("final_logit_softcapping", "logit_scale"):
        val = getattr(cfg, attr, None)
        if val is not None and not (attr == "logit_scale" and val == 1.0):
            raise ValueError(f"use_fused_linear=True: the {who}'s config sets {attr}={val}, so its logits "
                             "are not hidden @ lm_head.weight.T; use use_fused_linear=False")
    # A PEFT wrapper forwards **kwargs to the model it wraps: check that one.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        raise ValueError(f"use_fused_linear=True needs the {who}'s forward to accept logits_to_keep")
    return head


class PyOPDGKDTrainer(GKDTrainer):
    """`GKDTrainer` whose loss is pyopd's fused reverse KL (GKD with ``beta=1``).

    Args (besides GKDTrainer's, all keyword-only):
        fire: False (default), True (FiRe-OPD with `FireOptions` defaults) or a
            `FireOptions`.
        use_fused_linear: compute the KL from the last hidden states and the
            ``lm_head`` weights, never materialising ``[B, T, V]`` logits. Needs
            plain linear heads (checked at init, and the model's last-position
            logits are checked against ``hidden @ W.T`` every step).
        loss_temperature: temperature of the divergence; None = 1, as GKD.

    ``args.beta`` must be 1: this trainer computes the reverse KL only.
    """

    _tag_names = ["trl", "gkd", "pyopd"]

    def __init__(
        self,
        *args: Any,
        fire: Union[bool, FireOptions] = False,
        use_fused_linear: bool = False,
        loss_temperature: Optional[float] = None,
        **kwargs: Any,
    ) -> None:
        cfg = kwargs.get("args", args[2] if len(args) > 2 else None)
        if not isinstance(cfg, GKDConfig):
            raise TypeError(f"args must be a GKDConfig, got {type(cfg).__name__}")
        if cfg.beta != 1.0:
            raise ValueError(f"PyOPDGKDTrainer computes the reverse KL, i.e. GKD with beta=1; got "
                             f"args.beta={cfg.beta}. Set GKDConfig(beta=1.0).")
        self.pyopd_fire = _as_fire(fire)
        if loss_temperature is not None and not (isinstance(loss_temperature, (int, float))
                                                 and loss_temperature > 0):
            raise ValueError(f"loss_temperature must be a positive number or None, got {loss_temperature!r}")
        self.pyopd_loss_temperature = 1.0 if loss_temperature is None else float(loss_temperature)
        self.pyopd_use_fused_linear = bool(use_fused_linear)
        self.pyopd_last: Optional[GKDLoss] = None  # the last call's result, for inspection
        super().__init__(*args, **kwargs)
        if self.pyopd_use_fused_linear:
            _head(self.accelerator.unwrap_model(self.model), "student")
            _head(self.accelerator.unwrap_model(self.teacher_model), "teacher")

    def _hidden_and_head(self, model: nn.Module, inputs: dict, who: str) -> tuple[Any, torch.Tensor, nn.Linear]:
        # Through the top-level forward (so DDP/FSDP hooks run), but only the
        # last position's logits are computed; hidden_states[-1] is the
        # final-normed state the head reads.
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]
        head = _head(self.accelerator.unwrap_model(model), who)
        with torch.no_grad():
            last = nn.functional.linear(hidden[:, -1:], head.weight, head.bias)
            got = out.logits[:, -1:]
            if got.shape != last.shape or not torch.allclose(
                    got.float(), last.float(), rtol=1e-3, atol=1e-3 * (1.0 + float(last.abs().max()))):
                raise ValueError(f"use_fused_linear=True: the {who}'s logits are not hidden_states[-1] @ "
                                 "lm_head.weight.T (+ bias); use use_fused_linear=False")
        return out, hidden[:, :-1], head

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """GKD's ``compute_loss`` with the loss from `gkd_reverse_kl_loss` (same shift, same reduction)."""
        self.teacher_model.eval()
        if self.pyopd_use_fused_linear:
            student_outputs, s_h, s_head = self._hidden_and_head(model, inputs, "student")
            with torch.no_grad():
                _t_out, t_h, t_head = self._hidden_and_head(self.teacher_model, inputs, "teacher")
            student, teacher = (s_h, s_head), (t_h, t_head)
        else:
            student_outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            with torch.no_grad():
                teacher_outputs = self.teacher_model(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            student = student_outputs.logits[:, :-1, :]
            teacher = teacher_outputs.logits[:, :-1, :]
        res = gkd_reverse_kl_loss(
            student, teacher, inputs["labels"][:, 1:], temperature=self.pyopd_loss_temperature,
            num_items_in_batch=num_items_in_batch, fire=self.pyopd_fire)
        # Kept detached: holding the graph until the next step would pin memory.
        self.pyopd_last = res._replace(loss=res.loss.detach(),
                                       signals=ReverseKL(*(x.detach() for x in res.signals)))
        self._record_metrics(res)
        return (res.loss, student_outputs) if return_outputs else res.loss

    def _record_metrics(self, res: GKDLoss) -> None:
        # Sums and counts gathered over ranks, averaged over the logging
        # interval by SFTTrainer.log (the same mechanism as its entropy metric).
        mode = "train" if self.model.training else "eval"
        m = res.mask
        sig = res.signals
        with torch.no_grad():
            vals = [m.sum(), (sig.kl.detach() * m).sum(), (sig.student_entropy.detach() * m).sum(),
                    (sig.teacher_entropy.detach() * m).sum()]
            if res.fire is not None:
                nonempty = m.any(-1)
                vals += [(res.fire.keep & nonempty).sum(), nonempty.sum()]
            t = self.accelerator.gather_for_metrics(torch.stack([v.double() for v in vals])[None])
            t = t.reshape(-1, len(vals)).sum(0)
        n = max(float(t[0]), 1.0)
        self._metrics[mode]["pyopd/kl"].append(float(t[1]) / n)
        self._metrics[mode]["pyopd/student_entropy"].append(float(t[2]) / n)
        self._metrics[mode]["pyopd/teacher_entropy"].append(float(t[3]) / n)
        if res.fire is not None:
            self._metrics[mode]["pyopd/keep_ratio"].append(float(t[4]) / max(float(t[5]), 1.0))
