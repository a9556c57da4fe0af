"""pyopd.fused_linear_reverse_kl_loss: sum(coef * KL) with its gradient computed in the forward.

Ground truth: the float64 materialised reference `fused_linear_reverse_kl_ref`
and ``(coef * kl * mask).sum()`` through autograd; and the recompute-in-backward
op `fused_linear_reverse_kl` with the same loss.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pyopd
from pyopd.ops import fused_linear_loss
from pyopd.ops.fused_linear import fused_linear_reverse_kl_ref
from pyopd.ops.fused_linear_loss import fused_linear_loss_chunks
from _helpers import DEVICES, assert_close
from test_fused_linear import FIELDS_KL, _LargestTensor, _case, _mask, _randn

F64 = torch.float64


def _coef(lead, seed: int, dtype=F64, device="cpu") -> torch.Tensor:
    """Coefficients with zeros and negatives (e.g. advantages times a weight)."""
    c = _randn(*lead, seed=seed, dtype=F64)
    flat = c.view(-1)
    flat[::3] = 0.0
    return c.to(dtype).to(device)


def _full_mask(lead, kind: str, device="cpu"):
    if kind == "all_true":
        return torch.ones(lead, dtype=torch.bool, device=device)
    return _mask(lead, kind, device)


def _ours(s_h, s_w, s_b, t_h, t_w, t_b, coef, y, mask, temperature, chunk):
    """(loss, fields, grads w.r.t. the inputs among s_h, s_w, s_b that are not None)."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (s_h, s_w, s_b)]
    loss, r = pyopd.fused_linear_reverse_kl_loss(
        leaves[0], leaves[1], t_h, t_w, coef, y, mask, temperature=temperature,
        student_bias=leaves[2], teacher_bias=t_b, chunk_size=chunk)
    grads = torch.autograd.grad(loss, [x for x in leaves if x is not None])
    return loss.detach(), r, grads


def _reference(s_h, s_w, s_b, t_h, t_w, t_b, coef, y, mask, temperature, compute_dtype=F64):
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (s_h, s_w, s_b)]
    r = fused_linear_reverse_kl_ref(leaves[0], leaves[1], t_h, t_w, y, mask, temperature=temperature,
                                    student_bias=leaves[2], teacher_bias=t_b,
                                    compute_dtype=compute_dtype)
    valid = torch.ones_like(r.kl, dtype=torch.bool) if mask is None else mask
    c = torch.where(valid, coef.to(r.kl.dtype), torch.zeros_like(r.kl))
    loss = (c * r.kl * valid).sum()
    grads = torch.autograd.grad(loss, [x for x in leaves if x is not None])
    return loss.detach(), r, grads


# --------------------------------------------------------------------------- vs float64 reference


