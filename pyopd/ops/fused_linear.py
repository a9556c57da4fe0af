"""Fused linear + vocabulary statistics: the lm_head matmul and the vocabulary pass, chunk by chunk.

`fused_linear_reverse_kl` and `fused_linear_token_stats` take a model's last
hidden states and its ``lm_head`` weight instead of the logits. The rows
(tokens) are processed in chunks: a chunk's logits ``hidden_c @ weight.T``
are computed with torch (BLAS / cuBLAS), reduced by pyopd's vocabulary kernels
(``torch.ops.pyopd.vocab_stats_fwd`` / ``vocab_stats_bwd``) and freed before
the next chunk. The backward pass recomputes each chunk's logits from the saved
hidden states and the per-row (max, log-normaliser) of the forward, asks the
kernel for the chunk's gradient w.r.t. the logits ``g`` and folds it into
``grad_hidden_c = g @ weight`` and ``grad_weight += g.T @ hidden_c``. So the
extra memory is that of one chunk (a few [chunk, V] buffers), whatever N is.

Chunk size: by default the rows of one chunk hold ``DEFAULT_CHUNK_BYTES``
(32 MiB) of logits in the widest logits dtype; a chunk then keeps ~3 such
buffers alive (student logits, teacher logits, gradient): about 100 MB.

Cost: the backward recomputes the student's and (when the KL is
differentiated) the teacher's chunk logits, so the op does 6 matmuls of size
N x H x V where the materialised path does 4. What it buys is memory.

Masked rows are dropped before the matmuls (their outputs and gradients are
zero); finding them costs one ``nonzero`` in the forward and one in the
backward (a host sync each on CUDA), none per chunk. Nothing else in the chunk
loops waits for the device.

Backward layout: when the valid rows exceed one chunk, the backward visits
the weight's rows in blocks (at least ``MIN_VOCAB_BLOCK`` = 1024 ids) and
each block takes as many token rows as keep its [rows, block] logits within a
chunk's elements: usually all of them, so grad_weight's block comes out of one
matmul with the full token count as inner dimension instead of a sum over
narrow chunks (measured on CPU: narrow chunks made the matmuls ~25% slower).
The vocabulary kernel gives a block's logit gradient from the saved per-row
max and log-normalisers alone; grad_hidden is summed over blocks.

Low precision: for bf16/fp16 the kernel writes the logit gradient in the
input dtype (so the matmuls run in that dtype with float32 accumulation, as
PyTorch's own backward does), and every sum over chunks or blocks is kept in
float32 (grad_hidden: an [N, H] buffer; grad_weight: one block at a time,
at most ``GRAD_WEIGHT_BLOCK_BYTES`` = 64 MiB) and rounded once at the end.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from pyopd import _checks
from pyopd.ops.vocab import vocab_stats_bwd_into  # also registers torch.ops.pyopd.vocab_stats_*
from pyopd.ops.reference import ReverseKL, TokenStats, reverse_kl_ref, token_stats_ref

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "default_chunk_size",
    "fused_linear_reverse_kl",
    "fused_linear_reverse_kl_ref",
    "fused_linear_token_stats",
    "fused_linear_token_stats_ref",
]

DEFAULT_CHUNK_BYTES: int = 32 * 2**20
"""Bytes of one chunk's logits when ``chunk_size`` is None (see the module docstring)."""

GRAD_WEIGHT_BLOCK_BYTES: int = 64 * 2**20
"""bf16/fp16: bytes of the float32 running sum of one block of grad_weight rows in backward."""

MIN_VOCAB_BLOCK: int = 1024
"""Fewest weight rows per backward block (narrower logits make inefficient matmuls)."""

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_LOW = (torch.bfloat16, torch.float16)


