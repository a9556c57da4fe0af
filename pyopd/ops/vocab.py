"""Fused vocabulary-wide per-token statistics: `token_stats` and `reverse_kl`.

One pass over the vocabulary per row (CPU: C++/OpenMP, CUDA: hand-written
kernels) gives, without materialising softmaxes, what on-policy distillation
needs per token: the student's (and teacher's) sampled-token log-prob, entropy,
log-sum-exp and the full-vocabulary reverse KL(p || q). The backward pass
recomputes p (and q) from the saved per-row max and log-normaliser, so nothing
of size [N, V] is kept between forward and backward.

`pyopd.ops.reference` computes the same with plain `log_softmax` and is what
the tests compare against.

The kernels run inside `torch.library.custom_op`s (pyopd::vocab_stats_fwd /
_bwd, with fakes and autograd) that take plain tensors and scalars and fill
the kernels' parameter structs inside their implementation, so `token_stats`
and `reverse_kl` trace with torch.compile(fullgraph=True), static or dynamic.
Token ids are range-checked by a third op (pyopd::checked_tokens) on the
concrete values, under torch.compile too: on the CPU it raises a ValueError
naming the bad id; on CUDA it queues a device-side assert instead of
synchronising the host on every call.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from pyopd import _C, _checks
from pyopd.ops import buffers
from pyopd.ops.types import ReverseKL, TokenStats

__all__ = ["token_stats", "reverse_kl", "reverse_kl_backward", "TokenStats", "ReverseKL"]

_DTYPE_TAG = {
    torch.float32: _C.DType.float32,
    torch.bfloat16: _C.DType.bfloat16,
    torch.float16: _C.DType.float16,
    torch.float64: _C.DType.float64,
}


# ---------------------------------------------------------------------------
# argument checks (in pyopd._checks; user-facing messages name the argument)
# ---------------------------------------------------------------------------


def _token_range_message(vocab: int) -> str:
    return f"tokens must lie in [0, {vocab}) (the student vocabulary) on unmasked rows"


def _token_check_impl(tokens: torch.Tensor, mask: Optional[torch.Tensor], vocab: int,
                      copy: bool) -> torch.Tensor:
    """tokens [...] (any int dtype) -> int64 [N] contiguous, ids range-checked on unmasked rows.

    Only rows that count are checked, so padding ids such as -100 are fine
    under a mask. The kernels never index with an out-of-range id either way.
    """
    flat = tokens.reshape(-1).to(torch.int64, copy=copy).contiguous()
    if flat.device.type == "cuda":
        # Checked by the forward kernel itself, with no host sync and no extra
        # pass over the ids (see _vocab_stats_fwd).
        return flat
    bad = (flat < 0) | (flat >= vocab)
    if mask is not None:
        bad &= mask.reshape(-1)
    if bool(bad.any()):
        first = flat[bad][0].item()
        raise ValueError(f"{_token_range_message(vocab)}; found {first}")
    return flat


@torch.library.custom_op("pyopd::checked_tokens", mutates_args=())
def _checked_tokens(tokens: torch.Tensor, mask: Optional[torch.Tensor], vocab: int) -> torch.Tensor:
    """The token check as an op, so that under torch.compile it runs on the concrete
    ids inside the graph (a Python-level check would only see fake tensors)."""
    return _token_check_impl(tokens, mask, vocab, copy=True)  # a copy: outputs must not alias


@_checked_tokens.register_fake
def _(tokens, mask, vocab):
    return tokens.new_empty(tokens.numel(), dtype=torch.int64)


def _check_token_range(tokens: torch.Tensor, mask: Optional[torch.Tensor], vocab: int) -> torch.Tensor:
    """int64 [N] token ids; raises (CPU) / asserts on the device (CUDA) if an unmasked id is out of range."""
    if not _plain(tokens, mask):  # traced or fake: the check runs inside the graph
        return _checked_tokens(tokens, mask, vocab)
    # Eager: the same check without the op dispatcher (~0.1 ms a call on a busy CPU).
    return _token_check_impl(tokens, mask, vocab, copy=False)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [N, V] with a contiguous last dim and a uniform row stride (a view when possible)."""
    v = x.shape[-1]
    rows = x.reshape(-1, v)
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < v):
        rows = rows.contiguous()
    return rows