CASES = [
    # lead, H, V, Ht, Vt, chunk, bias, mask, temperature
    ((13,), 8, 31, 8, 31, 4, False, "none", 1.0),        # N not a multiple of the chunk, V odd
    ((13,), 8, 31, 6, 40, 1, True, "some", 0.7),         # chunk 1, Vt > V, Ht != H, bias
    ((2, 7), 12, 65, 10, 70, 3, True, "some", 2.0),      # [B, T, H]
    ((9,), 5, 17, 5, 17, None, False, "some", 1.0),      # default chunk (one chunk)
    ((10,), 6, 23, 6, 29, 4, True, "all_true", 1.3),     # a mask in which every row counts
    ((6,), 4, 9, 4, 11, 2, True, "all_false", 1.0),      # nothing counts
    ((1,), 3, 1, 3, 2, 1, False, "none", 1.0),           # V = 1
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,h,v,ht,vt,chunk,bias,mask_kind,temperature", CASES)
def test_matches_float64_reference(device, lead, h, v, ht, vt, chunk, bias, mask_kind, temperature):
    s_h, s_w, s_b, t_h, t_w, t_b, y = _case(lead, h, v, ht, vt, bias=bias, device=device, seed=51)
    mask = _full_mask(lead, mask_kind, device)
    coef = _coef(lead, 52, device=device)
    args = (s_h, s_w, s_b, t_h, t_w, t_b, coef, y, mask, temperature)
    loss, r, grads = _ours(*args, chunk)
    ref_loss, ref, ref_grads = _reference(*args)
    assert loss.shape == () and loss.dtype == F64
    assert_close(loss, ref_loss, atol=1e-11, rtol=1e-10, what="loss")
    for f in FIELDS_KL:
        x = getattr(r, f)
        assert x.shape == lead and x.dtype == F64 and not x.requires_grad, f
        assert_close(x, getattr(ref, f), atol=1e-12, rtol=1e-10, what=f)
    names = ("grad_hidden", "grad_weight", "grad_bias")
    for name, a, e in zip(names, grads, ref_grads):
        assert a.shape == e.shape and a.dtype == F64, name
        assert_close(a, e, atol=1e-11, rtol=1e-9, what=name)
    if mask_kind == "all_false":
        assert float(loss) == 0.0
        assert all(bool((a == 0).all()) for a in grads)
    if mask is not None and mask_kind != "all_true":
        assert bool((grads[0][~mask] == 0).all()), "masked rows must get zero gradient"


@pytest.mark.parametrize("device", DEVICES)
def test_masked_rows_coefficients_are_ignored(device):
    """A NaN / inf coefficient on a masked row is never read (neither loss nor gradient)."""
    lead = (3, 5)
    s_h, s_w, s_b, t_h, t_w, t_b, y = _case(lead, 6, 21, 6, 21, bias=True, device=device, seed=53)
    mask = _mask(lead, "some", device)
    coef = _coef(lead, 54, device=device)
    dirty = torch.where(mask, coef, torch.full_like(coef, math.nan))
    dirty[~mask & (torch.arange(15, device=device).view(lead) % 2 == 0)] = math.inf
    args = (s_h, s_w, s_b, t_h, t_w, t_b)
    a = _ours(*args, dirty, y, mask, 1.0, 4)
    b = _ours(*args, coef, y, mask, 1.0, 4)
    assert bool(a[0].isfinite()) and torch.equal(a[0], b[0])
    for x, e in zip(a[2], b[2]):
        assert torch.equal(x, e)


# --------------------------------------------------------------------------- vs the recompute op


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [3, 64])
def test_same_numbers_as_fused_linear_reverse_kl(device, chunk):
    """Same inputs, same loss: the recompute-in-backward op + autograd gives the same numbers."""
    lead = (4, 9)
    s_h, s_w, s_b, t_h, t_w, t_b, y = _case(lead, 16, 77, 12, 80, bias=True, dtype=torch.float32,
                                            device=device, seed=55)
    mask = _mask(lead, "some", device)
    coef = _coef(lead, 56, dtype=torch.float32, device=device)
    loss, r, grads = _ours(s_h, s_w, s_b, t_h, t_w, t_b, coef, y, mask, 0.8, chunk)

    leaves = [x.clone().requires_grad_() for x in (s_h, s_w, s_b)]
    r2 = pyopd.fused_linear_reverse_kl(leaves[0], leaves[1], t_h, t_w, y, mask, temperature=0.8,
                                       student_bias=leaves[2], teacher_bias=t_b, chunk_size=chunk)
    loss2 = (coef * r2.kl).sum()
    loss2.backward()
    assert loss.dtype == torch.float32
    assert_close(loss, loss2, atol=1e-5, rtol=1e-6, what="loss")
    for f in FIELDS_KL:  # the same kernel on the same chunk logits
        assert torch.equal(getattr(r, f), getattr(r2, f).detach()), f
    for name, a, x in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, leaves):
        assert a.dtype == torch.float32
        assert_close(a, x.grad, atol=1e-6, rtol=1e-5, what=name)


def test_upstream_gradient_scales_the_saved_gradients():
    s_h, s_w, s_b, t_h, t_w, t_b, y = _case((11,), 5, 19, 5, 19, bias=True, seed=57)
    coef = _coef((11,), 58)
    x = s_h.clone().requires_grad_()
    loss, _ = pyopd.fused_linear_reverse_kl_loss(x, s_w, t_h, t_w, coef, y, chunk_size=4)
    (2.5 * loss).backward()
    _, _, ref = _reference(s_h, s_w, None, t_h, t_w, None, coef, y, None, 1.0)
    assert_close(x.grad, 2.5 * ref[0], atol=1e-12, rtol=1e-10, what="grad_hidden")