def default_chunk_size(n_rows: int, vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk so that a [rows, vocab] buffer of ``dtype`` holds ~DEFAULT_CHUNK_BYTES."""
    per_row = max(1, vocab) * torch.empty((), dtype=dtype).element_size()
    return max(1, min(max(1, n_rows), DEFAULT_CHUNK_BYTES // per_row))


# ---------------------------------------------------------------------------
# chunk loops (plain functions: the custom ops below call them; the tests run
# them under a dispatch mode to see every tensor they create)
# ---------------------------------------------------------------------------


ACCUMULATE_BLOCK_BYTES: int = 8 * 2**20
"""CPU: bytes of float32 per step when a bf16/fp16 partial sum is added into a float32 one."""


class _Scratch:
    """The [rows, cols] buffers of one call's chunk loop, allocated once and reused.

    Every chunk (and vocabulary block) after the first is no larger than the
    first, so each name is allocated once. On the CPU a fresh multi-MiB tensor
    per chunk is a new mapping whose pages fault in on first write: ~0.2 s per
    GiB on this project's Xeon, ~1.4 GiB per forward + backward of the
    gradient-in-forward op at N = 4096, V = 32768 float32 in 256-row chunks.
    A buffer is only valid until the next ``take`` of the same name.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._flat: dict[str, torch.Tensor] = {}

    def take(self, name: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        n = rows * cols
        flat = self._flat.get(name)
        if flat is None or flat.numel() < n or flat.dtype != dtype:
            flat = self._flat[name] = torch.empty(n, dtype=dtype, device=self.device)
        return flat[:n].view(rows, cols)


def _chunk_logits(scratch: _Scratch, name: str, h: torch.Tensor, w: torch.Tensor,
                  b: Optional[torch.Tensor]) -> torch.Tensor:
    """[C, H] x [V, H] (+ [V]) -> [C, V] logits of one chunk, into the scratch buffer ``name``."""
    out = scratch.take(name, h.shape[0], w.shape[0], torch.result_type(h, w))
    return torch.mm(h, w.t(), out=out) if b is None else torch.addmm(b, h, w.t(), out=out)


def _accumulate_float(acc: torch.Tensor, part: torch.Tensor) -> None:
    """acc (float32) += part (bf16/fp16). On the CPU, a mixed-dtype ``add_`` first
    converts all of ``part`` into a new float32 tensor (at grad_weight's size, 1.2
    GiB for V = 151936, H = 2048, faulted in on every call); in row blocks the
    converted copy stays small and is reused."""
    if acc.device.type != "cpu" or acc.dim() != 2:
        acc.add_(part)
        return
    rows = max(1, ACCUMULATE_BLOCK_BYTES // (4 * max(1, acc.shape[1])))
    for r0 in range(0, acc.shape[0], rows):
        acc[r0:r0 + rows].add_(part[r0:r0 + rows])


def _valid_rows(mask: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    """Indices of the rows that count, or None when all do (no gather needed)."""
    if mask is None:
        return None
    rows = mask.nonzero().squeeze(1)  # one host sync per call on CUDA, none per chunk
    return None if rows.numel() == n else rows


def _take(x: Optional[torch.Tensor], c0: int, c1: int, idx: Optional[torch.Tensor]):
    if x is None:
        return None
    return x[c0:c1] if idx is None else x.index_select(0, idx)


def _put(dst: torch.Tensor, c0: int, c1: int, idx: Optional[torch.Tensor], src: torch.Tensor) -> None:
    if idx is None:
        dst[c0:c1].copy_(src)
    else:
        dst.index_copy_(0, idx, src.to(dst.dtype))


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunks(count: int, chunk: int, rows: Optional[torch.Tensor]):
    for c0 in range(0, count, chunk):
        c1 = min(c0 + chunk, count)
        yield c0, c1, (None if rows is None else rows[c0:c1])


def fused_linear_forward_chunks(
    s_hidden: torch.Tensor, s_weight: torch.Tensor, s_bias: Optional[torch.Tensor],
    t_hidden: Optional[torch.Tensor], t_weight: Optional[torch.Tensor], t_bias: Optional[torch.Tensor],
    tokens: Optional[torch.Tensor], mask: Optional[torch.Tensor], inv_temperature: float, chunk_size: int,
) -> tuple[torch.Tensor, ...]:
    """Forward over chunks of rows. s_hidden [N, H], s_weight [V, H], t_hidden [N, Ht], t_weight [Vt, Ht].

    Returns the 7 ReverseKL fields (each [N]) and stats [N, 4] as the vocab op does.
    """
    n = s_hidden.shape[0]
    od = _out_dtype(s_hidden)
    outs = [torch.zeros(n, dtype=od, device=s_hidden.device) for _ in range(7)]
    outs.append(torch.zeros(n, 4, dtype=od, device=s_hidden.device))
    rows = _valid_rows(mask, n)
    count = n if rows is None else rows.numel()
    scratch = _Scratch(s_hidden.device)
    for c0, c1, idx in _chunks(count, chunk_size, rows):
        zs = _chunk_logits(scratch, "zs", _take(s_hidden, c0, c1, idx), s_weight, s_bias)
        zt = (None if t_hidden is None else
              _chunk_logits(scratch, "zt", _take(t_hidden, c0, c1, idx), t_weight, t_bias))
        res = torch.ops.pyopd.vocab_stats_fwd(zs, zt, _take(tokens, c0, c1, idx), None, inv_temperature)
        for dst, src in zip(outs, res):
            _put(dst, c0, c1, idx, src)
    return tuple(outs)


def _vocab_block(vocab: int, hidden: int, count: int, chunk: int, low: bool) -> int:
    """Weight rows per block in backward: as many as keep [count, block] logits within a chunk's
    elements, so each block takes all valid rows in one matmul (the rows of grad_weight then
    need no sum over chunks), but at least MIN_VOCAB_BLOCK (then rows go in chunks)."""
    if count <= chunk:
        return vocab
    vb = max(chunk * vocab // count, min(vocab, MIN_VOCAB_BLOCK))
    if low:  # bound the float32 running sum of a block of grad_weight rows
        vb = min(vb, max(1, GRAD_WEIGHT_BLOCK_BYTES // (4 * max(1, hidden))))
    return max(1, min(vocab, vb))


def fused_linear_backward_chunks(
    s_hidden: torch.Tensor, s_weight: torch.Tensor, s_bias: Optional[torch.Tensor],
    t_hidden: Optional[torch.Tensor], t_weight: Optional[torch.Tensor], t_bias: Optional[torch.Tensor],
    tokens: Optional[torch.Tensor], mask: Optional[torch.Tensor], stats: torch.Tensor,
    kl: torch.Tensor, student_entropy: torch.Tensor,
    grad_kl: Optional[torch.Tensor], grad_logprob: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor], grad_lse: Optional[torch.Tensor],
    inv_temperature: float, chunk_size: int, need_hidden: bool, need_weight: bool, need_bias: bool,
    vocab_block: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. s_hidden [N, H], s_weight [V, H], s_bias [V] (empty [0] when not needed).

    The weight's rows are visited in blocks of ``vocab_block`` ids (0: automatic,
    see `_vocab_block`); within a block the valid rows go in chunks whose
    [rows, block] logits have as many elements as a [chunk_size, V] chunk. The
    vocabulary kernel gives the gradient of a block of logits from the saved
    per-row max and log-normalisers, so a block needs no other columns.
    """
    n, hdim = s_hidden.shape
    vocab = s_weight.shape[0]
    dtype = s_hidden.dtype
    low = dtype in _LOW
    rows = _valid_rows(mask, n)
    count = n if rows is None else rows.numel()
    vb = (_vocab_block(vocab, hdim, count, chunk_size, low) if vocab_block <= 0
          else min(vocab, vocab_block))
    blocked = vb < vocab
    # bf16/fp16 sums over several blocks (grad_hidden) or chunks (grad_weight,
    # grad_bias) are kept in float32 and rounded once at the end.
    h_acc_dtype = torch.float32 if (low and blocked) else dtype
    grad_h = (torch.zeros(s_hidden.shape, dtype=h_acc_dtype, device=s_hidden.device) if need_hidden
              else s_hidden.new_empty(0))
    grad_w = torch.zeros_like(s_weight) if need_weight else s_weight.new_empty(0)
    grad_b = (torch.zeros(vocab, device=s_weight.device, dtype=torch.float32 if low else dtype)
              if need_bias else s_weight.new_empty(0))
    rows_per = max(1, chunk_size * vocab // vb) if blocked else chunk_size
    multi = count > rows_per
    # The teacher's logits only enter the gradient through the KL term, and only
    # its first V columns are read there (its normaliser is in `stats`).
    use_teacher = t_hidden is not None and grad_kl is not None
    scratch = _Scratch(s_hidden.device)
    for v0 in range(0, vocab if count > 0 else 0, vb):
        v1 = min(vocab, v0 + vb)
        w_b = s_weight[v0:v1]
        b_b = None if s_bias is None else s_bias[v0:v1]
        gw_b = grad_w[v0:v1] if need_weight else None
        acc_w: Optional[torch.Tensor] = None
        for i, (c0, c1, idx) in enumerate(_chunks(count, rows_per, rows)):
            h_c = _take(s_hidden, c0, c1, idx)
            zs = _chunk_logits(scratch, "zs", h_c, w_b, b_b)
            zt = None
            if use_teacher:
                zt = _chunk_logits(scratch, "zt", _take(t_hidden, c0, c1, idx), t_weight[v0:v1],
                                   None if t_bias is None else t_bias[v0:v1])
            y = _take(tokens, c0, c1, idx)
            g_lp = _take(grad_logprob, c0, c1, idx)
            g_lse = _take(grad_lse, c0, c1, idx)
            if blocked and y is not None:
                # d log p(y) / dz_j = [j == y] - p_j: the -p_j part reaches every
                # block, the one-hot part only the block holding y. The kernel
                # drops the whole log-prob term for an id outside its columns, so
                # there the -p_j part goes in as a log-sum-exp gradient (d lse / dz_j
                # = p_j) of -g_lp.
                y = y - v0
                if g_lp is not None:
                    inside = (y >= 0) & (y < v1 - v0)
                    moved = torch.where(inside, torch.zeros_like(g_lp), g_lp)
                    g_lse = -moved if g_lse is None else g_lse - moved
                    g_lp = g_lp - moved
            g = vocab_stats_bwd_into(
                scratch.take("g", zs.shape[0], zs.shape[1], dtype),
                zs, zt, y, None, _take(stats, c0, c1, idx), _take(kl, c0, c1, idx),
                _take(student_entropy, c0, c1, idx),
                _take(grad_kl, c0, c1, idx) if use_teacher else None, g_lp,
                _take(grad_entropy, c0, c1, idx), g_lse, inv_temperature)
            if need_hidden:
                part = torch.mm(g, w_b).to(h_acc_dtype)
                if idx is None:
                    grad_h[c0:c1].add_(part)
                else:
                    grad_h.index_add_(0, idx, part)
            if need_weight:
                if i == 0:
                    torch.mm(g.t(), h_c, out=gw_b)
                    if low and multi:
                        acc_w = gw_b.float()
                elif acc_w is not None:
                    # The chunk's partial sum is rounded once to bf16/fp16; the
                    # running sum stays in float32 (only a [block, H] buffer).
                    torch.mm(g.t(), h_c, out=gw_b)
                    _accumulate_float(acc_w, gw_b)
                else:
                    gw_b.addmm_(g.t(), h_c)
            if need_bias:
                grad_b[v0:v1].add_(g.sum(0, dtype=grad_b.dtype))
        if acc_w is not None:
            gw_b.copy_(acc_w)
    if need_hidden and grad_h.dtype != dtype:
        grad_h = grad_h.to(dtype)
    if need_bias and grad_b.dtype != s_weight.dtype:
        grad_b = grad_b.to(s_weight.dtype)
    return grad_h, grad_w, grad_b


# ---------------------------------------------------------------------------
# custom ops (usable under torch.compile) and their autograd
# ---------------------------------------------------------------------------


@torch.library.custom_op("pyopd::fused_linear_stats_fwd", mutates_args=())
def _fused_fwd(
    s_hidden: torch.Tensor, s_weight: torch.Tensor, s_bias: Optional[torch.Tensor],
    t_hidden: Optional[torch.Tensor], t_weight: Optional[torch.Tensor], t_bias: Optional[torch.Tensor],
    tokens: Optional[torch.Tensor], mask: Optional[torch.Tensor], inv_temperature: float, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """kl, student_entropy, teacher_entropy, student_logprob, teacher_logprob, student_lse,
    teacher_lse (each [N]) and stats [N, 4] from hidden states and lm_head weights."""
    return fused_linear_forward_chunks(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias,
                                       tokens, mask, inv_temperature, chunk_size)


@_fused_fwd.register_fake
def _(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, tokens, mask, inv_temperature,
      chunk_size):
    n = s_hidden.shape[0]
    od = _out_dtype(s_hidden)
    return (*[s_hidden.new_empty(n, dtype=od) for _ in range(7)], s_hidden.new_empty(n, 4, dtype=od))


@torch.library.custom_op("pyopd::fused_linear_stats_bwd", mutates_args=())
def _fused_bwd(
    s_hidden: torch.Tensor, s_weight: torch.Tensor, s_bias: Optional[torch.Tensor],
    t_hidden: Optional[torch.Tensor], t_weight: Optional[torch.Tensor], t_bias: Optional[torch.Tensor],
    tokens: Optional[torch.Tensor], mask: Optional[torch.Tensor], stats: torch.Tensor,
    kl: torch.Tensor, student_entropy: torch.Tensor,
    grad_kl: Optional[torch.Tensor], grad_logprob: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor], grad_lse: Optional[torch.Tensor],
    inv_temperature: float, chunk_size: int, need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_hidden [N, H], grad_weight [V, H], grad_bias [V] (each [0] when not needed)."""
    return fused_linear_backward_chunks(
        s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, tokens, mask, stats, kl,
        student_entropy, grad_kl, grad_logprob, grad_entropy, grad_lse, inv_temperature,
        chunk_size, need_hidden, need_weight, need_bias)


@_fused_bwd.register_fake
def _(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, tokens, mask, stats, kl,
      student_entropy, grad_kl, grad_logprob, grad_entropy, grad_lse, inv_temperature, chunk_size,
      need_hidden, need_weight, need_bias):
    return (s_hidden.new_empty(s_hidden.shape if need_hidden else (0,)),
            s_weight.new_empty(s_weight.shape if need_weight else (0,)),
            s_weight.new_empty((s_weight.shape[0],) if need_bias else (0,)))


def _setup_context(ctx, inputs, output):
    s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, tokens, mask, inv_t, chunk = inputs
    kl, hs, ht, _lps, lpt, _lses, lset, stats = output
    ctx.mark_non_differentiable(ht, lpt, lset, stats)  # the teacher is never differentiated
    # Unused outputs reach backward as None rather than zeros, so a loss without
    # the KL term skips recomputing the teacher's logits.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, tokens, mask,
                          stats, kl, hs)
    ctx.inv_temperature = inv_t
    ctx.chunk_size = chunk


def _backward(ctx, g_kl, g_hs, _g_ht, g_lps, _g_lpt, g_lses, _g_lset, _g_stats):
    (s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, tokens, mask, stats, kl,
     hs) = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    none = (None,) * 10
    if all(g is None for g in (g_kl, g_hs, g_lps, g_lses)) or not (need_h or need_w or need_b):
        return none
    gh, gw, gb = _fused_bwd(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, tokens, mask,
                            stats, kl, hs, g_kl if t_hidden is not None else None, g_lps, g_hs,
                            g_lses, ctx.inv_temperature, ctx.chunk_size,
                            bool(need_h), bool(need_w), bool(need_b and s_bias is not None))
    return (gh if need_h else None, gw if need_w else None,
            gb if (need_b and s_bias is not None) else None, *none[3:])


torch.library.register_autograd("pyopd::fused_linear_stats_fwd", _backward,
                                setup_context=_setup_context)


# ---------------------------------------------------------------------------
# argument checks (user-facing messages name the argument)
# ---------------------------------------------------------------------------


def _check_linear(hn: str, wn: str, bn: str, hidden: object, weight: object, bias: object):
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"{hn} must be a torch.Tensor, got {type(hidden).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{wn} must be a torch.Tensor, got {type(weight).__name__}")
    for name, x in ((hn, hidden), (wn, weight)):
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
        if x.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name} must be on the CPU or a CUDA device, got {x.device}")
    if hidden.dim() < 2:
        raise ValueError(f"{hn} must have shape [N, H] or [B, T, H], got {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{wn} must have shape [V, H] (an lm_head weight), got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{wn} has shape {tuple(weight.shape)} but {hn} has hidden size "
                         f"H = {hidden.shape[-1]}; {wn} must be [V, {hidden.shape[-1]}]")
    if weight.shape[0] == 0:
        raise ValueError(f"{wn} has an empty vocabulary dimension (V = 0)")
    if math.prod(hidden.shape[:-1]) == 0:
        raise ValueError(f"{hn} has no rows (shape {tuple(hidden.shape)}); pass at least one token")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{wn} ({weight.dtype}) must have the dtype of {hn} ({hidden.dtype})")
    if weight.device != hidden.device:
        raise ValueError(f"{wn} is on {weight.device} but {hn} is on {hidden.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{bn} must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{bn} must have shape ({weight.shape[0]},) (one per row of {wn}), "
                             f"got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"{bn} ({bias.dtype}) must have the dtype of {wn} ({weight.dtype})")
        if bias.device != weight.device:
            raise ValueError(f"{bn} is on {bias.device} but {wn} is on {weight.device}")


def _check_rows(name: str, x: object, lead: tuple, device: torch.device, kind: str,
                hn: str) -> Optional[torch.Tensor]:
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    if tuple(x.shape) != lead:
        raise ValueError(f"{name} must have shape {lead} (the leading dims of {hn}), "
                         f"got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but {hn} is on {device}")
    if kind == "mask" and x.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True where the token counts), got {x.dtype}")
    if kind == "tokens" and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor of token ids, got {x.dtype}")
    return x


def _check_teacher(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_bias,
                   lead):
    dev = student_hidden.device
    v, vt = student_weight.shape[0], teacher_weight.shape[0]
    if tuple(teacher_hidden.shape[:-1]) != lead:
        raise ValueError(f"teacher_hidden leading dims {tuple(teacher_hidden.shape[:-1])} do not "
                         f"match student_hidden {lead}")
    if teacher_hidden.device != dev:
        raise ValueError(f"teacher_hidden is on {teacher_hidden.device} but student_hidden is on {dev}")
    if vt < v:
        raise ValueError(f"teacher_weight has fewer rows ({vt}) than student_weight ({v}); the "
                         "teacher must cover every student id (Vt >= V)")
    if (student_hidden.dtype == torch.float64) != (teacher_hidden.dtype == torch.float64):
        raise TypeError("float64 needs both student_hidden and teacher_hidden in float64 "
                        f"(got {student_hidden.dtype} and {teacher_hidden.dtype})")
    if torch.is_grad_enabled():
        for name, x in (("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                        ("teacher_bias", teacher_bias)):
            if x is not None and x.requires_grad:
                raise ValueError(f"{name} requires grad, but pyopd never differentiates the "
                                 f"teacher; pass {name}.detach()")


def _prepare_pair(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                  teacher_bias, tokens, mask, temperature, chunk_size):
    """The checks and row views shared by the two fused-linear reverse-KL ops: (lead dims,
    student rows [N, H], teacher rows [N, Ht], tokens, mask, temperature, chunk_size or None,
    the wider of the two hidden dtypes)."""
    _check_linear("student_hidden", "student_weight", "student_bias",
                  student_hidden, student_weight, student_bias)
    _check_linear("teacher_hidden", "teacher_weight", "teacher_bias",
                  teacher_hidden, teacher_weight, teacher_bias)
    lead = tuple(student_hidden.shape[:-1])
    _check_teacher(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_bias, lead)
    t = _checks.temperature(temperature)
    chunk = _check_chunk_size(chunk_size)
    tokens, mask = _prepare_rows(tokens, mask, lead, student_hidden.device, student_weight.shape[0],
                                 "student_hidden", "student_weight")
    s_rows = student_hidden.reshape(-1, student_hidden.shape[-1])
    t_rows = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    wide = max((student_hidden.dtype, teacher_hidden.dtype), key=lambda d: d.itemsize)
    return lead, s_rows, t_rows, tokens, mask, t, chunk, wide


def _check_chunk_size(chunk_size: object) -> Optional[int]:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int >= 1 or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (rows per chunk), got {chunk_size}")
    return chunk_size


def _check_token_range(tokens: torch.Tensor, mask: Optional[torch.Tensor], vocab: int, wn: str) -> None:
    # Only rows that count are checked (padding ids such as -100 are fine under
    # a mask). Data-dependent, so skipped while tracing for torch.compile; the
    # kernels never read outside the vocabulary either way.
    if torch.compiler.is_compiling():
        return
    bad = (tokens < 0) | (tokens >= vocab)
    if mask is not None:
        bad &= mask
    if bool(bad.any()):
        first = tokens[bad].flatten()[0].item()
        raise ValueError(f"tokens must lie in [0, {vocab}) (the rows of {wn}) on unmasked rows; "
                         f"found {first}")


def _prepare_rows(tokens, mask, lead, device, vocab, hn, wn):
    tokens = _check_rows("tokens", tokens, lead, device, "tokens", hn)
    mask = _check_rows("mask", mask, lead, device, "mask", hn)
    if tokens is not None:
        _check_token_range(tokens, mask, vocab, wn)
        tokens = tokens.reshape(-1).to(torch.int64).contiguous()
    if mask is not None:
        mask = mask.reshape(-1).contiguous()
    return tokens, mask


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def fused_linear_reverse_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    tokens: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
) -> ReverseKL:
    """`pyopd.reverse_kl` of ``hidden @ weight.T (+ bias)`` for both models, never holding [N, V] logits.

    Args:
        student_hidden: [N, H] or [B, T, H] (the student's last hidden states,
            e.g. ``outputs.hidden_states[-1]``); float32/bfloat16/float16/float64.
        student_weight: [V, H], the student's ``lm_head.weight``, same dtype.
        teacher_hidden: [N, Ht] or [B, T, Ht] (same leading dims; Ht may differ).
        teacher_weight: [Vt, Ht] with Vt >= V (a padded teacher vocabulary is
            fine). Never differentiated (pass detached tensors).
        tokens: sampled ids shaped like the leading dims, or None (log-probs 0).
        mask: bool, shaped like the leading dims; masked rows skip their matmul
            and give zeros and zero gradients.
        temperature: p = softmax(logits / T), q likewise.
        student_bias, teacher_bias: optional [V] / [Vt] lm_head biases.
        chunk_size: rows per chunk; None picks ``default_chunk_size`` (~32 MiB
            of logits a chunk). Results do not depend on it beyond rounding.

    Returns:
        ReverseKL, float32 (float64 for float64 inputs), shaped like the leading
        dims. ``kl``, ``student_entropy``, ``student_logprob`` and ``student_lse``
        are differentiable w.r.t. student_hidden, student_weight and student_bias.
    """
    lead, s_rows, t_rows, tokens, mask, t, chunk, wide = _prepare_pair(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
        tokens, mask, temperature, chunk_size)
    if chunk is None:
        chunk = default_chunk_size(s_rows.shape[0], teacher_weight.shape[0], wide)  # Vt >= V
    out = _fused_fwd(s_rows, student_weight, student_bias, t_rows, teacher_weight, teacher_bias,
                     tokens, mask, 1.0 / t, chunk)
    return ReverseKL._make(x.view(lead) for x in out[:7])


def fused_linear_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
) -> TokenStats:
    """`pyopd.token_stats` of ``hidden @ weight.T (+ bias)`` without materialising the logits.

    Args:
        hidden: [N, H] or [B, T, H]; float32/bfloat16/float16/float64.
        weight: [V, H] (an lm_head weight), same dtype. bias: optional [V].
        tokens, mask, temperature, chunk_size: as in `fused_linear_reverse_kl`.

    Returns:
        TokenStats(logprob, entropy, lse), float32 (float64 for float64 input),
        shaped like the leading dims; differentiable w.r.t. hidden, weight and
        bias. Use it to score a teacher or an old policy.
    """
    _check_linear("hidden", "weight", "bias", hidden, weight, bias)
    lead = tuple(hidden.shape[:-1])
    t = _checks.temperature(temperature)
    chunk = _check_chunk_size(chunk_size)
    tokens, mask = _prepare_rows(tokens, mask, lead, hidden.device, weight.shape[0], "hidden", "weight")
    rows = hidden.reshape(-1, hidden.shape[-1])
    if chunk is None:
        chunk = default_chunk_size(rows.shape[0], weight.shape[0], hidden.dtype)
    _kl, hs, _ht, lps, _lpt, lses, _lset, _stats = _fused_fwd(
        rows, weight, bias, None, None, None, tokens, mask, 1.0 / t, chunk)
    return TokenStats(logprob=lps.view(lead), entropy=hs.view(lead), lse=lses.view(lead))


# ---------------------------------------------------------------------------
# pure-PyTorch references (materialise the logits; ground truth of the tests)
# ---------------------------------------------------------------------------


def _linear(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], dt: torch.dtype) -> torch.Tensor:
    return torch.nn.functional.linear(h.to(dt), w.to(dt), None if b is None else b.to(dt))


def fused_linear_reverse_kl_ref(
    student_hidden: torch.Tensor, student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
    tokens: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None, *,
    temperature: float = 1.0, student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None, compute_dtype: torch.dtype = torch.float32,
) -> ReverseKL:
    """Reference: `reverse_kl_ref` of the materialised logits, matmul and softmax in ``compute_dtype``."""
    s = _linear(student_hidden, student_weight, student_bias, compute_dtype)
    t = _linear(teacher_hidden.detach(), teacher_weight.detach(),
                None if teacher_bias is None else teacher_bias.detach(), compute_dtype)
    return reverse_kl_ref(s, t, tokens, mask=mask, temperature=temperature,
                          compute_dtype=compute_dtype)


def fused_linear_token_stats_ref(
    hidden: torch.Tensor, weight: torch.Tensor, tokens: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None, *, temperature: float = 1.0,
    bias: Optional[torch.Tensor] = None, compute_dtype: torch.dtype = torch.float32,
) -> TokenStats:
    """Reference: `token_stats_ref` of ``hidden @ weight.T (+ bias)`` in ``compute_dtype``."""
    return token_stats_ref(_linear(hidden, weight, bias, compute_dtype), tokens, mask=mask,
                           temperature=temperature, compute_dtype=compute_dtype)