def _row_stride(rows: torch.Tensor) -> int:
    return rows.stride(0) if rows.shape[0] > 1 else rows.shape[1]


def _device_args(t: torch.Tensor) -> tuple[int, int]:
    if t.device.type == "cpu":
        return -1, 0
    if not _C.build_info()["cuda"]:
        raise RuntimeError(
            "This build of pyopd has no CUDA kernels (it was built without nvcc); "
            "reinstall with PYOPD_CUDA=ON on a machine with the CUDA toolkit"
        )
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(index).cuda_stream


def _out_dtype(student: torch.Tensor) -> torch.dtype:
    return torch.float64 if student.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------
# custom ops (usable under torch.compile) and their autograd
# ---------------------------------------------------------------------------


def _fill_inputs(p, student, teacher, tokens, mask, inv_temperature: float) -> None:
    """The input fields shared by the forward and backward params."""
    p.student = student.data_ptr()
    p.student_dtype = _DTYPE_TAG[student.dtype]
    p.student_row_stride = _row_stride(student)
    if teacher is not None:
        p.teacher = teacher.data_ptr()
        p.teacher_dtype = _DTYPE_TAG[teacher.dtype]
        p.teacher_row_stride = _row_stride(teacher)
        p.teacher_vocab = teacher.shape[1]
    if tokens is not None:
        p.tokens = tokens.data_ptr()
    if mask is not None:
        p.mask = mask.data_ptr()
    p.n_rows, p.vocab = student.shape
    p.inv_temperature = inv_temperature


@torch.library.custom_op("pyopd::vocab_stats_fwd", mutates_args=())
def _vocab_stats_fwd(
    student: torch.Tensor,
    teacher: Optional[torch.Tensor],
    tokens: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    inv_temperature: float,
    check_tokens: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """student [N, V], teacher [N, Vt] or None, tokens int64 [N] or None, mask bool [N] or None.

    check_tokens (CUDA): the kernel flags an id outside [0, V) on an unmasked row and
    a device-side assert fires (the public functions ask for it; the CPU raises in
    Python before). Without it, such an id gives a log-prob of 0 (< 0) or NaN (>= V),
    never a read outside the row.

    Returns kl, student_entropy, teacher_entropy, student_logprob, teacher_logprob,
    student_lse, teacher_lse (each [N]) and stats [N, 4] = (m_s, logZ_s, m_t, logZ_t).
    """
    _checks.inv_temperature(inv_temperature)
    n = student.shape[0]
    od = _out_dtype(student)
    # The kernels write every row of the student's outputs (and of the teacher's
    # when there is one), masked rows included: no fill kernels on the device,
    # except the teacher's fields that stay 0 without a teacher.
    dev = student.device
    outs = [torch.empty(n, dtype=od, device=dev) if k in (1, 3, 5) or teacher is not None
            else torch.zeros(n, dtype=od, device=dev) for k in range(7)]
    stats = torch.empty(n, 4, dtype=od, device=dev)
    p = _C.VocabStatsFwdParams()
    _fill_inputs(p, student, teacher, tokens, mask, inv_temperature)
    if teacher is not None:
        p.kl, p.teacher_entropy, p.teacher_logprob, p.teacher_lse = (
            outs[0].data_ptr(), outs[2].data_ptr(), outs[4].data_ptr(), outs[6].data_ptr())
    p.student_entropy, p.student_logprob, p.student_lse = (
        outs[1].data_ptr(), outs[3].data_ptr(), outs[5].data_ptr())
    p.stats = stats.data_ptr()
    token_ok = None
    if check_tokens and tokens is not None and student.device.type == "cuda":
        # The kernel clears this flag for an id outside [0, V) on an unmasked row;
        # the assert fires asynchronously (a device-side error), like
        # torch._assert_async, without waiting for the device.
        token_ok = torch.ones((), dtype=torch.int32, device=student.device)
        p.token_ok = token_ok.data_ptr()
    device, stream = _device_args(student)
    _C.vocab_stats_fwd(p, device, stream)
    if token_ok is not None:
        torch._assert_async(token_ok, _token_range_message(p.vocab))
    return (*outs, stats)


@_vocab_stats_fwd.register_fake
def _(student, teacher, tokens, mask, inv_temperature, check_tokens=False):
    n = student.shape[0]
    od = _out_dtype(student)
    outs = [student.new_empty(n, dtype=od) for _ in range(7)]
    return (*outs, student.new_empty(n, 4, dtype=od))


@torch.library.custom_op("pyopd::vocab_stats_bwd", mutates_args=())
def _vocab_stats_bwd(
    student: torch.Tensor,
    teacher: Optional[torch.Tensor],
    tokens: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    stats: torch.Tensor,
    kl: torch.Tensor,
    student_entropy: torch.Tensor,
    grad_kl: Optional[torch.Tensor],
    grad_logprob: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor],
    grad_lse: Optional[torch.Tensor],
    inv_temperature: float,
    grad_dtype: torch.dtype,
) -> torch.Tensor:
    """Gradient w.r.t. the student logits [N, V] (contiguous, dtype grad_dtype)."""
    grad = torch.empty(student.shape, dtype=grad_dtype, device=student.device)
    return vocab_stats_bwd_into(grad, student, teacher, tokens, mask, stats, kl, student_entropy,
                                grad_kl, grad_logprob, grad_entropy, grad_lse, inv_temperature)


