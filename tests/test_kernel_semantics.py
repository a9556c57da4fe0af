"""Semantics of the vocabulary kernels at the edges (issue "Reliability", items 2-5).

Each test pins one rule that an earlier kernel broke:
  * without `tokens`, logprob is the constant 0 and its upstream gradient is ignored;
  * a row whose forward is not finite gets a NaN gradient (masked rows: zeros);
  * the scaled logit z = x * (1/T) is rounded on its own: log-probs stay <= 0
    and match the float64 reference computed on that fp32 z;
  * a +inf logit gives lse = +inf; KL = +inf whenever the student has a finite
    logit where the teacher has -inf, even if that probability underflows.
Every ISA path of the CPU kernels is run (PYOPD_CPU_ISA), since each is its own build.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import pyopd
from pyopd.ops import reverse_kl_ref, token_stats_ref
from _helpers import DEVICES, assert_close

NAN, INF = math.nan, math.inf


def _isas() -> list[str]:
    compiled = pyopd.build_info()["cpu_isa_compiled"].split(",")
    before = os.environ.get("PYOPD_CPU_ISA")
    ok = []
    try:
        for isa in compiled:
            os.environ["PYOPD_CPU_ISA"] = isa
            try:
                pyopd.build_info()
                ok.append(isa)
            except ValueError:  # this CPU lacks it
                pass
    finally:
        if before is None:
            os.environ.pop("PYOPD_CPU_ISA", None)
        else:
            os.environ["PYOPD_CPU_ISA"] = before
    return ok


@pytest.fixture(params=_isas())
def isa(request, monkeypatch):
    monkeypatch.setenv("PYOPD_CPU_ISA", request.param)
    assert pyopd.build_info()["cpu_isa"] == request.param
    return request.param


def _grad(fn, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_()
    fn(x).backward()
    return x.grad


# ---- item 2: no tokens -> logprob is a constant ----------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_logprob_without_tokens_has_zero_gradient(isa, device, dtype):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 300, generator=g, dtype=torch.float64).to(dtype).to(device)
    t = torch.randn(5, 300, generator=g, dtype=torch.float64).to(dtype).to(device)
    w = torch.randn(5, generator=g, dtype=torch.float64).to(device)
    gz = _grad(lambda x: (pyopd.token_stats(x, temperature=0.7).logprob * w).sum(), s)
    assert bool((gz == 0).all()), "d logprob / d logits must be 0 without tokens"
    gz = _grad(lambda x: (pyopd.reverse_kl(x, t).student_logprob * w).sum(), s)
    assert bool((gz == 0).all())
    # Mixed with a real signal: the logprob term adds nothing.
    both = _grad(lambda x: (pyopd.reverse_kl(x, t).kl + 3 * pyopd.reverse_kl(x, t).student_logprob)
                 .sum(), s)
    kl_only = _grad(lambda x: pyopd.reverse_kl(x, t).kl.sum(), s)
    assert torch.equal(both, kl_only)


# ---- item 3: non-finite forward -> NaN gradient -----------------------------


def _awkward_student(v: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, v, generator=g, dtype=torch.float64)
    s[0, 7] = NAN          # NaN logit
    s[1, 9] = INF          # +inf logit
    s[2, :] = -INF         # all -inf
    s[4, 3] = NAN          # masked out below: stays zero
    return s.to(dtype)     # rows 3 and 5 are ordinary


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("field", ["kl", "student_entropy", "student_logprob", "student_lse"])
def test_non_finite_rows_get_nan_gradient(isa, dtype, field):
    v = 3000  # more than one tile
    s = _awkward_student(v, dtype)
    g = torch.Generator().manual_seed(2)
    t = torch.randn(6, v, generator=g, dtype=torch.float64).to(dtype)
    y = torch.tensor([1, 2, 3, 4, 5, 6])
    mask = torch.tensor([True, True, True, True, False, True])
    grad = _grad(lambda x: getattr(pyopd.reverse_kl(x, t, y, mask=mask), field).sum(), s)
    for r in (0, 1, 2):
        assert bool(grad[r].isnan().all()), f"row {r}: non-finite forward needs a NaN gradient"
    assert bool((grad[4] == 0).all()), "masked rows keep a zero gradient"
    ok = [3, 5]
    ref = _grad(lambda x: getattr(reverse_kl_ref(x, t, y, compute_dtype=torch.float64), field)[ok]
                .sum(), s.double())
    assert_close(grad[ok], ref[ok], atol=1e-6 if dtype == torch.float32 else 1e-12, what=field)


def test_infinite_kl_poisons_only_what_depends_on_it(isa):
    # Row 0: the student has mass where the teacher has none (KL = +inf).
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 700, generator=g)
    t = torch.randn(2, 700, generator=g)
    t[0, 11] = -INF
    y = torch.tensor([0, 1])
    r = pyopd.reverse_kl(s, t, y)
    assert r.kl[0].item() == INF and math.isfinite(r.kl[1].item())
    g_kl = _grad(lambda x: pyopd.reverse_kl(x, t, y).kl.sum(), s)
    assert bool(g_kl[0].isnan().all()) and bool(g_kl[1].isfinite().all())
    # Entropy and log-prob do not depend on the teacher: finite, as in PyTorch.
    g_h = _grad(lambda x: (pyopd.reverse_kl(x, t, y).student_entropy
                           + pyopd.reverse_kl(x, t, y).student_logprob).sum(), s)
    ref = _grad(lambda x: (reverse_kl_ref(x, t, y, compute_dtype=torch.float64).student_entropy
                           + reverse_kl_ref(x, t, y, compute_dtype=torch.float64).student_logprob)
                .sum(), s.double())
    assert_close(g_h, ref, atol=1e-6, what="entropy+logprob grad")
    # An upstream gradient of exactly 0 on the infinite KL leaves the row alone.
    g0 = _grad(lambda x: (pyopd.reverse_kl(x, t, y).kl * torch.tensor([0.0, 1.0])).sum(), s)
    assert bool(g0.isfinite().all()) and bool((g0[0] == 0).all())


# ---- item 4: temperature rounding, log-probs <= 0 ---------------------------


def _scaled_fp32(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """z = fp32(x * fp32(1 / T)): the kernels' scaled logit, exactly."""
    inv_t = torch.tensor(1.0 / temperature, dtype=torch.float32)
    return x.float() * inv_t