def test_unit_upstream_gradient_with_a_retained_graph():
    """The gradients are computed once, in the forward, and saved: backward twice and three times
    on a retained graph must still give 2x and 3x the gradient (handing the saved tensor itself
    to autograd for an upstream gradient of 1 broke this), and a non-leaf consumer gets the
    same values."""
    s_h, s_w, s_b, t_h, t_w, t_b, y = _case((11,), 5, 19, 5, 19, bias=True, seed=59)
    coef = _coef((11,), 60)
    _, _, ref = _reference(s_h, s_w, None, t_h, t_w, None, coef, y, None, 1.0)
    x = s_h.clone().requires_grad_()
    w = s_w.clone().requires_grad_()
    loss, _ = pyopd.fused_linear_reverse_kl_loss(x, w, t_h, t_w, coef, y, chunk_size=4)
    for k in (1, 2, 3):
        loss.backward(retain_graph=True)
        assert_close(x.grad, k * ref[0], atol=1e-12, rtol=1e-10, what=f"grad_hidden x{k}")
        assert_close(w.grad, k * ref[1], atol=1e-12, rtol=1e-10, what=f"grad_weight x{k}")
    leaf = s_h.clone().requires_grad_()
    loss2, _ = pyopd.fused_linear_reverse_kl_loss(leaf * 1.0, s_w, t_h, t_w, coef, y, chunk_size=4)
    (g,) = torch.autograd.grad(loss2, leaf)
    assert_close(g, ref[0], atol=1e-12, rtol=1e-10, what="through a non-leaf")


# --------------------------------------------------------------------------- gradcheck (float64)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradcheck(temperature):
    s_h, s_w, s_b, t_h, t_w, t_b, y = _case((5,), 3, 7, 4, 9, bias=True, seed=59)
    mask = torch.tensor([True, False, True, True, True])
    coef = torch.tensor([0.5, 3.0, -1.25, 0.0, 2.0], dtype=F64)

    def fn(a, b, c):
        return pyopd.fused_linear_reverse_kl_loss(a, b, t_h, t_w, coef, y, mask,
                                                  temperature=temperature, student_bias=c,
                                                  teacher_bias=t_b, chunk_size=2)[0]

    args = tuple(x.clone().requires_grad_() for x in (s_h, s_w, s_b))
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8)


# --------------------------------------------------------------------------- which gradients