def vocab_stats_bwd_into(grad, student, teacher, tokens, mask, stats, kl, student_entropy, grad_kl,
                         grad_logprob, grad_entropy, grad_lse, inv_temperature: float) -> torch.Tensor:
    """`pyopd::vocab_stats_bwd` writing into ``grad`` (contiguous, the student's shape; its dtype
    is the gradient's). For the chunk loops of the fused-linear ops, which reuse one buffer
    across chunks; plain tensors only (no autograd, no tracing)."""
    _checks.inv_temperature(inv_temperature)
    if not grad.is_contiguous() or grad.shape != student.shape or grad.device != student.device:
        raise ValueError(f"grad must be contiguous with the student's shape {tuple(student.shape)} "
                         f"on {student.device}, got {tuple(grad.shape)} on {grad.device}")
    grad_dtype = grad.dtype
    od = _out_dtype(student)
    p = _C.VocabStatsBwdParams()
    _fill_inputs(p, student, teacher, tokens, mask, inv_temperature)
    p.stats, p.kl, p.student_entropy = stats.data_ptr(), kl.data_ptr(), student_entropy.data_ptr()
    keep = []  # upstream grads converted to the kernels' per-row dtype stay alive until the call
    for field, g in (("grad_kl", grad_kl), ("grad_logprob", grad_logprob),
                     ("grad_entropy", grad_entropy), ("grad_lse", grad_lse)):
        if g is not None:
            g = g.to(od).contiguous()
            keep.append(g)
            setattr(p, field, g.data_ptr())
    if teacher is None:
        p.grad_kl = 0
    p.grad_student = grad.data_ptr()
    p.grad_dtype = _DTYPE_TAG[grad_dtype]
    device, stream = _device_args(student)
    _C.vocab_stats_bwd(p, device, stream)
    return grad


@_vocab_stats_bwd.register_fake
def _(student, teacher, tokens, mask, stats, kl, student_entropy, grad_kl, grad_logprob,
      grad_entropy, grad_lse, inv_temperature, grad_dtype):
    return student.new_empty(student.shape, dtype=grad_dtype)


def _setup_context(ctx, inputs, output):
    student, teacher, tokens, mask, inv_temperature = inputs[:5]
    kl, hs, ht, _lps, lpt, _lses, lset, stats = output
    ctx.mark_non_differentiable(ht, lpt, lset, stats)  # the teacher is never differentiated
    # Unused outputs reach backward as None, not as zero tensors: no fill kernels
    # for them, and the kernel skips their terms (a null upstream gradient).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(student, teacher, tokens, mask, stats, kl, hs)
    ctx.inv_temperature = inv_temperature