def test_issue_example_logprob_not_positive(isa):
    x = torch.tensor([[-1.4756, 12.8085]])
    r = pyopd.token_stats(x, torch.tensor([1]), temperature=1e-3)
    assert r.logprob.item() <= 0.0
    ref = token_stats_ref(_scaled_fp32(x, 1e-3).double(), torch.tensor([1]),
                          compute_dtype=torch.float64)
    assert_close(r.logprob, ref.logprob, atol=1e-7, what="logprob")


@pytest.mark.parametrize("temperature", [1e-3, 0.07, 0.3, 3.0])
def test_large_scaled_logits_match_reference_on_rounded_z(isa, temperature):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 2500, generator=g) * 12
    t = torch.randn(64, 2500, generator=g) * 12
    y = torch.cat([x.argmax(-1)[:32], torch.randint(0, 2500, (32,), generator=g)])
    r = pyopd.reverse_kl(x, t, y, temperature=temperature)
    assert bool((r.student_logprob <= 0).all()) and bool((r.teacher_logprob <= 0).all())
    zs, zt = _scaled_fp32(x, temperature).double(), _scaled_fp32(t, temperature).double()
    ref = reverse_kl_ref(zs, zt, y, compute_dtype=torch.float64)
    # Absolute errors scale with |z| (fp32 sums of exps against float64).
    tol = 2e-5 * max(1.0, 40.0 / temperature)
    for f in ("student_logprob", "teacher_logprob", "student_lse", "teacher_lse"):
        assert_close(getattr(r, f), getattr(ref, f), atol=tol, rtol=1e-6, what=f)
    assert_close(r.kl, ref.kl, atol=tol, rtol=1e-5, what="kl")
    ts = pyopd.token_stats(x, y, temperature=temperature)
    assert bool((ts.logprob <= 0).all())
    assert torch.equal(ts.logprob, r.student_logprob)


