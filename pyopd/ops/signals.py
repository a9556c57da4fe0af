"""Trajectory scores, FiRe-OPD soft token weights and COPSD group advantages.

All three take cheap [B, T] per-token tensors (B rollouts, T response
positions; e.g. the fields of `pyopd.reverse_kl`) and a response mask, and
are meant to be called ONCE on the whole rollout batch, before it is split
into micro-batches for the update: the filter, the weight normalisers and the
group statistics are batch-level quantities, and computing them per
micro-batch silently changes the algorithm (a p% filter over a micro-batch of
one rollout never drops anything). Slice the results per micro-batch instead.

Work split: the C++/CUDA kernels make one pass over the [B, T] tensors (one
thread block per row, reductions in float64) and produce per-row values; what
needs the whole batch (the quantile, maxima, group pooling) is a reduction over
[B] values done here with a few small torch ops. With `torch.distributed`
initialised those [B] values are all-gathered, so the result does not depend on
how the batch is split across ranks. Every call is then a collective: all
ranks of the group must make it, in the same order.

Masked positions (mask == 0) are never read into a result (NaN there is
ignored) and come out as 0; a NaN at a valid position propagates.

Each op is one `torch.library.custom_op` (pyopd::trajectory_scores,
pyopd::trajectory_filter, pyopd::fire_token_weights, pyopd::group_advantages)
that takes plain tensors and scalars, fills the kernels' parameter structs
inside its implementation and has a fake (meta) implementation, so the ops
trace with torch.compile(fullgraph=True), static or dynamic shapes. Checks on
the data (e.g. teacher_index < num_teachers) run inside the op, on the
concrete values, also under torch.compile. The cross-rank path is eager only:
under torch.compile it is a graph break, an error with fullgraph=True (pass
sync=False there).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from pyopd import _C, _checks
from pyopd.ops import distributed as _dist
from pyopd.ops.types import (
    FireWeights,
    GroupAdvantages,
    TrajectoryFilter,
    TrajectoryScores,
    num_to_drop,
)


__all__ = [
    "FireWeights",
    "GroupAdvantages",
    "TrajectoryFilter",
    "TrajectoryScores",
    "fire_token_weights",
    "group_advantages",
    "trajectory_filter",
    "trajectory_scores",
]

_NUM_TEACHERS_MAX = 2**31 - 1  # K sizes [K] outputs; a larger K is a mistake, not a batch

# ---- argument checks (shapes, dtypes, scalars: traceable; data checks run inside the ops) --


def _check_teacher_args(teacher_index, num_teachers, B: int, device: torch.device) -> None:
    if teacher_index is None:
        if num_teachers is not None and num_teachers != 1:
            raise ValueError("num_teachers needs teacher_index")
    else:
        _checks.per_row("teacher_index", teacher_index, B, device, kind="int")
    if num_teachers is not None:
        _checks.integer("num_teachers", num_teachers, lo=1, hi=_NUM_TEACHERS_MAX)


def _teachers(teacher_index: Optional[torch.Tensor], num_teachers: Optional[int], B: int, device,
              group) -> tuple[torch.Tensor, int]:
    """Validated teacher index [B] int64 and the teacher count K (agreed across ranks).

    Runs on concrete tensors (inside the custom ops, or the eager cross-rank path).
    """
    if num_teachers is not None:  # again on the concrete value (traced under torch.compile)
        num_teachers = _checks.integer("num_teachers", num_teachers, lo=1, hi=_NUM_TEACHERS_MAX)
    if teacher_index is None:
        return torch.zeros(B, dtype=torch.int64, device=device), 1
    t = teacher_index.to(torch.int64)
    lo = int(t.min()) if B else 0
    hi = int(t.max()) if B else -1
    if lo < 0:
        raise ValueError(f"teacher_index must be >= 0, got {lo}")
    if num_teachers is not None:
        if hi >= num_teachers:
            raise ValueError(f"teacher_index must be < num_teachers={num_teachers}, got {hi}")
        return t, num_teachers
    K = hi + 1
    if K > _NUM_TEACHERS_MAX:
        raise ValueError(f"teacher_index must be < {_NUM_TEACHERS_MAX + 1} (teacher ids count "
                         f"the teachers), got {hi}")
    if group is not None:  # every rank must agree on K
        k = torch.tensor([K], dtype=torch.int64, device=device)
        K = int(_dist.all_gather_rows(k, group)[0].max())
    return t, max(K, 1)


def _num_teachers_fake(teacher_index: Optional[torch.Tensor], num_teachers: Optional[int]):
    """K in a fake implementation: known, or an unbacked size (it depends on teacher_index's values)."""
    if teacher_index is None:
        return 1
    if num_teachers is not None:
        return num_teachers
    return torch.library.get_ctx().new_dynamic_size(min=1)


def _detach(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # The signal ops are not differentiable; detaching keeps autograd away from
    # the custom ops (which register no backward).
    return None if x is None else x.detach()


# ---- kernel plumbing ----------------------------------------------------------------
#
# Eager calls run the `_*_impl` functions directly (the op dispatcher costs
# ~0.1 ms a call); under torch.compile the public functions call the custom
# ops, whose implementations are the same functions.


def _dtype_tag(dtype: torch.dtype):
    return _C.DType.float64 if dtype == torch.float64 else _C.DType.float32


def _compute_dtype(*xs: Optional[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


def _rows(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, int]:
    """Detached [B, T] view with a contiguous last dim and row stride >= T, plus that stride."""
    x = x.detach()
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    B, T = x.shape
    if T > 1 and x.stride(1) != 1 or B > 1 and x.stride(0) < T:
        x = x.contiguous()
    return x, (x.stride(0) if B > 1 else T)


def _mask_rows(mask: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], int]:
    if mask is None:
        return None, 0
    m = mask.detach()
    if m.dtype != torch.bool:
        m = m != 0
    return _rows(m)


def _ptr(x: Optional[torch.Tensor]) -> int:
    return 0 if x is None else x.data_ptr()


def _launch(fn, params, device: torch.device) -> None:
    if params.rows == 0 or params.cols == 0:
        # Nothing to read (and torch gives empty tensors a null data_ptr): the
        # callers allocate their [B] outputs zeroed, which is the empty-row result.
        return
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        fn(params, index, torch.cuda.current_stream(index).cuda_stream)
    elif device.type == "cpu":
        fn(params, -1, 0)
    else:
        raise ValueError(f"pyopd signals run on CPU or CUDA tensors, got device {device}")


# ---- trajectory_scores --------------------------------------------------------------


def _filter_threshold(score: torch.Tensor, nonempty: torch.Tensor, teacher: torch.Tensor, K: int, p: float):
    """Vectorised quantile rule over [N] float64 scores; see trajectory_scores."""
    dev = score.device
    bucket = torch.where(nonempty, teacher, torch.full_like(teacher, K))  # empty rollouts: bucket K
    n = torch.bincount(bucket, minlength=K + 1)[:K]
    k = num_to_drop(p, n)
    inf = torch.full((K,), math.inf, dtype=torch.float64, device=dev)
    if score.numel() == 0:
        return -inf, n, k
    # sort by (bucket, score): ascending scores (NaN last), then a stable sort on the bucket
    order = torch.sort(score, stable=True).indices
    order = order[torch.sort(bucket[order], stable=True).indices]
    start = torch.cumsum(n, 0) - n
    kth = score[order][(start + k).clamp(max=score.numel() - 1)]  # the (k+1)-th smallest
    thr = torch.where(k == 0, -inf, torch.where(k >= n, inf, kth))
    return thr, n, k


def _filter(score: torch.Tensor, nonempty: torch.Tensor, teacher: torch.Tensor, K: int, p: float, group):
    s64 = score.to(torch.float64)
    if group is None:
        thr, n, k = _filter_threshold(s64, nonempty, teacher, K, p)
    else:
        # One float64 message per rollout: score, non-empty flag, teacher (exact below 2^53).
        rows = torch.stack([s64, nonempty.to(torch.float64), teacher.to(torch.float64)], dim=1)
        g = _dist.all_gather_rows(rows, group)
        thr, n, k = _filter_threshold(g[:, 0], g[:, 1] > 0, g[:, 2].to(torch.int64), K, p)
    keep = nonempty & ((k[teacher] == 0) | (s64 >= thr[teacher]))
    return TrajectoryFilter(keep=keep, threshold=thr, num_scored=n, num_dropped=k)


def _trajectory_scores_impl(teacher_logprob, mask, kl, teacher_entropy, student_entropy,
                            teacher_index, num_teachers, p, group) -> TrajectoryScores:
    p = _checks.percentage("p", p)  # again on the concrete value (traced under torch.compile)
    B, T = teacher_logprob.shape
    dev = teacher_logprob.device
    teacher, K = _teachers(teacher_index, num_teachers, B, dev, group)

    dtype = _compute_dtype(teacher_logprob, kl, teacher_entropy, student_entropy)
    prm = _C.TrajectoryStatsParams()
    prm.rows, prm.cols, prm.dtype = B, T, _dtype_tag(dtype)
    m, prm.mask_row_stride = _mask_rows(mask)
    prm.mask = _ptr(m)
    inputs = {}
    for name, x in (
        ("teacher_logprob", teacher_logprob),
        ("kl", kl),
        ("teacher_entropy", teacher_entropy),
        ("student_entropy", student_entropy),
    ):
        if x is not None:
            inputs[name], stride = _rows(x, dtype)
            setattr(prm, name, inputs[name].data_ptr())
            setattr(prm, f"{name}_row_stride", stride)
    length = torch.zeros(B, dtype=torch.int64, device=dev)
    out = {k: torch.zeros(B, dtype=dtype, device=dev) for k in ("score", "mean_kl", "mean_teacher_entropy", "mean_student_entropy")}
    prm.length = length.data_ptr()
    prm.score = out["score"].data_ptr()
    if kl is not None:
        prm.mean_kl = out["mean_kl"].data_ptr()
    if teacher_entropy is not None:
        prm.mean_teacher_entropy = out["mean_teacher_entropy"].data_ptr()
    if student_entropy is not None:
        prm.mean_student_entropy = out["mean_student_entropy"].data_ptr()
    _launch(_C.trajectory_stats, prm, dev)

    f = _filter(out["score"], length > 0, teacher, K, p, group)
    return TrajectoryScores(
        score=out["score"],
        keep=f.keep,
        threshold=f.threshold,
        length=length,
        mean_kl=out["mean_kl"],
        mean_teacher_entropy=out["mean_teacher_entropy"],
        mean_student_entropy=out["mean_student_entropy"],
        num_scored=f.num_scored,
        num_dropped=f.num_dropped,
    )


@torch.library.custom_op("pyopd::trajectory_scores", mutates_args=())
def _trajectory_scores_op(
    teacher_logprob: torch.Tensor,
    mask: Optional[torch.Tensor],
    kl: Optional[torch.Tensor],
    teacher_entropy: Optional[torch.Tensor],
    student_entropy: Optional[torch.Tensor],
    teacher_index: Optional[torch.Tensor],
    num_teachers: Optional[int],
    p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor]:
    """`trajectory_scores` of one process; the TrajectoryScores fields in order."""
    return tuple(_trajectory_scores_impl(teacher_logprob, mask, kl, teacher_entropy, student_entropy,
                                         teacher_index, num_teachers, p, None))


@_trajectory_scores_op.register_fake
def _(teacher_logprob, mask, kl, teacher_entropy, student_entropy, teacher_index, num_teachers, p):
    B = teacher_logprob.shape[0]
    K = _num_teachers_fake(teacher_index, num_teachers)
    dt = _compute_dtype(teacher_logprob, kl, teacher_entropy, student_entropy)
    x = teacher_logprob
    return (x.new_empty(B, dtype=dt), x.new_empty(B, dtype=torch.bool),
            x.new_empty(K, dtype=torch.float64), x.new_empty(B, dtype=torch.int64),
            x.new_empty(B, dtype=dt), x.new_empty(B, dtype=dt), x.new_empty(B, dtype=dt),
            x.new_empty(K, dtype=torch.int64), x.new_empty(K, dtype=torch.int64))


def trajectory_scores(
    teacher_logprob: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    kl: Optional[torch.Tensor] = None,
    teacher_entropy: Optional[torch.Tensor] = None,
    student_entropy: Optional[torch.Tensor] = None,
    p: float = 20.0,
    teacher_index: Optional[torch.Tensor] = None,
    num_teachers: Optional[int] = None,
    process_group=None,
    sync: Optional[bool] = None,
) -> TrajectoryScores:
    """Per-rollout quality scores and the FiRe-OPD low-quality filter.

    Args:
        teacher_logprob: [B, T] log q(y_t), the sample's teacher's log-prob of the sampled token.
        mask: [B, T] response mask (bool, or nonzero = valid); None = all valid.
        kl, teacher_entropy, student_entropy: optional [B, T] per-token reverse
            KL, H_t, H_s, averaged per rollout into the result (0 when absent).
        p: percentage of rollouts to drop, in [0, 100] (default 20).
        teacher_index: optional [B] int, the teacher of each rollout (multi-teacher).
            The filter is then applied per teacher: each teacher's rollouts are
            ranked against each other only (log-likelihoods of different
            teachers are not on one scale).
        num_teachers: K; default max(teacher_index) + 1 (over all ranks).
        process_group, sync: see the module doc; by default the threshold is
            taken over every rank's rollouts when torch.distributed is initialised.
            That cross-rank path runs eagerly only: under torch.compile it is
            a graph break, so torch.compile(fullgraph=True) with more than one
            rank fails (pass sync=False there, or call it outside the graph).

    Returns:
        TrajectoryScores: score [B] = S_i = sum_t m log q / sum_t m, keep [B],
        threshold [K], length [B], mean_kl / mean_teacher_entropy /
        mean_student_entropy [B], num_scored [K], num_dropped [K]. Float fields
        are float32 (float64 if any input is float64).

    The filter, per teacher: let n be the number of NON-EMPTY rollouts (length
    > 0) of the whole batch (all ranks) and k = floor(p * n / 100). The
    threshold is the (k+1)-th smallest score (-inf if k == 0, +inf if k == n),
    and a rollout is kept iff it is non-empty and S_i >= threshold (every
    non-empty rollout when k == 0). Without ties exactly k = floor(p% of n)
    rollouts are dropped and ceil((100 - p)% of n) kept; rollouts tied with the
    threshold are all kept (the decision depends on the score alone, never on
    order), so ties can only drop fewer. Unlike `torch.quantile` there is no
    interpolation. Empty rollouts have score 0, are never kept and do not count
    in n. A NaN score sorts above every number and is never kept when k > 0.
    """
    _checks.floating_2d("teacher_logprob", teacher_logprob)
    _checks.mask_like(mask, teacher_logprob, "teacher_logprob")
    for name, x in (("kl", kl), ("teacher_entropy", teacher_entropy), ("student_entropy", student_entropy)):
        if x is not None:
            _checks.like(name, x, teacher_logprob, "teacher_logprob")
    p = _checks.percentage("p", p)
    B = teacher_logprob.shape[0]
    _check_teacher_args(teacher_index, num_teachers, B, teacher_logprob.device)
    group = _dist.sync_group(process_group, _checks.optional_flag("sync", sync))
    args = (_detach(teacher_logprob), _detach(mask), _detach(kl), _detach(teacher_entropy),
            _detach(student_entropy), _detach(teacher_index), num_teachers, p)
    if group is None:
        return TrajectoryScores(*_trajectory_scores_op(*args)) if torch.compiler.is_compiling() else _trajectory_scores_impl(*args, None)
    return _dist.run_eager(_trajectory_scores_impl, *args, group)


def _trajectory_filter_impl(score, length, teacher_index, num_teachers, p, group) -> TrajectoryFilter:
    p = _checks.percentage("p", p)
    B = score.shape[0]
    teacher, K = _teachers(teacher_index, num_teachers, B, score.device, group)
    return _filter(score, length > 0, teacher, K, p, group)


@torch.library.custom_op("pyopd::trajectory_filter", mutates_args=())
def _trajectory_filter_op(
    score: torch.Tensor,
    length: torch.Tensor,
    teacher_index: Optional[torch.Tensor],
    num_teachers: Optional[int],
    p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`trajectory_filter` of one process; the TrajectoryFilter fields in order."""
    return tuple(_trajectory_filter_impl(score, length, teacher_index, num_teachers, p, None))


@_trajectory_filter_op.register_fake
def _(score, length, teacher_index, num_teachers, p):
    B = score.shape[0]
    K = _num_teachers_fake(teacher_index, num_teachers)
    return (score.new_empty(B, dtype=torch.bool), score.new_empty(K, dtype=torch.float64),
            score.new_empty(K, dtype=torch.int64), score.new_empty(K, dtype=torch.int64))


def trajectory_filter(
    score: torch.Tensor,
    length: torch.Tensor,
    *,
    p: float = 20.0,
    teacher_index: Optional[torch.Tensor] = None,
    num_teachers: Optional[int] = None,
    process_group=None,
    sync: Optional[bool] = None,
) -> TrajectoryFilter:
    """The FiRe-OPD rollout filter on per-rollout scores alone.

    `trajectory_scores` already applies it; use this when the scores of one
    batch arrive in pieces (e.g. per micro-batch: call `trajectory_scores` on
    each, concatenate `score` and `length`, and filter once here). Same rule,
    arguments and collectives as `trajectory_scores`.

    Args:
        score: [B] float per-rollout scores S_i.
        length: [B] int valid tokens per rollout (0 = empty: never kept, not counted).

    Returns:
        TrajectoryFilter(keep [B] bool, threshold [K] float64, num_scored [K], num_dropped [K]).
    """
    if not isinstance(score, torch.Tensor) or score.dtype not in _checks.FLOAT_DTYPES or score.dim() != 1:
        got = (f"{score.dtype} tensor of shape {tuple(score.shape)}" if isinstance(score, torch.Tensor)
               else type(score).__name__)
        raise ValueError(f"score must be a 1-D floating-point tensor of per-rollout scores, got {got}")
    B = score.shape[0]
    _checks.per_row("length", length, B, score.device, kind="int", what="the scores")
    p = _checks.percentage("p", p)
    _check_teacher_args(teacher_index, num_teachers, B, score.device)
    group = _dist.sync_group(process_group, _checks.optional_flag("sync", sync))
    args = (score.detach(), length.detach(), _detach(teacher_index), num_teachers, p)
    if group is None:
        return TrajectoryFilter(*_trajectory_filter_op(*args)) if torch.compiler.is_compiling() else _trajectory_filter_impl(*args, None)
    return _dist.run_eager(_trajectory_filter_impl, *args, group)


# ---- fire_token_weights -------------------------------------------------------------


def _segment_max(values: torch.Tensor, segment: torch.Tensor, K: int) -> torch.Tensor:
    """max(0, max of values per segment) as [K], NaN-propagating."""
    out = torch.zeros(K, dtype=values.dtype, device=values.device)
    out = out.scatter_reduce(0, segment, torch.nan_to_num(values, nan=0.0), "amax", include_self=True)
    has_nan = torch.zeros(K, dtype=torch.int64, device=values.device).index_add_(
        0, segment, values.isnan().to(torch.int64)
    )
    return torch.where(has_nan > 0, torch.full_like(out, math.nan), out)


def _fire_token_weights_impl(teacher_entropy, student_entropy, mask, keep, teacher_index, num_teachers,
                             alpha, beta, normalize, group) -> FireWeights:
    alpha, beta = _checks.fire_coefficients(alpha, beta)  # again on the concrete values
    B, T = teacher_entropy.shape
    dev = teacher_entropy.device
    teacher, K = _teachers(teacher_index, num_teachers, B, dev, group)

    dtype = _compute_dtype(teacher_entropy, student_entropy)
    ht, ht_stride = _rows(teacher_entropy, dtype)
    hs, hs_stride = _rows(student_entropy, dtype)
    m, m_stride = _mask_rows(mask)

    # Pass 1: per-row maxima (kernel), then per-teacher / batch maxima over kept rows.
    st = _C.TrajectoryStatsParams()
    st.rows, st.cols, st.dtype = B, T, _dtype_tag(dtype)
    st.mask, st.mask_row_stride = _ptr(m), m_stride
    st.teacher_entropy, st.teacher_entropy_row_stride = ht.data_ptr(), ht_stride
    st.student_entropy, st.student_entropy_row_stride = hs.data_ptr(), hs_stride
    length = torch.zeros(B, dtype=torch.int64, device=dev)
    row_max_t = torch.zeros(B, dtype=dtype, device=dev)
    row_max_s = torch.zeros(B, dtype=dtype, device=dev)
    st.length, st.max_teacher_entropy, st.max_student_entropy = (
        length.data_ptr(),
        row_max_t.data_ptr(),
        row_max_s.data_ptr(),
    )
    _launch(_C.trajectory_stats, st, dev)
    if keep is not None:  # a NaN on a dropped rollout must not reach the normalisers
        row_max_t = torch.where(keep, row_max_t, torch.zeros_like(row_max_t))
        row_max_s = torch.where(keep, row_max_s, torch.zeros_like(row_max_s))
    max_t = _dist.max_over_ranks(_segment_max(row_max_t, teacher, K), group)
    # [1] -> [] as a fresh tensor, not a view (a custom op's outputs must not alias)
    max_s = _dist.max_over_ranks(_segment_max(row_max_s, torch.zeros_like(teacher), 1), group).reshape(())

    # Pass 2: the weights (kernel), normalised per row there or over the batch here.
    fw = _C.FireWeightsParams()
    fw.rows, fw.cols, fw.dtype = B, T, _dtype_tag(dtype)
    fw.mask, fw.mask_row_stride = _ptr(m), m_stride
    fw.teacher_entropy, fw.teacher_entropy_row_stride = ht.data_ptr(), ht_stride
    fw.student_entropy, fw.student_entropy_row_stride = hs.data_ptr(), hs_stride
    keep_c = None if keep is None else keep.contiguous()
    fw.keep = _ptr(keep_c)
    norm_t = max_t[teacher].contiguous()
    norm_s = max_s.expand(B).contiguous()
    fw.teacher_entropy_max, fw.student_entropy_max = norm_t.data_ptr(), norm_s.data_ptr()
    fw.alpha, fw.beta = alpha, beta
    fw.normalize_rows = normalize == "trajectory"
    weight = torch.empty((B, T), dtype=dtype, device=dev)
    row_sum = torch.zeros(B, dtype=torch.float64, device=dev)
    row_count = torch.zeros(B, dtype=torch.int64, device=dev)
    fw.weight, fw.row_sum, fw.row_count = weight.data_ptr(), row_sum.data_ptr(), row_count.data_ptr()
    _launch(_C.fire_weights, fw, dev)
    if normalize == "batch":
        tot = torch.stack([row_sum.sum(), row_count.sum().to(torch.float64)])
        if group is not None:
            tot = _dist.all_gather_rows(tot.unsqueeze(0), group).sum(0)
        scale = torch.where(tot[1] > 0, tot[1] / tot[0], torch.ones_like(tot[0]))
        weight.mul_(scale.to(dtype))
    return FireWeights(weight=weight, max_teacher_entropy=max_t, max_student_entropy=max_s)


@torch.library.custom_op("pyopd::fire_token_weights", mutates_args=())
def _fire_token_weights_op(
    teacher_entropy: torch.Tensor,
    student_entropy: torch.Tensor,
    mask: Optional[torch.Tensor],
    keep: Optional[torch.Tensor],
    teacher_index: Optional[torch.Tensor],
    num_teachers: Optional[int],
    alpha: float,
    beta: float,
    normalize: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fire_token_weights` of one process; the FireWeights fields in order."""
    return tuple(_fire_token_weights_impl(teacher_entropy, student_entropy, mask, keep, teacher_index,
                                          num_teachers, alpha, beta, normalize, None))


@_fire_token_weights_op.register_fake
def _(teacher_entropy, student_entropy, mask, keep, teacher_index, num_teachers, alpha, beta, normalize):
    K = _num_teachers_fake(teacher_index, num_teachers)
    dt = _compute_dtype(teacher_entropy, student_entropy)
    x = teacher_entropy
    return x.new_empty(x.shape, dtype=dt), x.new_empty(K, dtype=dt), x.new_empty((), dtype=dt)


def fire_token_weights(
    teacher_entropy: torch.Tensor,
    student_entropy: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    keep: Optional[torch.Tensor] = None,
    alpha: float = 1.0,
    beta: float = 1.0,
    normalize: str = "trajectory",
    teacher_index: Optional[torch.Tensor] = None,
    num_teachers: Optional[int] = None,
    process_group=None,
    sync: Optional[bool] = None,
) -> FireWeights:
    """FiRe-OPD soft token weights (detached, no autograd).

    For valid positions of kept rollouts

        c_t = clamp(1 - H_t / max H_t, 0, 1)    teacher confidence
        c_s = clamp(H_s / max H_s, 0, 1)        student confusion
        w   = (1 + alpha c_t)(1 + beta c_s)

    with the maxima over valid positions of kept rollouts of the whole batch
    (all ranks), floored at 0; x / max is taken as 0 when max == 0 (all
    entropies zero: c_t = 1, c_s = 0). With `teacher_index`, max H_t is taken
    per teacher (each teacher's confidence relative to itself); max H_s, the one
    student's, stays batch-wide. Weights are 0 at masked positions and on
    dropped rollouts.

    Args:
        teacher_entropy, student_entropy: [B, T] H_t (of the sample's teacher), H_s.
        mask: [B, T] response mask; None = all valid.
        keep: [B] bool from `trajectory_scores`; None = every rollout kept.
        alpha, beta: >= 0 (default 1, 1), with (1 + alpha)(1 + beta), the
            largest weight before normalisation, at most the float32 maximum.
        normalize: "trajectory" (default, FiRe-OPD Eq. 8): each kept rollout's
            weights average 1 over its valid positions; "batch": the weights
            average 1 over all valid positions of kept rollouts (all ranks).
        teacher_index, num_teachers, process_group, sync: as in `trajectory_scores`.

    Returns:
        FireWeights: weight [B, T], max_teacher_entropy [K], max_student_entropy [].
    """
    _checks.floating_2d("teacher_entropy", teacher_entropy)
    _checks.like("student_entropy", student_entropy, teacher_entropy, "teacher_entropy")
    _checks.mask_like(mask, teacher_entropy, "teacher_entropy")
    B = teacher_entropy.shape[0]
    dev = teacher_entropy.device
    if keep is not None:
        _checks.per_row("keep", keep, B, dev, kind="bool")
    alpha, beta = _checks.fire_coefficients(alpha, beta)
    _checks.choice("normalize", normalize, ("trajectory", "batch"))
    _check_teacher_args(teacher_index, num_teachers, B, dev)
    group = _dist.sync_group(process_group, _checks.optional_flag("sync", sync))
    args = (_detach(teacher_entropy), _detach(student_entropy), _detach(mask), _detach(keep),
            _detach(teacher_index), num_teachers, alpha, beta, normalize)
    if group is None:
        return FireWeights(*_fire_token_weights_op(*args)) if torch.compiler.is_compiling() else _fire_token_weights_impl(*args, None)
    return _dist.run_eager(_fire_token_weights_impl, *args, group)


# ---- group_advantages ---------------------------------------------------------------


def _check_group_scalars(clip_low, clip_high, bonus, eps):
    clip_low = _checks.number("clip_low", clip_low)
    clip_high = _checks.number("clip_high", clip_high)
    if not (_checks.is_symbolic(clip_low) or _checks.is_symbolic(clip_high)) and not clip_low < clip_high:
        raise ValueError(f"clip_low must be < clip_high, got {clip_low} and {clip_high}")
    bonus = _checks.number("bonus", bonus)
    eps = _checks.number("eps", eps, lo=0.0, lo_open=True)
    return clip_low, clip_high, bonus, eps


def _group_advantages_impl(teacher_logprob, student_logprob, mask, group_index, clip_low, clip_high,
                           bonus, eps, group) -> GroupAdvantages:
    clip_low, clip_high, bonus, eps = _check_group_scalars(clip_low, clip_high, bonus, eps)
    B, T = teacher_logprob.shape
    dev = teacher_logprob.device
    dtype = _compute_dtype(teacher_logprob, student_logprob)
    lq, lq_stride = _rows(teacher_logprob, dtype)
    lp, lp_stride = _rows(student_logprob, dtype)
    m, m_stride = _mask_rows(mask)
    prm = _C.GroupAdvParams()
    prm.rows, prm.cols, prm.dtype = B, T, _dtype_tag(dtype)
    prm.mask, prm.mask_row_stride = _ptr(m), m_stride
    prm.teacher_logprob, prm.teacher_logprob_row_stride = lq.data_ptr(), lq_stride
    prm.student_logprob, prm.student_logprob_row_stride = lp.data_ptr(), lp_stride
    prm.clip_low, prm.clip_high, prm.bonus, prm.eps = clip_low, clip_high, bonus, eps

    # Pass 1 (kernel): per-row count, mean, M2 of r.
    # The kernel writes every row (0, 0, 0 for a row without valid tokens).
    count = torch.empty(B, dtype=torch.int64, device=dev)
    mean = torch.empty(B, dtype=torch.float64, device=dev)
    m2 = torch.empty(B, dtype=torch.float64, device=dev)
    prm.row_count, prm.row_mean, prm.row_m2 = count.data_ptr(), mean.data_ptr(), m2.data_ptr()
    _launch(_C.group_reward_moments, prm, dev)

    # Pool the rows of each group (Chan et al.), over all ranks when synced.
    ids = group_index.to(torch.int64)
    # One int64 message per row; the float64 statistics travel as their raw bits.
    rows = torch.stack([ids, count, mean.view(torch.int64), m2.view(torch.int64)], 1)
    offset = 0
    if group is not None:
        rows, offset = _dist.all_gather_rows(rows, group, with_offset=True)
    stats = torch.stack([
        rows[:, 1].to(torch.float64),
        rows[:, 2].contiguous().view(torch.float64),
        rows[:, 3].contiguous().view(torch.float64),
    ], 1)
    g_mean, g_std, g_count = _pool_groups(rows[:, 0], stats)
    sl = slice(offset, offset + B)
    # Fresh tensors (clone), not views of the pooled [all ranks] ones.
    row_g_mean, row_g_std = g_mean[sl].clone(), g_std[sl].clone()

    # Pass 2 (kernel): the advantages.
    adv = torch.empty((B, T), dtype=dtype, device=dev)
    prm.group_mean, prm.group_std, prm.advantage = row_g_mean.data_ptr(), row_g_std.data_ptr(), adv.data_ptr()
    _launch(_C.group_advantages_apply, prm, dev)
    return GroupAdvantages(
        advantage=adv,
        reward_mean=mean,
        group_mean=row_g_mean,
        group_std=row_g_std,
        group_count=g_count[sl].clone(),
    )


@torch.library.custom_op("pyopd::group_advantages", mutates_args=())
def _group_advantages_op(
    teacher_logprob: torch.Tensor,
    student_logprob: torch.Tensor,
    mask: Optional[torch.Tensor],
    group_index: torch.Tensor,
    clip_low: float,
    clip_high: float,
    bonus: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`group_advantages` of one process; the GroupAdvantages fields in order."""
    return tuple(_group_advantages_impl(teacher_logprob, student_logprob, mask, group_index, clip_low,
                                        clip_high, bonus, eps, None))


@_group_advantages_op.register_fake
def _(teacher_logprob, student_logprob, mask, group_index, clip_low, clip_high, bonus, eps):
    x = teacher_logprob
    B = x.shape[0]
    dt = _compute_dtype(teacher_logprob, student_logprob)
    return (x.new_empty(x.shape, dtype=dt), x.new_empty(B, dtype=torch.float64),
            x.new_empty(B, dtype=torch.float64), x.new_empty(B, dtype=torch.float64),
            x.new_empty(B, dtype=torch.int64))


def group_advantages(
    teacher_logprob: torch.Tensor,
    student_logprob: torch.Tensor,
    mask: Optional[torch.Tensor],
    group_index: torch.Tensor,
    *,
    clip_low: float = -3.0,
    clip_high: float = 5.0,
    bonus: float = 0.02,
    eps: float = 1e-6,
    process_group=None,
    sync: Optional[bool] = None,
) -> GroupAdvantages:
    """COPSD dense group advantage (detached, no autograd).

    Per valid token r_t = clip(log q(y_t) - log p(y_t), clip_low, clip_high) + bonus;
    for each group (the rollouts of one prompt) the valid tokens of all its
    rollouts are pooled, and A_t = (r_t - mean) / (std + eps) with the
    population std (ddof 0). A group whose pooled tokens are all equal gets A = 0
    exactly; masked positions and empty rollouts get 0.

    Args:
        teacher_logprob: [B, T] log q(y_t) (COPSD: the teacher sees the constitution).
        student_logprob: [B, T] log p(y_t) of the rollout (old) policy.
        mask: [B, T] response mask or None (all valid).
        group_index: [B] int group id of each rollout (any int64 values; equal
            ids = same prompt, also across ranks).
        clip_low, clip_high, bonus, eps: defaults -3, 5, 0.02, 1e-6.
        process_group, sync: as in `trajectory_scores`: by default a group is
            pooled over the rollouts of every rank that carry its id.

    Returns:
        GroupAdvantages: advantage [B, T] (float32, float64 for float64 inputs)
        and per row of float64: reward_mean, group_mean, group_std, and
        group_count (int64).
    """
    _checks.floating_2d("teacher_logprob", teacher_logprob)
    _checks.like("student_logprob", student_logprob, teacher_logprob, "teacher_logprob")
    _checks.mask_like(mask, teacher_logprob, "teacher_logprob")
    B = teacher_logprob.shape[0]
    _checks.per_row("group_index", group_index, B, teacher_logprob.device, kind="int")
    clip_low, clip_high, bonus, eps = _check_group_scalars(clip_low, clip_high, bonus, eps)
    group = _dist.sync_group(process_group, _checks.optional_flag("sync", sync))
    args = (_detach(teacher_logprob), _detach(student_logprob), _detach(mask), _detach(group_index),
            clip_low, clip_high, bonus, eps)
    if group is None:
        return GroupAdvantages(*_group_advantages_op(*args)) if torch.compiler.is_compiling() else _group_advantages_impl(*args, None)
    return _dist.run_eager(_group_advantages_impl, *args, group)


def _pool_groups(ids: torch.Tensor, stats: torch.Tensor):
    """Per-row (group mean, group std, group count) from per-row (n, mean, M2).

    Chan's parallel formula, shifted by the group's largest row mean so that
    rows with equal means pool to exactly that mean and M2 = 0.
    """
    n, mean, m2 = stats.unbind(1)
    if ids.numel() == 0:
        return mean, mean, n.to(torch.int64)
    _, inv = torch.unique(ids, return_inverse=True)
    G = int(inv.max()) + 1
    z = torch.zeros(G, dtype=torch.float64, device=ids.device)
    nonempty = n > 0
    shift = torch.full((G,), -math.inf, dtype=torch.float64, device=ids.device)
    shift = shift.scatter_reduce(0, inv, torch.where(nonempty, mean, -math.inf), "amax", include_self=True)
    shift = torch.where(torch.isinf(shift) & (shift < 0), z, shift)
    n_g = z.index_add(0, inv, n)
    d = torch.where(nonempty, mean - shift[inv], torch.zeros_like(mean))
    mean_g = shift + z.index_add(0, inv, n * d) / n_g.clamp(min=1)
    dm = torch.where(nonempty, mean - mean_g[inv], torch.zeros_like(mean))
    m2_g = z.index_add(0, inv, m2 + n * dm * dm)
    std_g = (m2_g / n_g.clamp(min=1)).sqrt()
    return mean_g[inv], std_g[inv], n_g[inv].to(torch.int64)