def _backward(ctx, g_kl, g_hs, _g_ht, g_lps, _g_lpt, g_lses, _g_lset, _g_stats, bwd=None):
    student, teacher, tokens, mask, stats, kl, hs = ctx.saved_tensors
    if all(g is None for g in (g_kl, g_hs, g_lps, g_lses)) or not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None
    grad = (bwd or _vocab_stats_bwd)(student, teacher, tokens, mask, stats, kl, hs,
                                     g_kl if teacher is not None else None, g_lps, g_hs, g_lses,
                                     ctx.inv_temperature, student.dtype)
    return grad, None, None, None, None, None


torch.library.register_autograd("pyopd::vocab_stats_fwd", _backward, setup_context=_setup_context)


# Eager calls skip the op dispatcher: the same implementation functions, wrapped
# in a plain autograd.Function (measured on the CPU: 69 us of host time for a
# tiny forward + backward against 196 us through the custom op; on a GPU that
# host time is what a small call waits for). Under torch.compile the custom
# ops above are what gets traced.


def _eager_bwd(student, teacher, tokens, mask, stats, kl, student_entropy, grad_kl, grad_logprob,
               grad_entropy, grad_lse, inv_temperature, grad_dtype):
    """`_vocab_stats_bwd` for plain eager tensors: on the CPU a large gradient comes from the
    reused buffers of `pyopd.ops.buffers` (no page zeroing per call)."""
    if student.device.type == "cpu":
        grad = buffers.empty_gradient(student.shape, grad_dtype)
    else:
        grad = torch.empty(student.shape, dtype=grad_dtype, device=student.device)
    return vocab_stats_bwd_into(grad, student, teacher, tokens, mask, stats, kl, student_entropy,
                                grad_kl, grad_logprob, grad_entropy, grad_lse, inv_temperature)


class _VocabStatsEager(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, tokens, mask, inv_temperature, check_tokens):
        out = _vocab_stats_fwd._init_fn(student, teacher, tokens, mask, inv_temperature, check_tokens)
        _setup_context(ctx, (student, teacher, tokens, mask, inv_temperature), out)
        return out

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, *grads, bwd=_eager_bwd)


def _plain(*xs) -> bool:
    """Eager, on plain tensors: not traced (torch.compile), not fake, functional or
    a functorch wrapper (vmap, grad), where only the custom ops work."""
    if torch.compiler.is_compiling():
        return False
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda _x: False)
    return all(x is None or (type(x) is torch.Tensor and not wrapped(x)) for x in xs)


def _fwd(*xs):
    """The forward for these inputs: the eager Function on plain tensors, else the custom op."""
    return _VocabStatsEager.apply if _plain(*xs) else _vocab_stats_fwd


def _bwd(*xs):
    return _eager_bwd if _plain(*xs) else _vocab_stats_bwd


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def _prepare(student_logits, teacher_logits, tokens, mask, temperature, require_teacher: bool):
    student_logits = _checks.logits("student_logits" if require_teacher else "logits", student_logits)
    lead = tuple(student_logits.shape[:-1])
    v = student_logits.shape[-1]
    dev = student_logits.device
    if require_teacher:
        teacher_logits = _checks.logits("teacher_logits", teacher_logits)
        if tuple(teacher_logits.shape[:-1]) != lead:
            raise ValueError(
                f"teacher_logits leading dims {tuple(teacher_logits.shape[:-1])} do not match "
                f"student_logits {lead}")
        if teacher_logits.device != dev:
            raise ValueError(
                f"teacher_logits is on {teacher_logits.device} but student_logits is on {dev}")
        if teacher_logits.shape[-1] < v:
            raise ValueError(
                f"teacher_logits has a smaller vocabulary ({teacher_logits.shape[-1]}) than "
                f"student_logits ({v}); the teacher must cover every student id (Vt >= V)")
        if (student_logits.dtype == torch.float64) != (teacher_logits.dtype == torch.float64):
            raise TypeError("float64 logits need both student_logits and teacher_logits in float64 "
                            f"(got {student_logits.dtype} and {teacher_logits.dtype})")
        if teacher_logits.requires_grad and torch.is_grad_enabled():
            raise ValueError("teacher_logits requires grad, but pyopd never differentiates the "
                             "teacher; pass teacher_logits.detach()")
    tokens = _checks.leading("tokens", tokens, lead, dev, "tokens")
    mask = _checks.leading("mask", mask, lead, dev, "mask")
    t = _checks.temperature(temperature)  # a SymFloat under dynamic compile: checked in the op
    if tokens is not None:
        tokens = _check_token_range(tokens, mask, v)
    if mask is not None:
        mask = mask.reshape(-1).contiguous()
    student_rows = _as_rows(student_logits)
    teacher_rows = _as_rows(teacher_logits) if require_teacher else None
    # While tracing, t may be a constant 0 (the check above returns it unchecked):
    # inf then reaches the op, whose check rejects it at run time.
    inv_t = 1.0 / t if t != 0 else math.inf
    return lead, student_rows, teacher_rows, tokens, mask, inv_t


