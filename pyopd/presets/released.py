"""The `released` preset: what the official FiRe-OPD and COPSD code computes, vectorised.

pyopd's default (`paper`) preset follows the papers' equations and takes every
batch-level statistic once over the whole rollout batch. The authors' released
verl forks differ in several places (docs/presets.md lists each difference
with the file and commit it was read from). The functions here reproduce the
released behaviour on whole [B, T] batches, so a trainer can switch presets
without changing how it calls them:

- FiRe-OPD (`fire_signals_released`, `fire_opd_loss_released`): the filter
  quantile, the entropy maxima and the weight mean are taken PER MICRO-BATCH
  (the official loss function runs once per micro-batch of one rank), with
  `torch.quantile`'s linear interpolation, one ranking and one max H_t over all
  teachers, empty rollouts scored 0 and counted. With the shipped scripts'
  micro-batch of one rollout the filter keeps everything and each rollout's
  weights are normalised by its own maxima and mean.
- Aggregation (`aggregate_released`): a token mean per micro-batch, each
  weighted by its share of the mini-batch's rows (verl's gradient-accumulation
  scale), plus verl's 1e-8 in the divisor.
- The official OPD baseline (`opd_loss_released`): dual-clip PPO (c = 3) times
  truncated rollout importance weights (`rollout_is_weights_released`).
- COPSD (`group_advantages_released`, `k3_kl_released`, `copsd_loss_released`):
  group std with Bessel's correction (1.0 for a group of one token), NaN
  advantages for groups without a valid token, k3 KL clamped to [-10, 10].

Micro-batches: `micro_batch` is either an int (consecutive chunks of that many
rows, as verl's `DataProto.split(ppo_micro_batch_size_per_gpu)` cuts one rank's
mini-batch) or a [B] int tensor giving each row's micro-batch (any partition:
dynamic batch sizes, or several ranks' micro-batches in one call). Micro-batches
never span ranks in the official code, so nothing here talks to
torch.distributed except `group_advantages_released`, whose statistics the
official driver takes over the whole batch.

Where the official code would produce a NaN gradient from a NaN sitting at a
position that is masked out of the loss (a NaN teacher log-prob on a dropped
rollout, the NaN advantages of an all-empty group), the losses here zero the
masked positions first: the loss value is the official one, the gradient stays
finite. docs/presets.md says so.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch

from pyopd.ops import GroupAdvantages, group_advantages

__all__ = [
    "ReleasedFireSignals",
    "aggregate_released",
    "copsd_loss_released",
    "copsd_rewards_released",
    "fire_opd_loss_released",
    "fire_signals_released",
    "group_advantages_released",
    "k3_kl_released",
    "micro_batch_ids",
    "opd_loss_released",
    "ppo_token_loss_released",
    "released_denominator",
    "rollout_is_weights_released",
]

MicroBatch = Union[int, torch.Tensor]

# verl's masked_mean divides by (count + 1e-8); kept so that losses match to the last digit.
_VERL_EPS = 1e-8
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---- argument checks ----------------------------------------------------------------


def _check_2d(name: str, x, like: Optional[torch.Tensor] = None, like_name: str = "") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if like is None:
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape (batch, seqlen), got {tuple(x.shape)}")
        return
    if x.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but {like_name} is on {like.device}")


def _mask(mask: Optional[torch.Tensor], like: torch.Tensor, like_name: str) -> torch.Tensor:
    """[B, T] bool (nonzero = valid); None = all valid."""
    if mask is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.shape != like.shape:
        raise ValueError(f"mask must have the shape of {like_name} {tuple(like.shape)}, got {tuple(mask.shape)}")
    if mask.device != like.device:
        raise ValueError(f"mask is on {mask.device} but {like_name} is on {like.device}")
    return mask if mask.dtype == torch.bool else mask != 0


def _number(name: str, v, *, lo: Optional[float] = None, lo_open: bool = False,
            hi: Optional[float] = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {v}")
    return v


def _rows(name: str, x, B: int, device: torch.device, *, kind: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if kind == "int" and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if kind == "float" and not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if kind == "bool" and x.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {x.dtype}")
    if x.dim() != 1 or x.shape[0] != B:
        raise ValueError(f"{name} must have shape ({B},) (one entry per rollout), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the per-token tensors are on {device}")


def _select(name: str, x: torch.Tensor, teacher_index: Optional[torch.Tensor], B: Optional[int]) -> torch.Tensor:
    """x as is for [B, T]; x[teacher_index[i], i] for [K, B, T] (each rollout's own teacher)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 2:
        return x
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (batch, seqlen) or (teachers, batch, seqlen), got {tuple(x.shape)}")
    if teacher_index is None:
        raise ValueError(f"{name} has shape (teachers, batch, seqlen) {tuple(x.shape)}: pass teacher_index")
    B = x.shape[1] if B is None else B
    if x.shape[1] != B:
        raise ValueError(f"{name} must have shape (teachers, {B}, seqlen), got {tuple(x.shape)}")
    _rows("teacher_index", teacher_index, B, x.device, kind="int")
    idx = teacher_index.to(torch.int64)
    if B and (int(idx.min()) < 0 or int(idx.max()) >= x.shape[0]):
        raise ValueError(f"teacher_index must lie in [0, {x.shape[0]}) for {name} of {x.shape[0]} teachers")
    return x[idx, torch.arange(B, device=x.device)]


def _floats(d: dict) -> dict[str, float]:
    return {k: float(v) for k, v in d.items()}


# ---- micro-batches ------------------------------------------------------------------


def micro_batch_ids(micro_batch: MicroBatch, B: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's micro-batch, relabelled 0..M-1, and the rows of each micro-batch.

    Args:
        micro_batch: int n (rows [0, n) are micro-batch 0, [n, 2n) micro-batch 1, ...,
            the last one may be shorter) or a [B] integer tensor of micro-batch ids.

    Returns:
        (ids [B] int64 in [0, M), rows [M] int64).
    """
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, (int, torch.Tensor)):
        raise TypeError(f"micro_batch must be an int (rows per micro-batch) or a [B] int tensor, "
                        f"got {type(micro_batch).__name__}")
    if isinstance(micro_batch, int):
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1 rows, got {micro_batch}")
        ids = torch.arange(B, device=device) // micro_batch
    else:
        _rows("micro_batch", micro_batch, B, device, kind="int")
        ids = torch.unique(micro_batch.to(torch.int64), return_inverse=True)[1] if B else micro_batch.to(torch.int64)
    M = int(ids.max()) + 1 if B else 0
    return ids, torch.bincount(ids, minlength=M)


def _segment_sum(x: torch.Tensor, ids: torch.Tensor, M: int) -> torch.Tensor:
    return torch.zeros(M, dtype=x.dtype, device=x.device).index_add(0, ids, x)


def _segment_max(x: torch.Tensor, ids: torch.Tensor, M: int) -> torch.Tensor:
    """max of x per segment (-inf for none), NaN if the segment holds a NaN (as torch.max does)."""
    out = torch.full((M,), -math.inf, dtype=x.dtype, device=x.device)
    out = out.scatter_reduce(0, ids, torch.nan_to_num(x, nan=-math.inf), "amax", include_self=True)
    nan = _segment_sum(x.isnan().to(torch.int64), ids, M) > 0
    return torch.where(nan, torch.full_like(out, math.nan), out)


def _segment_quantile(score: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(score[ids == m], q) for every micro-batch m, as [M] in score's dtype.

    Micro-batches of equal size go through one batched torch.quantile call (there
    are few distinct sizes: one for fixed micro-batches, plus the last one).
    """
    M = rows.numel()
    thr = torch.empty(M, dtype=score.dtype, device=score.device)
    if M == 0:
        return thr
    order = torch.sort(ids, stable=True).indices  # rows grouped by micro-batch, in order
    start = torch.cumsum(rows, 0) - rows
    for s in torch.unique(rows).tolist():
        mbs = (rows == s).nonzero().squeeze(1)
        pos = start[mbs].unsqueeze(1) + torch.arange(s, device=ids.device)
        thr[mbs] = torch.quantile(score[order[pos]], q, dim=1)
    return thr


# ---- aggregation --------------------------------------------------------------------


def aggregate_released(
    per_token_loss: torch.Tensor,
    mask: Optional[torch.Tensor],
    micro_batch: MicroBatch,
    *,
    batch_rows: Optional[int] = None,
) -> torch.Tensor:
    """The scalar whose gradient verl's update step applies: sum_m (b_m / B) * token-mean_m.

    per_token_loss: [N, T]; mask: [N, T] positions that count (None = all);
    token-mean_m = sum over micro-batch m's masked positions / (their count + 1e-8);
    b_m = rows of micro-batch m; B = `batch_rows`, the rows of the mini-batch
    (default: N, the call holds the whole mini-batch of one rank; with equal
    shards per rank, the ranks' gradient average gives the same formula over
    all ranks' rows). To call once per micro-batch, pass that micro-batch's rows
    with micro_batch=N and batch_rows=B: the calls then sum to the whole-batch
    value. For equal micro-batches this is the mean of per-micro-batch token
    means. Masked positions are never read (NaN there is ignored). Differentiable.
    """
    _check_2d("per_token_loss", per_token_loss)
    m = _mask(mask, per_token_loss, "per_token_loss")
    N = per_token_loss.shape[0]
    if batch_rows is None:
        B = N
    elif isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < max(N, 1):
        raise ValueError(f"batch_rows must be an int >= the rows of the call ({N}), got {batch_rows!r}")
    else:
        B = batch_rows
    ids, rows = micro_batch_ids(micro_batch, N, per_token_loss.device)
    M = rows.numel()
    zero = torch.zeros((), dtype=per_token_loss.dtype, device=per_token_loss.device)
    num = _segment_sum(torch.where(m, per_token_loss, zero).sum(-1), ids, M)
    cnt = _segment_sum(m.sum(-1).to(per_token_loss.dtype), ids, M)
    return ((rows.to(per_token_loss.dtype) / max(B, 1)) * num / (cnt + _VERL_EPS)).sum()


def released_denominator(loss_mask: torch.Tensor, batch_rows: int) -> float:
    """`denominator` that makes pyopd's token-mean losses (`agg="token-mean"`) on ONE
    micro-batch give that micro-batch's released term (b_m / B) * token-mean_m.

    loss_mask: [b_m, T] positions of the micro-batch that enter the loss (for
    FiRe-OPD: mask & keep); batch_rows: B, the rows of the mini-batch. Summing the
    micro-batch losses then equals `aggregate_released` on the whole batch.
    """
    if not isinstance(loss_mask, torch.Tensor) or loss_mask.dim() != 2:
        raise ValueError("loss_mask must be a [micro_rows, T] tensor")
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < loss_mask.shape[0]:
        raise ValueError(f"batch_rows must be an int >= the micro-batch's rows {loss_mask.shape[0]}, got {batch_rows!r}")
    if loss_mask.shape[0] == 0:
        raise ValueError("loss_mask has no rows: an empty micro-batch has no loss term")
    n = float((loss_mask != 0).sum())
    return (n + _VERL_EPS) * batch_rows / loss_mask.shape[0]


# ---- PPO ----------------------------------------------------------------------------


def ppo_token_loss_released(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_ratio: float = 0.2,
    clip_ratio_low: Optional[float] = None,
    clip_ratio_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-token [B, T] verl PPO loss: ratio = exp(clamp(logp - logp_old, -20, 20)),
    l = max(-A ratio, -A clip(ratio, 1 - lo, 1 + hi)); with `dual_clip` c,
    l = min(l, -c A) where A < 0; then times `rollout_is_weights` (detached) when given.
    The FiRe-OPD loss uses no dual clip and no IS weights; verl's vanilla loss
    (the OPD baseline, COPSD) always applies dual clip c = 3."""
    _check_2d("logprob", logprob)
    _check_2d("old_logprob", old_logprob, logprob, "logprob")
    _check_2d("advantages", advantages, logprob, "logprob")
    eps = _number("clip_ratio", clip_ratio, lo=0.0)
    lo = eps if clip_ratio_low is None else _number("clip_ratio_low", clip_ratio_low, lo=0.0, hi=1.0)
    hi = eps if clip_ratio_high is None else _number("clip_ratio_high", clip_ratio_high, lo=0.0)
    adv = advantages.detach()
    ratio = torch.exp(torch.clamp(logprob - old_logprob.detach(), min=-20.0, max=20.0))
    loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - lo, 1.0 + hi))
    if dual_clip is not None:
        c = _number("dual_clip", dual_clip, lo=1.0, lo_open=True)
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * c), loss)
    if rollout_is_weights is not None:
        _check_2d("rollout_is_weights", rollout_is_weights, logprob, "logprob")
        loss = loss * rollout_is_weights.detach()
    return loss


def rollout_is_weights_released(
    old_logprob: torch.Tensor,
    rollout_logprob: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    threshold: float = 5.0,
    level: str = "token",
) -> torch.Tensor:
    """Truncated rollout importance weights of the official OPD baseline, [B, T], detached.

    old_logprob: [B, T] log-probs of the training engine before the update (verl's
    recomputed `old_log_probs`); rollout_logprob: [B, T] the inference engine's
    (vLLM) log-probs of the same tokens. level "token" (the shipped setting):
    w = min(exp(clamp(old - rollout, -20, 20)), threshold); "sequence": one weight
    per row from the masked sum of the log ratios, clamped and truncated the same
    way. 0 at masked positions. Computed once per batch by the driver.
    """
    _check_2d("old_logprob", old_logprob)
    _check_2d("rollout_logprob", rollout_logprob, old_logprob, "old_logprob")
    m = _mask(mask, old_logprob, "old_logprob")
    thr = _number("threshold", threshold, lo=0.0, lo_open=True)
    d = old_logprob.detach() - rollout_logprob.detach()
    if level == "token":
        logw = torch.clamp(d, -20.0, 20.0)
    elif level == "sequence":
        s = torch.where(m, d, torch.zeros((), dtype=d.dtype, device=d.device)).sum(-1, keepdim=True)
        logw = torch.clamp(s, -20.0, 20.0).expand_as(d)
    else:
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
    w = torch.where(m, torch.exp(logw), torch.zeros((), dtype=d.dtype, device=d.device))
    return torch.clamp(w, max=thr)


# ---- FiRe-OPD -----------------------------------------------------------------------


class ReleasedFireSignals(NamedTuple):
    """The released FiRe-OPD filter and weights of a batch, with per-micro-batch statistics."""

    keep: torch.Tensor  # [B] bool: score >= its micro-batch's threshold
    weight: torch.Tensor  # [B, T] detached; 0 at masked positions and on dropped rollouts
    score: torch.Tensor  # [B] mean teacher log-prob over valid tokens (0 for an empty rollout)
    threshold: torch.Tensor  # [M] torch.quantile of each micro-batch's scores
    micro_batch: torch.Tensor  # [B] int64 micro-batch of each row (0..M-1)
    max_teacher_entropy: torch.Tensor  # [M] the H_t normaliser of each micro-batch (all teachers)
    max_student_entropy: torch.Tensor  # [M] the H_s normaliser of each micro-batch
    metrics: dict  # plain floats: keep_ratio, num_kept, score_mean, weight_mean/min/max (kept tokens)


def fire_signals_released(
    teacher_logprob: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    teacher_entropy: torch.Tensor,
    student_entropy: torch.Tensor,
    micro_batch: MicroBatch,
    p: float = 20.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    teacher_index: Optional[torch.Tensor] = None,
    num_teachers: Optional[int] = None,
) -> ReleasedFireSignals:
    """The released FiRe-OPD filter and token weights, per micro-batch.

    Args:
        teacher_logprob, teacher_entropy: [B, T], or [K, B, T] with `teacher_index`
            [B] picking each rollout's teacher.
        student_entropy: [B, T] H_s.
        mask: [B, T] response mask; None = all valid.
        micro_batch: the micro-batches of one rank's mini-batch (see the module doc).
            Every statistic below is taken within one micro-batch of one rank, as the
            official loss runs per micro-batch; no torch.distributed communication.
        p: percentile of the filter in [0, 100]; alpha, beta >= 0.
        num_teachers: accepted for signature parity with `fire_opd_signals`; the
            released code ranks all teachers' rollouts together, so it changes nothing.

    Per micro-batch: S_i = sum_t m log q / max(n_i, 1) (an empty rollout scores 0
    and counts); threshold = torch.quantile(S, p / 100) (linear
    interpolation; NaN if any S is NaN, which then drops the whole micro-batch);
    keep = S_i >= threshold. max H_t and max H_s over every valid token of the
    micro-batch (dropped rollouts included), clamped at >= 1e-6, 1.0 when it
    has no valid token; w = (1 + alpha clamp(1 - H_t / max H_t, 0, 1))
    (1 + beta clamp(H_s / max H_s, 0, 1)) divided by its mean over the same
    tokens (mean clamped at >= 1e-6).
    """
    _check_2d("student_entropy", student_entropy)
    B, T = student_entropy.shape
    dev = student_entropy.device
    lq = _select("teacher_logprob", teacher_logprob, teacher_index, B).detach()
    ht = _select("teacher_entropy", teacher_entropy, teacher_index, B).detach()
    _check_2d("teacher_logprob", lq, student_entropy, "student_entropy")
    _check_2d("teacher_entropy", ht, student_entropy, "student_entropy")
    if num_teachers is not None and (isinstance(num_teachers, bool) or not isinstance(num_teachers, int)
                                     or num_teachers < 1):
        raise ValueError(f"num_teachers must be a positive int, got {num_teachers!r}")
    valid = _mask(mask, student_entropy, "student_entropy")
    p = _number("p", p, lo=0.0, hi=100.0)
    alpha = _number("alpha", alpha, lo=0.0)
    beta = _number("beta", beta, lo=0.0)
    ids, rows = micro_batch_ids(micro_batch, B, dev)
    M = rows.numel()
    dtype = torch.float64 if torch.float64 in (lq.dtype, ht.dtype, student_entropy.dtype) else torch.float32
    lq, ht, hs = lq.to(dtype), ht.to(dtype), student_entropy.detach().to(dtype)
    zero = torch.zeros((), dtype=dtype, device=dev)

    # Filter: per micro-batch quantile of the length-normalised scores. The released code
    # casts them to float32 first (a no-op on its float32 inputs); float64 stays float64
    # here, since rounding would drop rollouts sitting exactly on the threshold.
    length = valid.sum(-1)
    score = torch.where(valid, lq, zero).sum(-1) / length.clamp(min=1).to(dtype)
    thr = _segment_quantile(score, ids, rows, p / 100.0)
    keep = score >= thr[ids]  # NaN threshold or score: dropped

    # Normalisers over all valid tokens of the micro-batch, dropped rollouts included.
    has_tok = _segment_sum(length, ids, M) > 0
    ninf = torch.full((), -math.inf, dtype=dtype, device=dev)

    def seg_max(x: torch.Tensor) -> torch.Tensor:
        # amax propagates a NaN at a valid position, as the released torch.max does
        row = torch.where(valid, x, ninf).amax(-1) if T else torch.full((B,), -math.inf, dtype=dtype, device=dev)
        mx = _segment_max(row, ids, M)
        return torch.where(has_tok, torch.clamp(mx, min=1e-6), torch.ones_like(mx))

    max_t, max_s = seg_max(ht), seg_max(hs)
    conf = torch.clamp(1.0 - ht / max_t[ids].unsqueeze(1), 0.0, 1.0)
    confu = torch.clamp(hs / max_s[ids].unsqueeze(1), 0.0, 1.0)
    w = (1.0 + alpha * conf) * (1.0 + beta * confu)
    wsum = _segment_sum(torch.where(valid, w, zero).sum(-1), ids, M)
    wmean = wsum / _segment_sum(length, ids, M).clamp(min=1).to(dtype)
    w = w / torch.clamp(wmean, min=1e-6)[ids].unsqueeze(1)
    live = valid & keep.unsqueeze(1)
    weight = torch.where(live, w, zero)

    kept_w = weight[live]
    metrics = {
        "keep_ratio": keep.to(torch.float64).mean() if B else 0.0,
        "num_kept": keep.sum(),
        "score_mean": score.to(torch.float64).mean() if B else 0.0,
        "weight_mean": kept_w.mean() if kept_w.numel() else 0.0,
        "weight_min": kept_w.min() if kept_w.numel() else 0.0,
        "weight_max": kept_w.max() if kept_w.numel() else 0.0,
    }
    return ReleasedFireSignals(
        keep=keep, weight=weight, score=score, threshold=thr, micro_batch=ids,
        max_teacher_entropy=max_t, max_student_entropy=max_s, metrics=_floats(metrics),
    )


def fire_opd_loss_released(
    logprob: torch.Tensor,
    old_logprob: Optional[torch.Tensor],
    teacher_logprob: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    keep: torch.Tensor,
    weight: torch.Tensor,
    micro_batch: MicroBatch,
    batch_rows: Optional[int] = None,
    teacher_index: Optional[torch.Tensor] = None,
    clip_ratio: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The released FiRe-OPD loss of a whole mini-batch: A = w (log q - log p_old) on kept
    rollouts, plain PPO clip (no dual clip, no rollout IS weights: the released FiRe path
    ignores them), `aggregate_released` over mask & keep.

    logprob: [B, T] with grad; old_logprob: [B, T] or None (= logprob.detach(), verl's
    on-policy case); teacher_logprob: [B, T] or [K, B, T] with teacher_index; keep [B]
    and weight [B, T] from `fire_signals_released` with the same `micro_batch`.
    `batch_rows`: see `aggregate_released` (for calls on one micro-batch's slices).
    """
    _check_2d("logprob", logprob)
    B = logprob.shape[0]
    old = logprob.detach() if old_logprob is None else old_logprob.detach()
    _check_2d("old_logprob", old, logprob, "logprob")
    lq = _select("teacher_logprob", teacher_logprob, teacher_index, B).detach()
    _check_2d("teacher_logprob", lq, logprob, "logprob")
    _rows("keep", keep, B, logprob.device, kind="bool")
    _check_2d("weight", weight, logprob, "logprob")
    live = _mask(mask, logprob, "logprob") & keep.unsqueeze(1)
    zero = torch.zeros((), dtype=old.dtype, device=old.device)
    # Positions outside the loss get A = 0, so a NaN there cannot reach the gradient.
    adv = torch.where(live, weight.detach().to(old.dtype) * (lq.to(old.dtype) - old), zero)
    per_tok = ppo_token_loss_released(logprob, old, adv, clip_ratio=clip_ratio)
    loss = aggregate_released(per_tok, live, micro_batch, batch_rows=batch_rows)
    return loss, _floats({"loss": loss.detach(), "num_tokens": live.sum(),
                          "keep_ratio": keep.to(torch.float64).mean() if B else 0.0})


# ---- the official OPD baseline ------------------------------------------------------


def opd_loss_released(
    logprob: torch.Tensor,
    old_logprob: Optional[torch.Tensor],
    teacher_logprob: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    micro_batch: MicroBatch,
    batch_rows: Optional[int] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    clip_ratio: float = 0.2,
    dual_clip: Optional[float] = 3.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The official OPD baseline: A = log q - log p_old, verl's vanilla PPO loss with
    dual clip 3, times `rollout_is_weights` ([B, T] from `rollout_is_weights_released`,
    threshold 5 in the shipped script; None = no correction), `aggregate_released`.

    With one update per batch (old = current log-probs, the shipped setting) the
    ratio is 1 and the clips never bind; only the IS weights change the gradient.
    """
    _check_2d("logprob", logprob)
    old = logprob.detach() if old_logprob is None else old_logprob.detach()
    _check_2d("old_logprob", old, logprob, "logprob")
    _check_2d("teacher_logprob", teacher_logprob, logprob, "logprob")
    m = _mask(mask, logprob, "logprob")
    zero = torch.zeros((), dtype=old.dtype, device=old.device)
    adv = torch.where(m, teacher_logprob.detach().to(old.dtype) - old, zero)
    isw = None if rollout_is_weights is None else torch.where(m, rollout_is_weights.detach().to(old.dtype), zero)
    per_tok = ppo_token_loss_released(logprob, old, adv, clip_ratio=clip_ratio, dual_clip=dual_clip,
                                      rollout_is_weights=isw)
    loss = aggregate_released(per_tok, m, micro_batch, batch_rows=batch_rows)
    return loss, _floats({"loss": loss.detach(), "num_tokens": m.sum()})


# ---- COPSD --------------------------------------------------------------------------


def copsd_rewards_released(
    teacher_logprob: torch.Tensor,
    rollout_logprob: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    clip_low: float = -3.0,
    clip_high: float = 5.0,
    bonus: float = 0.02,
) -> torch.Tensor:
    """COPSD's dense reward [B, T]: clamp(log q - log p_rollout, -3, 5) + 0.02 at valid
    tokens, 0 elsewhere. The released code takes the student side from the inference
    engine's rollout log-probs, not the recomputed old log-probs."""
    _check_2d("teacher_logprob", teacher_logprob)
    _check_2d("rollout_logprob", rollout_logprob, teacher_logprob, "teacher_logprob")
    m = _mask(mask, teacher_logprob, "teacher_logprob")
    lo, hi = _number("clip_low", clip_low), _number("clip_high", clip_high)
    if not lo < hi:
        raise ValueError(f"clip_low must be < clip_high, got {lo} and {hi}")
    r = torch.clamp(teacher_logprob.detach() - rollout_logprob.detach(), lo, hi) + _number("bonus", bonus)
    return torch.where(m, r, torch.zeros((), dtype=r.dtype, device=r.device))


def group_advantages_released(
    teacher_logprob: torch.Tensor,
    student_logprob: torch.Tensor,
    mask: Optional[torch.Tensor],
    group_index: torch.Tensor,
    *,
    clip_low: float = -3.0,
    clip_high: float = 5.0,
    bonus: float = 0.02,
    eps: float = 1e-6,
    outcome_rows: Optional[torch.Tensor] = None,
    outcome_score: Optional[torch.Tensor] = None,
    process_group=None,
    sync: Optional[bool] = None,
) -> GroupAdvantages:
    """COPSD group advantages as released (same arguments as `pyopd.group_advantages`, plus the outcome rows).

    r = clamp(log q - log p, clip_low, clip_high) + bonus at valid tokens (pass the
    rollout engine's log-probs as `student_logprob` to match the released reward);
    the tokens of all rollouts of a group are pooled: mean, and std with Bessel's
    correction (torch.std), or 1.0 for a group of one token; A = (r - mean) / (std + eps)
    at valid tokens, 0 elsewhere, and NaN at EVERY position of a rollout whose group
    has no valid token (the released mean of no tokens). The released driver takes
    these statistics over the whole batch; here too (across ranks when
    torch.distributed is initialised, see `pyopd.group_advantages`).

    Outcome rows (the released code routes rollouts whose data source is listed in
    OPSDGATE_OUTCOME_SOURCES to a judge): `outcome_rows` [B] bool marks them and
    `outcome_score` [B] float holds their judge score (the released code uses -1 when
    the judge call fails). They leave the dense pool; per group, their scores get a
    scalar GRPO advantage (s - mean) / (std + eps) over the group's outcome rows (std
    ddof 1, 1.0 for a single row), written at every valid token. This path is
    single-process: it raises when the statistics would have to span ranks.

    Returns GroupAdvantages; group_std is the Bessel-corrected std (1.0 as above);
    for outcome rows reward_mean is the score and group_mean / group_std / group_count
    describe the group's outcome rows.
    """
    m = _mask(mask, teacher_logprob, "teacher_logprob")
    B = m.shape[0]
    if (outcome_rows is None) != (outcome_score is None):
        raise ValueError("pass outcome_rows and outcome_score together")
    if outcome_rows is not None:
        _rows("outcome_rows", outcome_rows, B, m.device, kind="bool")
        _rows("outcome_score", outcome_score, B, m.device, kind="float")
        import torch.distributed as dist

        multi_rank = sync is not False and dist.is_available() and dist.is_initialized() and \
            dist.get_world_size(process_group) > 1
        if multi_rank and bool(outcome_rows.any()):
            raise NotImplementedError("outcome rows across ranks: call group_advantages_released on the gathered "
                                      "batch (the released driver does) or pass sync=False")
        dense_mask = m & ~outcome_rows.unsqueeze(1)
    else:
        dense_mask = m
    pooled = group_advantages(
        teacher_logprob, student_logprob, dense_mask, group_index, clip_low=clip_low, clip_high=clip_high,
        bonus=bonus, eps=eps, process_group=process_group, sync=sync,
    )
    dtype = pooled.advantage.dtype
    r = torch.clamp(teacher_logprob.detach().to(torch.float64) - student_logprob.detach().to(torch.float64),
                    float(clip_low), float(clip_high)) + float(bonus)
    n = pooled.group_count.to(torch.float64)
    # The kernel pools population moments; rescale to ddof 1 (exact: n / (n - 1) of the variance).
    std = torch.where(n > 1, pooled.group_std * torch.sqrt(n / (n - 1).clamp(min=1)), torch.ones_like(n))
    adv = torch.where(m, (r - pooled.group_mean.unsqueeze(1)) / (std + eps).unsqueeze(1), torch.zeros_like(r))
    adv = torch.where((n == 0).unsqueeze(1), torch.full_like(adv, math.nan), adv)
    reward_mean, group_mean, count = pooled.reward_mean, pooled.group_mean, pooled.group_count
    if outcome_rows is not None and bool(outcome_rows.any()):
        o = outcome_rows
        sc = outcome_score.detach().to(torch.float64)
        inv = torch.unique(group_index.to(torch.int64), return_inverse=True)[1]
        G = int(inv.max()) + 1
        ones = o.to(torch.float64)
        n_o = _segment_sum(ones, inv, G)
        mean_o = _segment_sum(torch.where(o, sc, torch.zeros_like(sc)), inv, G) / n_o.clamp(min=1)
        dev = torch.where(o, sc - mean_o[inv], torch.zeros_like(sc))
        var_o = _segment_sum(dev * dev, inv, G) / (n_o - 1).clamp(min=1)
        std_o = torch.where(n_o > 1, var_o.sqrt(), torch.ones_like(var_o))
        a_o = (sc - mean_o[inv]) / (std_o[inv] + eps)
        adv = torch.where(o.unsqueeze(1), torch.where(m, a_o.unsqueeze(1), torch.zeros_like(adv)), adv)
        reward_mean = torch.where(o, sc, reward_mean)
        group_mean = torch.where(o, mean_o[inv], group_mean)
        std = torch.where(o, std_o[inv], std)
        count = torch.where(o, n_o[inv].to(torch.int64), count)
    return GroupAdvantages(advantage=adv.to(dtype), reward_mean=reward_mean,
                           group_mean=group_mean, group_std=std, group_count=count)


def k3_kl_released(logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    """verl's "low_var_kl": d = clamp(log r - log pi, -20, 20), clamp(exp(d) - d - 1, -10, 10).
    The upper clamp cuts the gradient of tokens whose k3 exceeds 10. Differentiable in logprob."""
    d = torch.clamp(ref_logprob.detach() - logprob, min=-20.0, max=20.0)
    return torch.clamp(torch.exp(d) - d - 1.0, min=-10.0, max=10.0)


def copsd_loss_released(
    logprob: torch.Tensor,
    old_logprob: Optional[torch.Tensor],
    mask: Optional[torch.Tensor] = None,
    *,
    micro_batch: MicroBatch,
    batch_rows: Optional[int] = None,
    advantages: Optional[torch.Tensor] = None,
    teacher_logprob: Optional[torch.Tensor] = None,
    group_index: Optional[torch.Tensor] = None,
    rollout_logprob: Optional[torch.Tensor] = None,
    ref_logprob: Optional[torch.Tensor] = None,
    kl_coef: float = 0.005,
    reward_clip: tuple[float, float] = (-3.0, 5.0),
    reward_bonus: float = 0.02,
    adv_eps: float = 1e-6,
    clip_ratio: float = 0.2,
    dual_clip: Optional[float] = 3.0,
    rollout_is_weights: Optional[torch.Tensor] = None,
    process_group=None,
    sync: Optional[bool] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The released COPSD actor loss (the arguments of `pyopd.losses.copsd_loss`, keyword-only
    past `mask`, plus `micro_batch`; the trainer already calls it as (logprob, old, mask, ...)).

    Vanilla PPO (dual clip 3) on the group advantages + kl_coef * `k3_kl_released` to
    `ref_logprob`, each a token mean per micro-batch, combined by `aggregate_released`
    (`batch_rows` as there). Advantages: `advantages` [B, T] precomputed on the whole
    batch with `group_advantages_released` (the micro-batch path), or computed here from
    `teacher_logprob` and `group_index` with the reward's student side taken from
    `rollout_logprob` (the inference engine's log-probs, as released; default
    old_logprob). NaN advantages at masked positions are ignored (see the module doc).
    """
    _check_2d("logprob", logprob)
    old = logprob.detach() if old_logprob is None else old_logprob.detach()
    _check_2d("old_logprob", old, logprob, "logprob")
    m = _mask(mask, logprob, "logprob")
    kl_coef = _number("kl_coef", kl_coef, lo=0.0)
    metrics: dict = {}
    if advantages is None:
        if teacher_logprob is None or group_index is None:
            raise ValueError("copsd_loss_released needs teacher_logprob and group_index, or precomputed advantages")
        if not (isinstance(reward_clip, (tuple, list)) and len(reward_clip) == 2):
            raise ValueError(f"reward_clip must be a (low, high) pair, got {reward_clip!r}")
        student = old if rollout_logprob is None else rollout_logprob
        _check_2d("rollout_logprob", student, logprob, "logprob")
        ga = group_advantages_released(
            teacher_logprob, student, m, group_index, clip_low=reward_clip[0], clip_high=reward_clip[1],
            bonus=reward_bonus, eps=adv_eps, process_group=process_group, sync=sync,
        )
        advantages = ga.advantage
        metrics["group_std_mean"] = ga.group_std[m.any(-1)].mean() if bool(m.any()) else 0.0
    elif group_index is not None:
        raise ValueError("pass either advantages or group_index, not both")
    _check_2d("advantages", advantages, logprob, "logprob")
    zero = torch.zeros((), dtype=old.dtype, device=old.device)
    adv = torch.where(m, advantages.detach().to(old.dtype), zero)
    per_tok = ppo_token_loss_released(logprob, old, adv, clip_ratio=clip_ratio, dual_clip=dual_clip,
                                      rollout_is_weights=rollout_is_weights)
    metrics["num_tokens"] = m.sum()
    if ref_logprob is not None:
        _check_2d("ref_logprob", ref_logprob, logprob, "logprob")
        # Both terms are token means over the same micro-batch, so they aggregate as one.
        per_tok = per_tok + kl_coef * k3_kl_released(logprob, ref_logprob.to(logprob.dtype))
    loss = aggregate_released(per_tok, m, micro_batch, batch_rows=batch_rows)
    metrics["loss"] = loss.detach()
    return loss, _floats(metrics)
