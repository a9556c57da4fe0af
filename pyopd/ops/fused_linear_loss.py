"""Fused linear + reverse-KL loss with its gradient computed in the forward pass.

`fused_linear_reverse_kl_loss` is `pyopd.fused_linear_reverse_kl` for the case
the trainer actually has: a loss that is LINEAR in the per-token KL,

    loss = sum over unmasked rows i of coef_i * KL_i,

with coefficients ``coef`` known before the loss is computed (e.g.
`pyopd.losses.reverse_kl_loss`: weight * mask / denominator). The upstream
gradient of every row's KL is then ``coef_i`` times the loss's own (scalar)
upstream gradient, so each chunk's gradient w.r.t. the student logits can be
asked of the vocabulary kernel right after its forward, while the chunk's
student and teacher logits are still alive: nothing is recomputed in backward.

Per chunk of rows (the helpers are those of `pyopd.ops.fused_linear`):

    zs = h_c @ W.T (+ b),  zt = ht_c @ Wt.T (+ bt)       2 matmuls
    per-row outputs         <- vocab_stats_fwd(zs, zt, y_c)
    g  [C, V]               <- vocab_stats_bwd(..., grad_kl = coef_c)
    grad_hidden[c]  = g @ W                              1 matmul
    grad_weight    += g.T @ h_c ; grad_bias += g.sum(0)  1 matmul

4 matmuls of size N x H x V, as the materialised path does (against 6 for
`fused_linear_reverse_kl`, which recomputes both chunks' logits in backward).
The backward pass of the loss only scales the saved gradients by the loss's
upstream gradient (a scalar).

What it costs instead:

- The coefficients must be known up front and the loss must be linear in the
  KL: the entropy / log-prob terms of other losses are not differentiated
  (use `fused_linear_reverse_kl` for those). ``coef`` itself is never
  differentiated; passing one that requires grad is an error.
- grad_hidden [N, H], grad_weight [V, H] and grad_bias [V] are allocated in
  the forward and held (as saved tensors of the autograd graph) until the
  backward runs: the memory the gradients need anyway, only earlier.
- Low precision (bf16/fp16): grad_weight and grad_bias are sums over chunks.
  With more than one chunk the running sum of grad_weight is kept in a float32
  [V, H] buffer (each chunk's product is rounded once to the input dtype, the
  sum is rounded once at the end), e.g. 2.3 GiB for V = 151936, H = 4096;
  with one chunk the product is written directly in the input dtype.
  grad_bias is summed in float32 ([V], negligible). grad_hidden is one product
  per row, written in the input dtype.

Chunk size: each chunk adds its ``g.T @ h_c`` into grad_weight, a read and a
write of all V x H elements (plus, for bf16/fp16, of the float32 running sum)
for a product whose inner dimension is the chunk's row count. With the 32 MiB
chunks of `fused_linear_reverse_kl` (110 rows at V = 151936 bf16) that traffic
dominates: on an H200 (N = 8192, H = 4096, V = 151936 bf16, loss + backward)
110-row chunks took 279 ms, 256 rows 146 ms, 512 rows 108 ms, 1024 rows 85 ms,
2048 rows 79 ms, one chunk 66 ms (the materialised path: 63 ms; peak extra
memory 3753, 3848, 4070, 4516, 5407, 8374 MiB against 7122). So by default a chunk
has at least ``hidden // MIN_CHUNK_HIDDEN_DIVISOR`` = H / 4 rows (and at least
the 32 MiB of logits of `default_chunk_size`): its three [C, V] buffers then
hold at most 3/4 as many elements as grad_weight itself.

Masked rows are dropped before the matmuls (one ``nonzero``, a host sync on
CUDA); their per-row outputs, their coefficients' contribution and their
gradient rows are 0. A non-finite ``coef`` on an unmasked row raises a
ValueError naming ``coef`` on the CPU and fires a device-side assert on CUDA
(no host sync); the check runs inside the op, so under torch.compile too.
"""
from __future__ import annotations

from typing import Optional

import torch