def token_stats(
    logits: torch.Tensor,
    tokens: Optional[torch.Tensor] = None,
    *,
    mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
) -> TokenStats:
    """Sampled-token log-prob, entropy and log-sum-exp of one model, in one pass.

    Args:
        logits: [N, V] or [B, T, V], float32/bfloat16/float16 (float64 for checks).
            Rows may be strided (e.g. ``logits[:, :-1]``); the last dim must be
            the vocabulary.
        tokens: integer ids shaped like the leading dims, or None (logprob is
            the constant 0, and its gradient is 0).
        mask: bool, shaped like the leading dims, True where the token counts.
            Masked rows read no logits and give zeros (and zero gradients).
        temperature: p = softmax(z), z = logits * (1 / temperature), z rounded
            to float32 (float64 for float64 logits) on its own. 1/temperature
            must be a normal float32: temperature in [2.94e-39, 8.51e37].

    Returns:
        TokenStats(logprob, entropy, lse), each float32 (float64 for float64
        logits) shaped like the leading dims. ``logprob`` and ``entropy`` (and
        ``lse``) are differentiable w.r.t. ``logits``. ``logprob <= 0`` always.

    Non-finite inputs: -inf logits are legal (zero probability, adding exactly
    nothing). A +inf logit gives ``lse = +inf``; a NaN logit gives NaN; an all
    -inf row gives ``lse = -inf``. Where ``lse`` is not finite, ``logprob`` and
    ``entropy`` are NaN and the row's gradient is NaN (as through
    ``log_softmax``); masked rows still give zeros.

    Use it to score a teacher and free its logits before the student's exist.
    """
    lead, rows, _, tokens, mask, inv_t = _prepare(logits, None, tokens, mask, temperature, False)
    _kl, hs, _ht, lps, _lpt, lses, _lset, _stats = _fwd(rows, tokens, mask)(rows, None, tokens, mask, inv_t, True)
    return TokenStats(logprob=lps.view(lead), entropy=hs.view(lead), lse=lses.view(lead))


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: Optional[torch.Tensor] = None,
    *,
    mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
) -> ReverseKL:
    """Full-vocabulary reverse KL(p || q) and per-token signals, in one pass.

    p = softmax(student_logits / T) over V ids, q = softmax(teacher_logits / T)
    over Vt >= V ids (a teacher with a padded vocabulary is fine: the student
    has no mass beyond V, so the KL is exact).

    Args:
        student_logits: [N, V] or [B, T, V]; float32/bfloat16/float16 (or float64).
        teacher_logits: [N, Vt] or [B, T, Vt], Vt >= V; any of the same dtypes
            (float64 only together with a float64 student). Never differentiated.
        tokens: sampled ids shaped like the leading dims, or None (both log-probs 0).
        mask: bool, shaped like the leading dims, True where the token counts;
            masked rows read no logits and give zeros and zero gradients.
        temperature: applied to both models; as in `token_stats`.

    Returns:
        ReverseKL(kl, student_entropy, teacher_entropy, student_logprob,
        teacher_logprob, student_lse, teacher_lse), float32 (float64 for float64
        logits), shaped like the leading dims. ``kl``, ``student_entropy``,
        ``student_logprob`` and ``student_lse`` are differentiable w.r.t.
        ``student_logits``; the backward pass re-reads the logits instead of
        keeping an [N, V] buffer.

    Non-finite inputs: -inf logits are legal; ids where both models are -inf
    contribute exactly 0. ``kl = +inf`` whenever some id j < V has a finite
    student logit and a -inf teacher logit (the student's support is not
    inside the teacher's), even if p_j underflows in floating point. Each
    model's ``lse``, ``entropy`` and ``logprob`` follow `token_stats`; ``kl``
    is NaN when the student's lse is not finite or the teacher's is NaN or
    +inf. A row whose student lse is not finite, or whose ``kl`` (or
    ``student_entropy``) is not finite while it has a nonzero upstream
    gradient, gets an all-NaN gradient; masked rows still give zeros.
    """
    lead, s_rows, t_rows, tokens, mask, inv_t = _prepare(
        student_logits, teacher_logits, tokens, mask, temperature, True)
    out = _fwd(s_rows, t_rows, tokens, mask)(s_rows, t_rows, tokens, mask, inv_t, True)
    return ReverseKL._make(x.view(lead) for x in out[:7])