class _MatmulCounter(TorchDispatchMode):
    """Counts the matmuls; records the flags and gradient shapes of each call of the loss op."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.loss_ops = []
        self.chunk_sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            self.calls.append(name)
        out = func(*args, **(kwargs or {}))
        if name == "fused_linear_rkl_loss":
            self.loss_ops.append((tuple(args[11:14]), tuple(tuple(g.shape) for g in out[8:])))
            self.chunk_sizes.append(args[10])
        return out


@pytest.mark.parametrize("need", ["all", "hidden", "weight", "none"])
def test_four_matmuls_per_chunk_and_only_the_needed_gradients(need):
    """2 logits matmuls per chunk, plus one per gradient asked for (hidden, weight)."""
    n, chunk = 10, 4
    s_h, s_w, s_b, t_h, t_w, t_b, y = _case((n,), 4, 13, 4, 13, bias=True, seed=60)
    coef = _coef((n,), 61)
    nh, nw = need in ("all", "hidden"), need in ("all", "weight")
    nb = need == "all"
    with _MatmulCounter() as mode:
        out = fused_linear_loss_chunks(s_h, s_w, s_b, t_h, t_w, t_b, coef, y, None, 1.0, chunk,
                                       nh, nw, nb)
    chunks = math.ceil(n / chunk)
    assert len(mode.calls) == chunks * (2 + nh + nw), mode.calls
    gh, gw, gb = out[8:]
    assert gh.shape == (s_h.shape if nh else (0,))
    assert gw.shape == (s_w.shape if nw else (0,))
    assert gb.shape == ((13,) if nb else (0,))


def test_frozen_lm_head_gives_grad_hidden_only():
    s_h, s_w, s_b, t_h, t_w, t_b, y = _case((10,), 4, 13, 4, 13, bias=True, seed=60)
    coef = _coef((10,), 61)
    x = s_h.clone().requires_grad_()
    with _MatmulCounter() as mode:
        loss, _ = pyopd.fused_linear_reverse_kl_loss(x, s_w, t_h, t_w, coef, y, student_bias=s_b,
                                                     teacher_bias=t_b, chunk_size=4)
    assert mode.loss_ops == [((True, False, False), ((10, 4), (0,), (0,)))]
    loss.backward()
    x2 = s_h.clone().requires_grad_()
    r = fused_linear_reverse_kl_ref(x2, s_w, t_h, t_w, y, student_bias=s_b, teacher_bias=t_b,
                                    compute_dtype=F64)
    (r.kl * coef).sum().backward()
    assert_close(x.grad, x2.grad, atol=1e-12, rtol=1e-10, what="grad_hidden")


def test_no_grad_mode_computes_no_gradient():
    s_h, s_w, s_b, t_h, t_w, _, y = _case((6,), 4, 13, 4, 13, bias=True, seed=62)
    coef = _coef((6,), 63)
    leaves = [x.clone().requires_grad_() for x in (s_h, s_w, s_b)]
    with torch.no_grad(), _MatmulCounter() as mode:
        loss, r = pyopd.fused_linear_reverse_kl_loss(leaves[0], leaves[1], t_h, t_w, coef, y,
                                                     student_bias=leaves[2], chunk_size=2)
    assert not loss.requires_grad
    assert mode.loss_ops == [((False, False, False), ((0,), (0,), (0,)))]
    ref = fused_linear_reverse_kl_ref(s_h, s_w, t_h, t_w, y, student_bias=s_b, compute_dtype=F64)
    assert_close(loss, (coef * ref.kl).sum(), atol=1e-12, rtol=1e-10, what="loss")


# --------------------------------------------------------------------------- low precision


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [4, 96])
def test_low_precision_within_twice_torch_error(device, dtype, chunk):
    """Error vs the float64 reference <= 2x that of PyTorch doing the same math in `dtype`
    (the rule of tests/test_fused_linear.py), with many chunks and with one."""
    lead, h, v, ht, vt = (96,), 64, 1000 + 3, 48, 1024
    s_h, s_w, s_b, t_h, t_w, t_b, y = _case(lead, h, v, ht, vt, bias=True, dtype=dtype,
                                            device=device, seed=64)
    mask = _mask(lead, "some", device)
    coef = _coef(lead, 65, device=device)
    loss_e, exact, g_exact = _reference(s_h.double(), s_w.double(), s_b.double(), t_h.double(),
                                        t_w.double(), t_b.double(), coef, y, mask, 0.9)
    loss_o, ours, g_ours = _ours(s_h, s_w, s_b, t_h, t_w, t_b, coef.float(), y, mask, 0.9, chunk)
    _, low, g_torch = _reference(s_h, s_w, s_b, t_h, t_w, t_b, coef.to(dtype), y, mask, 0.9,
                                 compute_dtype=dtype)
    assert loss_o.dtype == torch.float32
    for f in FIELDS_KL:
        e_ours = (getattr(ours, f).double() - getattr(exact, f)).abs().max().item()
        e_torch = (getattr(low, f).double() - getattr(exact, f)).abs().max().item()
        assert e_ours <= 2 * e_torch + 1e-6, (f, e_ours, e_torch)
    # The loss is a signed sum of the per-row KLs, whose errors cancel more or
    # less by chance (PyTorch's fp16 loss on a GPU landed 0.0005 off, on the CPU
    # 0.036; ours 0.007 on both): no 2x rule for it. It must be the float64 sum
    # of its own per-row KLs to float32 rounding, which bounds its error by
    # sum |coef_i| * (the per-row error checked above).
    valid = mask.double()
    own = (coef * ours.kl.double() * valid).sum()
    assert_close(loss_o, own, atol=1e-5, rtol=1e-6, what="loss")
    bound = (coef.abs() * valid).sum() * 2 * max((low.kl.double() - exact.kl).abs().max().item(), 1e-6)
    assert abs(loss_o.double() - loss_e).item() <= bound
    for name, a, b, e in zip(("grad_hidden", "grad_weight", "grad_bias"), g_ours, g_torch, g_exact):
        assert a.dtype == dtype, name
        e_ours = (a.double() - e).abs().max().item()
        e_torch = (b.double() - e).abs().max().item()
        assert e_ours <= 2 * e_torch + 1e-6, (name, e_ours, e_torch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_grad_weight_does_not_degrade_with_more_chunks(dtype):
    """grad_weight summed over 192 one-row chunks (float32 running sum) is as accurate as one
    chunk (mean absolute error vs float64); a bf16/fp16 running sum would be ~2x worse."""
    lead, h, v, ht, vt = (192,), 32, 503, 24, 512
    s_h, s_w, s_b, t_h, t_w, t_b, y = _case(lead, h, v, ht, vt, bias=True, dtype=dtype, seed=66)
    coef = _coef(lead, 67) + 0.5
    _, _, exact = _reference(s_h.double(), s_w.double(), s_b.double(), t_h.double(), t_w.double(),
                             t_b.double(), coef, y, None, 1.0)

    def errors(chunk):
        _, _, g = _ours(s_h, s_w, s_b, t_h, t_w, t_b, coef.float(), y, None, 1.0, chunk)
        return [((a.double() - e).abs().mean().item(), (a.double() - e).abs().max().item())
                for a, e in zip(g, exact)]

    one, many = errors(192), errors(1)
    for name, (mean1, max1), (mean_n, max_n) in zip(("grad_hidden", "grad_weight", "grad_bias"),
                                                    one, many):
        assert mean_n <= 1.25 * mean1 + 1e-9, (name, mean_n, mean1)
        assert max_n <= 2.0 * max1 + 1e-6, (name, max_n, max1)


# --------------------------------------------------------------------------- memory: no [N, V] tensor


def test_no_tensor_of_n_times_v_elements_is_created():
    n, h, v, ht, vt, chunk = 64, 8, 300, 6, 310, 8
    s_h, s_w, s_b, t_h, t_w, t_b, y = _case((n,), h, v, ht, vt, bias=True, dtype=torch.float32,
                                            seed=68)
    mask = _mask((n,), "some")
    coef = _coef((n,), 69, dtype=torch.float32)
    with _LargestTensor() as mode:
        out = fused_linear_loss_chunks(s_h, s_w, s_b, t_h, t_w, t_b, coef, y, mask, 1.0, chunk,
                                       True, True, True)
    # Chunk-sized logits and weight-sized gradients only; nothing grows with N x V.
    assert mode.largest <= max(chunk * vt, v * h), mode.largest
    assert mode.largest < n * v
    ref = fused_linear_reverse_kl_ref(s_h, s_w, t_h, t_w, y, mask, student_bias=s_b,
                                      teacher_bias=t_b)
    assert_close(out[1], ref.kl, atol=2e-5, rtol=2e-5, what="kl")
    assert out[8].shape == s_h.shape and out[9].shape == s_w.shape and out[10].shape == (v,)


# --------------------------------------------------------------------------- torch.compile, opcheck


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_works_under_torch_compile_fullgraph(dynamic):
    torch._dynamo.reset()
    s_h, s_w, s_b, t_h, t_w, t_b, y = _case((2, 6), 8, 45, 6, 50, bias=True, dtype=torch.float32,
                                            seed=70)
    mask = _mask((2, 6), "some")
    coef = _coef((2, 6), 71, dtype=torch.float32)

    def loss_fn(h, w, b, c):
        loss, r = pyopd.fused_linear_reverse_kl_loss(h, w, t_h, t_w, c, y, mask, temperature=0.9,
                                                     student_bias=b, teacher_bias=t_b,
                                                     chunk_size=5)
        return loss, r.kl

    a = [x.clone().requires_grad_() for x in (s_h, s_w, s_b)]
    eager, kl_e = loss_fn(*a, coef)
    eager.backward()
    c = [x.clone().requires_grad_() for x in (s_h, s_w, s_b)]
    cfn = torch.compile(loss_fn, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    compiled, kl_c = cfn(*c, coef)
    compiled.backward()
    assert torch.equal(kl_c, kl_e)
    assert_close(compiled, eager, atol=1e-6, what="loss")
    for name, x, e in zip(("hidden", "weight", "bias"), c, a):
        assert_close(x.grad, e.grad, atol=1e-6, what=f"grad_{name}")
    # the coefficient check runs on the concrete values inside the compiled graph
    bad = coef.clone()
    row = tuple(int(i) for i in mask.nonzero()[0])  # an unmasked row
    bad[row] = math.nan
    with pytest.raises(ValueError, match="coef must be finite"):
        cfn(*[x.detach() for x in c], bad)
    torch._dynamo.reset()


def test_compile_dynamic_default_chunk_two_shapes():
    """chunk_size=None under dynamic shapes: the default chunk is derived from a symbolic N."""
    torch._dynamo.reset()

    def fn(h, w, c, t_h, t_w, y):
        return pyopd.fused_linear_reverse_kl_loss(h, w, t_h, t_w, c, y)[0]

    cfn = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for n, seed in ((7, 77), (12, 78)):
        s_h, s_w, _, t_h, t_w, _, y = _case((n,), 8, 20, 8, 24, bias=False, dtype=torch.float32,
                                            seed=seed)
        c = _coef((n,), seed + 1, dtype=torch.float32)
        x1, x2 = s_h.clone().requires_grad_(), s_h.clone().requires_grad_()
        fn(x1, s_w, c, t_h, t_w, y).backward()
        loss = cfn(x2, s_w, c, t_h, t_w, y)
        loss.backward()
        assert_close(loss, fn(s_h, s_w, c, t_h, t_w, y), atol=1e-6, what="loss")
        assert_close(x2.grad, x1.grad, atol=1e-7, what="grad_hidden")
    torch._dynamo.reset()


def test_opcheck():
    s_h, s_w, s_b, t_h, t_w, t_b, y = _case((6,), 4, 11, 5, 13, bias=True, dtype=torch.float32,
                                            seed=72)
    mask = torch.tensor([True, False, True, True, True, True])
    coef = _coef((6,), 73, dtype=torch.float32)
    op = torch.ops.pyopd.fused_linear_rkl_loss.default
    leaves = [x.clone().requires_grad_() for x in (s_h, s_w, s_b)]
    torch.library.opcheck(op, (*leaves, t_h, t_w, t_b, coef, y, mask, 1.25, 4, True, True, True))
    torch.library.opcheck(op, (s_h, s_w, None, t_h, t_w, None, coef, None, None, 0.8, 2, False,
                               False, False))


# --------------------------------------------------------------------------- bad input


def _ok():
    s_h, s_w, s_b, t_h, t_w, t_b, y = _case((4,), 3, 10, 5, 12, bias=True, dtype=torch.float32,
                                            seed=74)
    return dict(student_hidden=s_h, student_weight=s_w, teacher_hidden=t_h, teacher_weight=t_w,
                coef=torch.ones(4), tokens=y, student_bias=s_b, teacher_bias=t_b)


@pytest.mark.parametrize("case,exc,match", [
    ("coef_none", TypeError, "coef must be a torch.Tensor"),
    ("coef_list", TypeError, "coef must be a torch.Tensor"),
    ("coef_shape", ValueError, r"coef must have shape \(4,\)"),
    ("coef_device", ValueError, "coef is on meta but student_hidden is on cpu"),
    ("coef_int", TypeError, "coef must be a floating-point tensor"),
    ("coef_bool", TypeError, "coef must be a floating-point tensor"),
    ("coef_nan", ValueError, r"coef must be finite on unmasked rows; found nan at .* row 2"),
    ("coef_inf", ValueError, r"coef must be finite on unmasked rows; found -inf"),
    ("coef_grad", ValueError, r"coef requires grad.*coef.detach\(\)"),
    ("teacher_hidden_grad", ValueError, r"teacher_hidden requires grad"),
    ("teacher_bias_grad", ValueError, r"teacher_bias requires grad"),
    ("teacher_small", ValueError, r"Vt >= V"),
    ("teacher_rows", ValueError, "teacher_hidden leading dims"),
    ("mixed_fp64", TypeError, "float64 needs both"),
    ("weight_h", ValueError, r"student_weight must be \[V, 3\]"),
    ("tokens_high", ValueError, r"tokens must lie in \[0, 10\)"),
    ("chunk_zero", ValueError, "chunk_size must be >= 1"),
    ("temp_zero", ValueError, "temperature must be a finite number > 0"),
])
def test_bad_input_raises_naming_the_argument(case, exc, match):
    kw = _ok()
    if case == "coef_none":
        kw["coef"] = None
    elif case == "coef_list":
        kw["coef"] = [1.0] * 4
    elif case == "coef_shape":
        kw["coef"] = torch.ones(1, 4)
    elif case == "coef_device":
        kw["coef"] = torch.ones(4, device="meta")
    elif case == "coef_int":
        kw["coef"] = torch.ones(4, dtype=torch.int64)
    elif case == "coef_bool":
        kw["coef"] = torch.ones(4, dtype=torch.bool)
    elif case == "coef_nan":
        kw["coef"] = torch.tensor([1.0, 2.0, math.nan, 0.0])
    elif case == "coef_inf":
        kw["coef"] = torch.tensor([1.0, -math.inf, 1.0, 0.0], dtype=torch.bfloat16)
    elif case == "coef_grad":
        kw["coef"] = torch.ones(4, requires_grad=True)
    elif case == "teacher_hidden_grad":
        kw["teacher_hidden"] = kw["teacher_hidden"].clone().requires_grad_()
    elif case == "teacher_bias_grad":
        kw["teacher_bias"] = kw["teacher_bias"].clone().requires_grad_()
    elif case == "teacher_small":
        kw["teacher_weight"], kw["teacher_bias"] = kw["teacher_weight"][:9], None
    elif case == "teacher_rows":
        kw["teacher_hidden"] = kw["teacher_hidden"][:3]
    elif case == "mixed_fp64":
        for k in ("student_hidden", "student_weight", "student_bias"):
            kw[k] = kw[k].double()
    elif case == "weight_h":
        kw["student_weight"] = kw["student_weight"][:, :2]
    elif case == "tokens_high":
        kw["tokens"] = kw["tokens"].clone()
        kw["tokens"][1] = 10
    elif case == "chunk_zero":
        kw["chunk_size"] = 0
    elif case == "temp_zero":
        kw["temperature"] = 0.0
    with pytest.raises(exc, match=match):
        pyopd.fused_linear_reverse_kl_loss(**kw)


@pytest.mark.cuda
@pytest.mark.skipif(not pyopd.cuda_available(), reason="no CUDA device / CUDA build")
def test_non_finite_coef_fires_a_device_assert_on_cuda():
    """On CUDA the check does not synchronise: a device-side assert fires (in a child process,
    since it poisons the CUDA context)."""
    import subprocess
    import sys
    import tempfile

    from _helpers import subprocess_env

    code = (
        "import torch, pyopd\n"
        "h = torch.randn(4, 3, device='cuda'); w = torch.randn(10, 3, device='cuda')\n"
        "c = torch.tensor([1.0, float('nan'), 1.0, 1.0], device='cuda')\n"
        "loss, _ = pyopd.fused_linear_reverse_kl_loss(h, w, h, w, c)\n"
        "torch.cuda.synchronize()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=subprocess_env(), cwd=tempfile.gettempdir(), timeout=300)
    assert proc.returncode != 0
    assert "coef must be finite" in proc.stderr or "assert" in proc.stderr.lower(), proc.stderr


def test_default_chunk_has_at_least_a_quarter_of_hidden_rows(monkeypatch):
    from pyopd.ops import fused_linear
    from pyopd.ops.fused_linear_loss import loss_chunk_size

    # 32 MiB of bf16 logits at V = 151936 is 110 rows; H = 4096 asks for 1024
    assert loss_chunk_size(8192, 151936, 4096, torch.bfloat16) == 1024
    assert loss_chunk_size(500, 151936, 4096, torch.bfloat16) == 500
    assert loss_chunk_size(10**6, 1000, 64, torch.float32) == fused_linear.DEFAULT_CHUNK_BYTES // 4000
    # the public function uses it: with 16-byte "32 MiB" chunks (1 row), H = 40 gives 10 rows
    monkeypatch.setattr(fused_linear, "DEFAULT_CHUNK_BYTES", 16)
    s_h, s_w, _, t_h, t_w, _, y = _case((25,), 40, 7, 40, 9, bias=False, seed=75)
    coef = _coef((25,), 76)
    x = s_h.clone().requires_grad_()
    with _MatmulCounter() as mode:
        loss, _ = pyopd.fused_linear_reverse_kl_loss(x, s_w, t_h, t_w, coef, y)
    assert mode.chunk_sizes == [10]
    loss.backward()
    _, _, ref = _reference(s_h, s_w, None, t_h, t_w, None, coef, y, None, 1.0)
    assert_close(x.grad, ref[0], atol=1e-12, rtol=1e-10, what="grad_hidden")


def test_exported_from_pyopd_and_ops():
    from pyopd import ops

    assert pyopd.fused_linear_reverse_kl_loss is fused_linear_loss.fused_linear_reverse_kl_loss
    assert ops.fused_linear_reverse_kl_loss is fused_linear_loss.fused_linear_reverse_kl_loss
    assert "fused_linear_reverse_kl_loss" in pyopd.__all__ and "fused_linear_reverse_kl_loss" in ops.__all__