from pyopd.ops.fused_linear import (
    _LOW,
    _Scratch,
    _accumulate_float,
    _check_rows,
    _chunk_logits,
    _chunks,
    _out_dtype,
    _prepare_pair,
    _put,
    _take,
    _valid_rows,
    default_chunk_size,
)
from pyopd.ops.reference import ReverseKL
from pyopd.ops.vocab import vocab_stats_bwd_into

__all__ = ["MIN_CHUNK_HIDDEN_DIVISOR", "fused_linear_loss_chunks", "fused_linear_reverse_kl_loss",
           "loss_chunk_size"]

_COEF_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

MIN_CHUNK_HIDDEN_DIVISOR: int = 4
"""A default chunk has at least ``H // MIN_CHUNK_HIDDEN_DIVISOR`` rows (see the module docstring)."""


def loss_chunk_size(n_rows: int, vocab: int, hidden: int, dtype: torch.dtype) -> int:
    """Default rows per chunk: `default_chunk_size` (~32 MiB of logits), but at least H / 4 rows."""
    return max(default_chunk_size(n_rows, vocab, dtype),
               min(max(1, n_rows), hidden // MIN_CHUNK_HIDDEN_DIVISOR))


def _coef_message() -> str:
    return "coef must be finite on unmasked rows"


def _check_coef_values(coef: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
    """Finite coefficients on the rows that count (masked rows are never read)."""
    bad = ~torch.isfinite(coef)
    if mask is not None:
        bad &= mask
    if coef.device.type == "cuda":
        # No host sync: a device-side assert fires (asynchronously) if any value is bad.
        torch._assert_async(~bad.any(), _coef_message())
    elif bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"{_coef_message()}; found {coef[row].item()} at (flattened) row {row}")


def fused_linear_loss_chunks(
    s_hidden: torch.Tensor, s_weight: torch.Tensor, s_bias: Optional[torch.Tensor],
    t_hidden: torch.Tensor, t_weight: torch.Tensor, t_bias: Optional[torch.Tensor],
    coef: torch.Tensor, tokens: Optional[torch.Tensor], mask: Optional[torch.Tensor],
    inv_temperature: float, chunk_size: int, need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, ...]:
    """One pass over chunks of rows: loss, the 7 ReverseKL fields and the loss's gradients.

    s_hidden [N, H], s_weight [V, H], t_hidden [N, Ht], t_weight [Vt, Ht];
    coef [N] in the kernels' per-row dtype (float32; float64 for float64
    inputs), tokens int64 [N] or None, mask bool [N] or None.

    Returns (loss, kl, student_entropy, teacher_entropy, student_logprob,
    teacher_logprob, student_lse, teacher_lse, grad_hidden [N, H],
    grad_weight [V, H], grad_bias [V]); a gradient not needed is an empty [0].
    """
    _check_coef_values(coef, mask)
    n, hdim = s_hidden.shape
    vocab = s_weight.shape[0]
    dtype = s_hidden.dtype
    dev = s_hidden.device
    od = _out_dtype(s_hidden)
    low = dtype in _LOW
    outs = [torch.zeros(n, dtype=od, device=dev) for _ in range(7)]
    rows = _valid_rows(mask, n)
    count = n if rows is None else rows.numel()
    multi = count > chunk_size
    # Every row of grad_hidden is written when all rows count; masked rows stay 0.
    grad_h = (s_hidden.new_empty(0) if not need_hidden else
              torch.empty_like(s_hidden) if rows is None else torch.zeros_like(s_hidden))
    grad_w = (torch.zeros_like(s_weight) if (need_weight and count == 0) else
              torch.empty_like(s_weight) if need_weight else s_weight.new_empty(0))
    # bf16/fp16 sums over several chunks are kept in float32 and rounded once at the end.
    acc_w = (torch.empty(s_weight.shape, dtype=torch.float32, device=dev)
             if (need_weight and low and multi) else None)  # the first chunk fills it
    grad_b = (torch.zeros(vocab, dtype=torch.float32 if low else dtype, device=dev) if need_bias
              else s_weight.new_empty(0))
    need_grad = need_hidden or need_weight or need_bias
    scratch = _Scratch(dev)
    for i, (c0, c1, idx) in enumerate(_chunks(count, chunk_size, rows)):
        h_c = _take(s_hidden, c0, c1, idx)
        zs = _chunk_logits(scratch, "zs", h_c, s_weight, s_bias)
        zt = _chunk_logits(scratch, "zt", _take(t_hidden, c0, c1, idx), t_weight, t_bias)
        y_c = _take(tokens, c0, c1, idx)
        res = torch.ops.pyopd.vocab_stats_fwd(zs, zt, y_c, None, inv_temperature)
        for dst, src in zip(outs, res[:7]):
            _put(dst, c0, c1, idx, src)
        if not need_grad:
            continue
        g = vocab_stats_bwd_into(
            scratch.take("g", zs.shape[0], zs.shape[1], dtype),
            zs, zt, y_c, None, res[7], res[0], res[1], _take(coef, c0, c1, idx), None, None, None,
            inv_temperature)
        if need_hidden:
            if idx is None:
                torch.mm(g, s_weight, out=grad_h[c0:c1])
            else:
                grad_h.index_copy_(0, idx, torch.mm(g, s_weight))
        if need_weight:
            if i == 0 or acc_w is not None:
                torch.mm(g.t(), h_c, out=grad_w)
                if acc_w is not None:
                    if i == 0:
                        acc_w.copy_(grad_w)
                    else:
                        _accumulate_float(acc_w, grad_w)
            else:
                grad_w.addmm_(g.t(), h_c)
        if need_bias:
            grad_b.add_(g.sum(0, dtype=grad_b.dtype))
    if acc_w is not None:
        grad_w.copy_(acc_w)
        del acc_w
    if need_bias and grad_b.dtype != s_weight.dtype:
        grad_b = grad_b.to(s_weight.dtype)
    kl = outs[0]
    # Masked rows have kl = 0; their coefficients (never checked) must not reach the sum.
    c = coef if mask is None else torch.where(mask, coef, torch.zeros_like(coef))
    loss = torch.dot(c, kl)
    return (loss, *outs, grad_h, grad_w, grad_b)


# ---------------------------------------------------------------------------
# custom op (usable under torch.compile) and its autograd
# ---------------------------------------------------------------------------


@torch.library.custom_op("pyopd::fused_linear_rkl_loss", mutates_args=())
def _loss_op(
    s_hidden: torch.Tensor, s_weight: torch.Tensor, s_bias: Optional[torch.Tensor],
    t_hidden: torch.Tensor, t_weight: torch.Tensor, t_bias: Optional[torch.Tensor],
    coef: torch.Tensor, tokens: Optional[torch.Tensor], mask: Optional[torch.Tensor],
    inv_temperature: float, chunk_size: int, need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """loss (0-dim), the 7 ReverseKL fields ([N] each), grad_hidden, grad_weight, grad_bias."""
    return fused_linear_loss_chunks(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, coef,
                                    tokens, mask, inv_temperature, chunk_size, need_hidden,
                                    need_weight, need_bias)


@_loss_op.register_fake
def _(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, coef, tokens, mask, inv_temperature,
      chunk_size, need_hidden, need_weight, need_bias):
    n = s_hidden.shape[0]
    od = _out_dtype(s_hidden)
    return (s_hidden.new_empty((), dtype=od),
            *[s_hidden.new_empty(n, dtype=od) for _ in range(7)],
            s_hidden.new_empty(s_hidden.shape if need_hidden else (0,)),
            s_weight.new_empty(s_weight.shape if need_weight else (0,)),
            s_weight.new_empty((s_weight.shape[0],) if need_bias else (0,)))


def _setup_context(ctx, inputs, output):
    need = inputs[11:14]
    ctx.mark_non_differentiable(*output[1:])  # per-row fields (metrics) and the gradients
    ctx.save_for_backward(*output[8:11])
    ctx.need = tuple(bool(x) for x in need)


def _backward(ctx, g_loss, *_rest):
    grads = ctx.saved_tensors
    out = [None] * 14
    for i, (wanted, computed, g) in enumerate(zip(ctx.needs_input_grad[:3], ctx.need, grads)):
        if not wanted:
            continue
        if not computed:
            raise RuntimeError(
                "pyopd::fused_linear_rkl_loss was called without the gradient of input "
                f"{i} (need_* flag False) but autograd asks for it")
        # g_loss: a 0-dim float32 (float64); the product keeps g's dtype. Always a new
        # tensor, even when g_loss is 1: autograd may take the returned gradient as the
        # leaf's .grad and later add into it in place, which would change the saved one
        # for a retained graph (tests/test_fused_linear_loss.py checks backward x3).
        out[i] = g * g_loss
    return tuple(out)


torch.library.register_autograd("pyopd::fused_linear_rkl_loss", _backward,
                                setup_context=_setup_context)


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def _check_coef(coef: object, lead: tuple, device: torch.device) -> torch.Tensor:
    if coef is None:
        raise TypeError("coef must be a torch.Tensor (the loss coefficient of each row), got None")
    coef = _check_rows("coef", coef, lead, device, "coef", "student_hidden")
    if coef.dtype not in _COEF_DTYPES:
        raise TypeError(f"coef must be a floating-point tensor (float16/bfloat16/float32/float64), "
                        f"got {coef.dtype}")
    if coef.requires_grad and torch.is_grad_enabled():
        raise ValueError("coef requires grad, but the loss is not differentiated w.r.t. its "
                         "coefficients; pass coef.detach()")
    return coef


def fused_linear_reverse_kl_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    coef: torch.Tensor,
    tokens: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, ReverseKL]:
    """``sum_i coef_i * KL_i`` from hidden states, its gradient computed in the forward pass.

    The loss `pyopd.fused_linear_reverse_kl` + ``(coef * kl * mask).sum()``
    would give, with 4 matmuls of N x H x V instead of 6 (see the module
    docstring): each chunk's logit gradient is taken while its logits exist.

    Args:
        student_hidden, student_weight, teacher_hidden, teacher_weight, tokens,
        mask, temperature, student_bias, teacher_bias: as in
            `pyopd.fused_linear_reverse_kl` (the teacher is never differentiated).
        chunk_size: rows per chunk; None picks `loss_chunk_size`: ~32 MiB of
            logits but at least H / 4 rows (larger chunks are faster here, see
            the module docstring). Results do not depend on it beyond rounding.
        coef: floating tensor shaped like the leading dims of student_hidden
            ([N] or [B, T]): each row's coefficient, e.g. ``weight / denominator``
            of `pyopd.losses.reverse_kl_loss`. Must be finite on unmasked rows
            (masked rows' values are ignored). Not differentiated: a ``coef``
            that requires grad raises a ValueError (pass ``coef.detach()``).

    Returns:
        (loss, ReverseKL): ``loss`` is a 0-dim float32 tensor (float64 for
        float64 inputs), differentiable w.r.t. student_hidden, student_weight
        and student_bias. The ReverseKL fields (float32 / float64, shaped like
        the leading dims, 0 on masked rows) are detached: metrics only.

    Only the gradients of inputs that require grad (with grad mode on) are
    computed; under ``torch.no_grad()`` it is a plain forward. The gradients
    live from the forward until the loss's backward (or until the graph is
    freed).
    """
    lead, s_rows, t_rows, tokens, mask, t, chunk, wide = _prepare_pair(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
        tokens, mask, temperature, chunk_size)
    coef = _check_coef(coef, lead, student_hidden.device)
    if chunk is None:
        chunk = loss_chunk_size(s_rows.shape[0], teacher_weight.shape[0], s_rows.shape[1], wide)  # Vt >= V
    coef = coef.reshape(-1).to(_out_dtype(student_hidden)).contiguous()
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and student_hidden.requires_grad
    need_w = grad_on and student_weight.requires_grad
    need_b = grad_on and student_bias is not None and student_bias.requires_grad
    out = _loss_op(s_rows, student_weight, student_bias, t_rows, teacher_weight, teacher_bias, coef,
                   tokens, mask, 1.0 / t, chunk, need_h, need_w, need_b)
    return out[0], ReverseKL._make(x.view(lead) for x in out[1:8])