def reverse_kl_backward(
    student_logits: torch.Tensor,
    teacher_logits: Optional[torch.Tensor],
    tokens: Optional[torch.Tensor] = None,
    *,
    grad_kl: Optional[torch.Tensor] = None,
    grad_logprob: Optional[torch.Tensor] = None,
    grad_entropy: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    grad_dtype: Optional[torch.dtype] = None,
) -> tuple[ReverseKL | TokenStats, torch.Tensor]:
    """Functional forward + backward without autograd, with the gradient dtype of your choice.

    Runs the forward pass, then writes d(sum_i g_kl_i KL_i + g_lp_i log p_i(y_i)
    + g_h_i H_i) / d student_logits in ``grad_dtype`` (default: the student's
    dtype; ``torch.float32`` keeps full precision for bf16/fp16 logits, which
    autograd would round to the input dtype). ``teacher_logits=None`` gives the
    token_stats gradient. Upstream grads are shaped like the leading dims.

    Returns (forward result, grad shaped like student_logits).
    """
    has_teacher = teacher_logits is not None
    lead, s_rows, t_rows, tokens, mask, inv_t = _prepare(
        student_logits, teacher_logits, tokens, mask, temperature, has_teacher)
    gd = student_logits.dtype if grad_dtype is None else grad_dtype
    if not isinstance(gd, torch.dtype) or gd not in _DTYPE_TAG:
        raise TypeError(f"grad_dtype must be float32, bfloat16, float16 or float64, got {gd}")
    if (gd == torch.float64) != (student_logits.dtype == torch.float64):
        raise TypeError("grad_dtype must be float64 exactly when student_logits is float64")
    if grad_kl is not None and not has_teacher:
        raise ValueError("grad_kl needs teacher_logits")
    ups = []
    for name, g in (("grad_kl", grad_kl), ("grad_logprob", grad_logprob), ("grad_entropy", grad_entropy)):
        g = _checks.leading(name, g, lead, student_logits.device, "grad")
        ups.append(None if g is None else g.reshape(-1))
    with torch.no_grad():
        out = _fwd(s_rows, t_rows, tokens, mask)(s_rows, t_rows, tokens, mask, inv_t, True)
        kl, hs, stats = out[0], out[1], out[7]
        grad = _bwd(s_rows, t_rows, *ups)(s_rows, t_rows, tokens, mask, stats, kl, hs, *ups, None, inv_t, gd)
    grad = grad.view(student_logits.shape)
    res = ReverseKL._make(x.view(lead) for x in out[:7])
    if has_teacher:
        return res, grad
    return TokenStats(logprob=res.student_logprob, entropy=res.student_entropy, lse=res.student_lse), grad