# ---- item 5: +inf logits, -inf teacher under (underflowing) student mass ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_plus_inf_logit_gives_infinite_lse(isa, dtype):
    x = torch.tensor([[INF, 1.0, 2.0], [INF, NAN, 0.0], [0.5, 1.0, 2.0]], dtype=dtype)
    r = pyopd.token_stats(x, torch.tensor([1, 2, 0]))
    assert r.lse[0].item() == INF, "logsumexp with a +inf logit is +inf (as torch.logsumexp)"
    assert math.isnan(r.lse[1].item()), "a NaN in the row wins"
    assert math.isnan(r.logprob[0].item()) and math.isnan(r.entropy[0].item())
    ref = token_stats_ref(x.double(), torch.tensor([1, 2, 0]), compute_dtype=torch.float64)
    for f in ("lse", "logprob", "entropy"):  # NaN/inf must match exactly, finite values closely
        assert_close(getattr(r, f), getattr(ref, f), atol=2e-2, rtol=1e-2, what=f)
    t = torch.zeros(3, 5, dtype=dtype)
    t[2, 4] = INF  # teacher +inf beyond the student's vocabulary
    k = pyopd.reverse_kl(x, t, torch.tensor([1, 2, 0]))
    assert k.student_lse[0].item() == INF and math.isnan(k.kl[0].item())
    assert k.teacher_lse[2].item() == INF and math.isnan(k.kl[2].item())
    assert math.isnan(k.teacher_logprob[2].item()) and math.isnan(k.teacher_entropy[2].item())
    kref = reverse_kl_ref(x.double(), t.double(), torch.tensor([1, 2, 0]),
                          compute_dtype=torch.float64)
    for f in ("kl", "student_lse", "teacher_lse", "teacher_logprob", "teacher_entropy"):
        assert_close(getattr(k, f), getattr(kref, f), atol=2e-2, rtol=1e-2, what=f)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("big_first", [False, True])
def test_teacher_hole_is_infinite_kl_even_when_student_mass_underflows(isa, dtype, big_first):
    # exp(0 - 1000) underflows (float32 and float64 alike), yet p_0 > 0 exactly
    # and q_0 = 0: KL(p || q) = +inf. Order of the tiles must not matter.
    v = 5000
    s = torch.zeros(3, v, dtype=torch.float64)
    t = torch.zeros(3, v, dtype=torch.float64)
    big = 10 if big_first else 4500
    s[:, big] = 1000.0 if dtype != torch.float16 else 60000.0
    t[0, 0] = -INF                       # hole under underflowed student mass
    t[1, 0] = -INF
    s[1, 0] = -INF                       # both -inf: no hole, finite KL
    t[2, 4900] = -INF                    # hole in a later tile
    got = pyopd.reverse_kl(s.to(dtype), t.to(dtype))
    assert got.kl[0].item() == INF and got.kl[2].item() == INF
    assert math.isfinite(got.kl[1].item())
    ref = reverse_kl_ref(s.to(dtype).double(), t.to(dtype).double(), compute_dtype=torch.float64)
    assert ref.kl[0].item() == INF and ref.kl[2].item() == INF
    assert_close(got.kl[1], ref.kl[1], atol=1e-4, what="kl without hole")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_masked_vocabulary_entries_contribute_zero(isa, dtype):
    # -inf stays legal: ids both models mask add exactly nothing, never NaN.
    g = torch.Generator().manual_seed(5)
    s = torch.randn(4, 4200, generator=g, dtype=torch.float64)
    t = torch.randn(4, 4300, generator=g, dtype=torch.float64)
    hole = torch.rand(4, 4200, generator=g) < 0.3
    s[hole] = -INF
    t[:, :4200][hole] = -INF
    t[:, 4250:] = -INF
    s, t = s.to(dtype), t.to(dtype)
    y = (~hole).float().argmax(-1)
    got = pyopd.reverse_kl(s, t, y)
    ref = reverse_kl_ref(s.double(), t.double(), y, compute_dtype=torch.float64)
    for f in ("kl", "student_entropy", "teacher_entropy", "student_logprob", "teacher_logprob"):
        assert bool(getattr(got, f).isfinite().all()), f
        assert_close(getattr(got, f), getattr(ref, f), atol=1e-4, rtol=1e-5, what=f)
    gr = _grad(lambda x: pyopd.reverse_kl(x, t, y).kl.sum(), s)
    assert bool(gr.isfinite().all()) and bool((gr[hole] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_identical_inputs_give_exactly_zero_kl(isa, dtype):
    g = torch.Generator().manual_seed(6)
    s = (torch.randn(5, 4100, generator=g) * 1e4).to(dtype)
    s[1, :50] = -INF
    r = pyopd.reverse_kl(s, s.clone())
    assert bool((r.kl == 0).all())
    assert bool(r.student_lse.isfinite().all())
