"""pyopd.token_stats / pyopd.reverse_kl against the float64 PyTorch reference."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import pyopd
from pyopd.ops import reverse_kl_ref, token_stats_ref
from _helpers import DEVICES, assert_close

FIELDS_KL = ("kl", "student_entropy", "teacher_entropy", "student_logprob", "teacher_logprob",
             "student_lse", "teacher_lse")
LOW = (torch.bfloat16, torch.float16)


def _logits(n: int, v: int, scale: float, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def _tokens(n: int, v: int, device: str, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, v, (n,), generator=g).to(device)


def _check_kl(got, s, t, y, mask=None, temperature=1.0, atol=2e-5, rtol=2e-5):
    # The reference sees exactly the (possibly rounded) inputs the kernel saw.
    ref = reverse_kl_ref(s.double(), t.double(), y, mask=mask, temperature=temperature,
                         compute_dtype=torch.float64)
    for f in FIELDS_KL:
        assert_close(getattr(got, f), getattr(ref, f), atol=atol, rtol=rtol, what=f)


# --------------------------------------------------------------------------- forward accuracy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("v,n", [(1, 5), (7, 9), (129, 33), (4096 + 32, 17), (32000, 4), (151936, 2)])
@pytest.mark.parametrize("sdt,tdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.float16, torch.float32), (torch.bfloat16, torch.float16)])
def test_reverse_kl_matches_reference(device, v, n, sdt, tdt):
    s = _logits(n, v, 2.0, sdt, device, 1)
    t = _logits(n, v, 2.0, tdt, device, 2)
    y = _tokens(n, v, device)
    _check_kl(pyopd.reverse_kl(s, t, y), s, t, y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0])
def test_reverse_kl_temperatures_and_scales(device, temperature, scale):
    s = _logits(16, 1000, scale, torch.float32, device, 3)
    t = _logits(16, 1003, scale, torch.float32, device, 4)
    y = _tokens(16, 1000, device)
    got = pyopd.reverse_kl(s, t, y, temperature=temperature)
    tol = 2e-5 * max(1.0, scale / temperature)
    _check_kl(got, s, t, y, temperature=temperature, atol=tol, rtol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_logits_of_1e4_do_not_overflow(device):
    s = _logits(8, 4099, 1e4, torch.float32, device, 5)
    t = _logits(8, 4099, 1e4, torch.float32, device, 6)
    t[:4] = s[:4] + _logits(4, 4099, 1.0, torch.float32, device, 8)  # close but not equal
    y = _tokens(8, 4099, device)
    got = pyopd.reverse_kl(s, t, y)
    for f in FIELDS_KL:
        assert bool(getattr(got, f).isfinite().all()), f
    # Absolute errors scale with the logits' own rounding (1e4 * 2^-24 ~ 6e-4).
    _check_kl(got, s, t, y, atol=5e-3, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v", [7, 4096 + 32, 151936])
def test_identical_distributions_give_zero_kl(device, dtype, v):
    s = _logits(4, v, 3.0, dtype, device, 9)
    got = pyopd.reverse_kl(s, s.clone(), _tokens(4, v, device))
    assert float(got.kl.abs().max()) <= 1e-6
    assert float(got.kl.min()) >= 0.0
    assert_close(got.student_entropy, got.teacher_entropy, atol=1e-6, what="entropies")


@pytest.mark.parametrize("device", DEVICES)
def test_near_identical_kl_is_accurate(device):
    s = _logits(8, 32000, 2.0, torch.float32, device, 10)
    t = (s.double() + 1e-3 * _logits(8, 32000, 1.0, torch.float64, device, 11)).float()
    got = pyopd.reverse_kl(s, t)
    ref = reverse_kl_ref(s.double(), t.double(), compute_dtype=torch.float64)
    assert float(ref.kl.max()) < 1e-5  # the regime where a naive difference loses everything
    assert_close(got.kl, ref.kl, atol=1e-7, rtol=1e-2, what="kl")


@pytest.mark.parametrize("device", DEVICES)
def test_near_one_hot_rows(device):
    s = _logits(6, 2000, 1.0, torch.float32, device, 12)
    t = _logits(6, 2000, 1.0, torch.float32, device, 13)
    s[torch.arange(6), torch.arange(6) * 7] = 80.0
    t[torch.arange(6), torch.arange(6) * 7] = 60.0
    got = pyopd.reverse_kl(s, t, torch.arange(6, device=device) * 7)
    _check_kl(got, s, t, torch.arange(6, device=device) * 7, atol=1e-5, rtol=1e-5)
    assert float(got.student_entropy.max()) < 1e-20 * 1e10  # ~0, and never negative
    assert float(got.student_entropy.min()) >= 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_neg_inf_logits_contribute_nothing(device):
    n, v = 12, 777
    s = _logits(n, v, 2.0, torch.float32, device, 14)
    t = _logits(n, v + 5, 2.0, torch.float32, device, 15)
    g = torch.Generator().manual_seed(16)
    hole = (torch.rand(n, v, generator=g) < 0.4).to(device)
    hole[:, 0] = False
    s[hole] = -math.inf
    t[:, :v][hole] = -math.inf  # teacher masks the same ids: KL stays finite
    t[:, v + 2] = -math.inf
    y = torch.zeros(n, dtype=torch.long, device=device)
    got = pyopd.reverse_kl(s, t, y)
    for f in FIELDS_KL:
        assert not bool(getattr(got, f).isnan().any()), f
    _check_kl(got, s, t, y)


@pytest.mark.parametrize("device", DEVICES)
def test_student_mass_where_teacher_has_none_is_infinite_kl(device):
    s = _logits(3, 50, 1.0, torch.float32, device, 17)
    t = _logits(3, 50, 1.0, torch.float32, device, 18)
    t[1, 5] = -math.inf
    got = pyopd.reverse_kl(s, t)
    assert math.isinf(float(got.kl[1])) and float(got.kl[1]) > 0
    assert bool(got.kl[[0, 2]].isfinite().all())


@pytest.mark.parametrize("device", DEVICES)
def test_nan_propagates_to_its_row_only(device):
    s = _logits(5, 300, 1.0, torch.float32, device, 19)
    t = _logits(5, 300, 1.0, torch.float32, device, 20)
    s[1, 17] = math.nan
    t[3, 250] = math.nan
    got = pyopd.reverse_kl(s, t, _tokens(5, 300, device))
    assert bool(got.kl[1].isnan()) and bool(got.student_entropy[1].isnan())
    assert bool(got.kl[3].isnan()) and bool(got.teacher_entropy[3].isnan())
    for f in FIELDS_KL:
        assert bool(getattr(got, f)[[0, 2, 4]].isfinite().all()), f


@pytest.mark.parametrize("device", DEVICES)
def test_masked_rows_are_zero_and_ignored(device):
    n, v = 10, 513
    s = _logits(n, v, 1.0, torch.float32, device, 21)
    t = _logits(n, v, 1.0, torch.float32, device, 22)
    mask = torch.tensor([True, False] * 5, device=device)
    s[1] = math.nan  # garbage in a masked row must not leak out
    y = _tokens(n, v, device)
    y[3] = -100  # padding ids are fine under the mask
    got = pyopd.reverse_kl(s, t, y, mask=mask)
    for f in FIELDS_KL:
        assert bool((getattr(got, f)[~mask] == 0).all()), f
    _check_kl(got, torch.nan_to_num(s), t, torch.where(mask, y, 0), mask=mask)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_mask_gives_all_zeros_and_zero_grad(device):
    s = _logits(4, 64, 1.0, torch.float32, device, 23).requires_grad_()
    t = _logits(4, 64, 1.0, torch.float32, device, 24)
    got = pyopd.reverse_kl(s, t, mask=torch.zeros(4, dtype=torch.bool, device=device))
    assert all(bool((getattr(got, f) == 0).all()) for f in FIELDS_KL)
    (got.kl.sum() + got.student_entropy.sum()).backward()
    assert bool((s.grad == 0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_strided_rows_and_3d_input(device):
    b, T, v = 3, 9, 257
    base_s = _logits(b * (T + 1), v + 11, 1.0, torch.float32, device, 25).view(b, T + 1, v + 11)
    base_t = _logits(b * (T + 1), v + 20, 1.0, torch.float32, device, 26).view(b, T + 1, v + 20)
    s = base_s[:, :-1, :v]  # the usual logits[:, :-1] shift, plus a column slice
    t = base_t[:, 1:, :v + 4]
    assert not s.is_contiguous()
    y = torch.randint(0, v, (b, T), device=device)
    mask = torch.rand(b, T, device=device) > 0.3
    got = pyopd.reverse_kl(s, t, y, mask=mask)
    assert got.kl.shape == (b, T)
    ref = reverse_kl_ref(s.double(), t.double(), y, mask=mask, compute_dtype=torch.float64)
    for f in FIELDS_KL:
        assert_close(getattr(got, f), getattr(ref, f), atol=2e-5, rtol=2e-5, what=f)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_token_stats_matches_reference(device, dtype):
    for n, v in ((7, 1), (13, 129), (3, 32000)):
        x = _logits(n, v, 3.0, dtype, device, 27)
        y = _tokens(n, v, device)
        mask = torch.ones(n, dtype=torch.bool, device=device)
        mask[n // 2] = False
        got = pyopd.token_stats(x, y, mask=mask, temperature=0.8)
        ref = token_stats_ref(x.double(), y, mask=mask, temperature=0.8, compute_dtype=torch.float64)
        for f in ("logprob", "entropy", "lse"):
            assert_close(getattr(got, f), getattr(ref, f), atol=2e-5, rtol=2e-5, what=f)


def test_token_stats_without_tokens_has_zero_logprob():
    x = _logits(5, 40, 1.0, torch.float32, "cpu", 28)
    got = pyopd.token_stats(x)
    assert bool((got.logprob == 0).all())
    got = pyopd.reverse_kl(x, x)
    assert bool((got.student_logprob == 0).all()) and bool((got.teacher_logprob == 0).all())


# --------------------------------------------------------------------------- gradients


def _gradcheck_inputs(seed=30, n=4, v=9, vt=11):
    s = _logits(n, v, 1.5, torch.float64, "cpu", seed).requires_grad_()
    t = _logits(n, vt, 1.5, torch.float64, "cpu", seed + 1)
    y = _tokens(n, v, "cpu")
    mask = torch.tensor([True, True, False, True])
    return s, t, y, mask


@pytest.mark.parametrize("field", ["kl", "student_entropy", "student_logprob", "student_lse"])
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_gradcheck_reverse_kl(field, temperature):
    s, t, y, mask = _gradcheck_inputs()
    fn = lambda x: getattr(pyopd.reverse_kl(x, t, y, mask=mask, temperature=temperature), field)
    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("field", ["logprob", "entropy", "lse"])
def test_gradcheck_token_stats(field):
    s, _t, y, mask = _gradcheck_inputs(seed=33)
    fn = lambda x: getattr(pyopd.token_stats(x, y, mask=mask, temperature=1.3), field)
    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-8)


def test_gradcheck_all_outputs_together():
    s, t, y, mask = _gradcheck_inputs(seed=35)

    def fn(x):
        r = pyopd.reverse_kl(x, t, y, mask=mask)
        return r.kl, r.student_entropy, r.student_logprob, r.student_lse

    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-8)


def _weighted_grad(fn, s, t, y, w):
    x = s.detach().clone().requires_grad_()
    r = fn(x, t, y)
    (r.kl * w[0] + r.student_logprob * w[1] + r.student_entropy * w[2]).sum().backward()
    return x.grad


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_with_neg_inf_and_3d(device):
    s = _logits(2 * 5, 300, 2.0, torch.float64, device, 36).view(2, 5, 300)
    t = _logits(2 * 5, 300, 2.0, torch.float64, device, 37).view(2, 5, 300)
    s[..., 10:20] = -math.inf
    t[..., 10:20] = -math.inf
    y = torch.randint(20, 300, (2, 5), device=device)
    w = torch.randn(3, 2, 5, dtype=torch.float64, device=device)
    got = _weighted_grad(lambda a, b, c: pyopd.reverse_kl(a, b, c), s, t, y, w)
    ref = _weighted_grad(lambda a, b, c: reverse_kl_ref(a, b, c, compute_dtype=torch.float64),
                         s, t, y, w)
    assert_close(got, ref, atol=1e-12, rtol=1e-10, what="grad")
    assert bool((got[..., 10:20] == 0).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_gradient_within_twice_torch_error(device, dtype):
    """flash-attention's rule: error vs float64 at most ~2x that of torch in the same dtype."""
    n, v = 32, 4096 + 32
    s = _logits(n, v, 2.0, dtype, device, 38)
    t = _logits(n, v, 2.0, dtype, device, 39)
    y = _tokens(n, v, device)
    w = torch.randn(3, n, dtype=torch.float64, device=device)
    exact = _weighted_grad(lambda a, b, c: reverse_kl_ref(a, b, c, compute_dtype=torch.float64),
                           s.double(), t.double(), y, w)
    ours = _weighted_grad(lambda a, b, c: pyopd.reverse_kl(a, b, c), s, t, y, w.float())
    torch_low = _weighted_grad(lambda a, b, c: reverse_kl_ref(a, b, c, compute_dtype=dtype),
                               s, t, y, w.to(dtype))
    assert ours.dtype == dtype
    err_ours = (ours.double() - exact).abs().max().item()
    err_torch = (torch_low.double() - exact).abs().max().item()
    assert err_ours <= 2 * err_torch + 1e-7, (err_ours, err_torch)


@pytest.mark.parametrize("device", DEVICES)
def test_functional_backward_in_float32(device):
    s = _logits(8, 1000, 2.0, torch.bfloat16, device, 40)
    t = _logits(8, 1010, 2.0, torch.float32, device, 41)
    y = _tokens(8, 1000, device)
    g = torch.randn(3, 8, device=device)
    res, grad = pyopd.reverse_kl_backward(s, t, y, grad_kl=g[0], grad_logprob=g[1],
                                          grad_entropy=g[2], grad_dtype=torch.float32)
    assert grad.dtype == torch.float32 and grad.shape == s.shape
    exact = _weighted_grad(lambda a, b, c: reverse_kl_ref(a, b, c, compute_dtype=torch.float64),
                           s.double(), t.double(), y, g.double())
    assert_close(grad, exact, atol=1e-6, rtol=1e-5, what="fp32 grad of bf16 logits")
    assert_close(res.kl, pyopd.reverse_kl(s, t, y).kl, atol=0, what="forward")
    _, g_ts = pyopd.reverse_kl_backward(s, None, y, grad_logprob=g[1], grad_dtype=torch.float32)
    x = s.double().requires_grad_()
    token_stats_ref(x, y, compute_dtype=torch.float64).logprob.mul(g[1].double()).sum().backward()
    assert_close(g_ts, x.grad, atol=1e-6, rtol=1e-5, what="token_stats grad")


def test_teacher_is_never_differentiated():
    s = _logits(3, 20, 1.0, torch.float32, "cpu", 42).requires_grad_()
    t = _logits(3, 20, 1.0, torch.float32, "cpu", 43).requires_grad_()
    with pytest.raises(ValueError, match="teacher_logits requires grad"):
        pyopd.reverse_kl(s, t)
    r = pyopd.reverse_kl(s, t.detach())
    r.teacher_entropy.sum()  # computed, not differentiable w.r.t. anything
    assert not r.teacher_entropy.requires_grad


# --------------------------------------------------------------------------- torch.compile


def test_works_under_torch_compile():
    s = _logits(2 * 6, 333, 1.0, torch.float32, "cpu", 44).view(2, 6, 333)
    t = _logits(2 * 6, 340, 1.0, torch.float32, "cpu", 45).view(2, 6, 340)
    y = torch.randint(0, 333, (2, 6))
    mask = torch.rand(2, 6) > 0.2

    def loss_fn(x):
        r = pyopd.reverse_kl(x, t, y, mask=mask, temperature=0.9)
        return (r.kl + 0.1 * r.student_entropy - r.student_logprob).sum()

    x1 = s.clone().requires_grad_()
    eager = loss_fn(x1)
    eager.backward()
    x2 = s.clone().requires_grad_()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(x2)
    compiled.backward()
    assert_close(compiled, eager, atol=1e-5, what="loss")
    assert_close(x2.grad, x1.grad, atol=1e-6, what="grad")


# --------------------------------------------------------------------------- bad input


def _ok():
    s = _logits(4, 10, 1.0, torch.float32, "cpu", 46)
    t = _logits(4, 12, 1.0, torch.float32, "cpu", 47)
    return s, t, _tokens(4, 10, "cpu")


@pytest.mark.parametrize("case,exc,match", [
    ("int_logits", TypeError, "student_logits must be float32"),
    ("one_dim", ValueError, r"student_logits must have shape \[N, V\]"),
    ("zero_rows", ValueError, "student_logits has no rows"),
    ("zero_vocab", ValueError, r"V = 0"),
    ("teacher_smaller", ValueError, r"Vt >= V"),
    ("teacher_rows", ValueError, "teacher_logits leading dims"),
    ("tokens_shape", ValueError, "tokens must have shape"),
    ("tokens_float", TypeError, "tokens must be an integer tensor"),
    ("tokens_high", ValueError, r"tokens must lie in \[0, 10\)"),
    ("tokens_negative", ValueError, r"tokens must lie in \[0, 10\)"),
    ("mask_dtype", TypeError, "mask must be a bool tensor"),
    ("mask_shape", ValueError, "mask must have shape"),
    ("temp_zero", ValueError, "temperature must be a finite number > 0"),
    ("temp_negative", ValueError, "temperature must be a finite number > 0"),
    ("temp_nan", ValueError, "temperature must be a finite number > 0"),
    ("device", ValueError, "student_logits must be on the CPU or a CUDA device"),
    ("mixed_fp64", TypeError, "float64 logits need both"),
    ("not_tensor", TypeError, "teacher_logits must be a torch.Tensor"),
])
def test_bad_input_raises_naming_the_argument(case, exc, match):
    s, t, y = _ok()
    kw = {}
    if case == "int_logits":
        s = s.long()
    elif case == "one_dim":
        s = s[0]
    elif case == "zero_rows":
        s, t, y = s[:0], t[:0], y[:0]
    elif case == "zero_vocab":
        s = s[:, :0]
    elif case == "teacher_smaller":
        t = t[:, :5]
    elif case == "teacher_rows":
        t = t[:3]
    elif case == "tokens_shape":
        y = y[:2]
    elif case == "tokens_float":
        y = y.float()
    elif case == "tokens_high":
        y = y.clone()
        y[2] = 10
    elif case == "tokens_negative":
        y = y.clone()
        y[0] = -1
    elif case == "mask_dtype":
        kw["mask"] = torch.ones(4)
    elif case == "mask_shape":
        kw["mask"] = torch.ones(5, dtype=torch.bool)
    elif case == "temp_zero":
        kw["temperature"] = 0.0
    elif case == "temp_negative":
        kw["temperature"] = -1.0
    elif case == "temp_nan":
        kw["temperature"] = math.nan
    elif case == "device":
        s = s.to("meta")
    elif case == "mixed_fp64":
        s = s.double()
    elif case == "not_tensor":
        t = t.tolist()
    with pytest.raises(exc, match=match):
        pyopd.reverse_kl(s, t, y, **kw)


def test_token_stats_names_its_argument():
    with pytest.raises(TypeError, match="logits must be float32"):
        pyopd.token_stats(torch.zeros(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 4\)"):
        pyopd.token_stats(torch.zeros(3, 4), torch.tensor([0, 4, 1]))


def test_bad_grad_dtype():
    s, t, y = _ok()
    with pytest.raises(TypeError, match="grad_dtype must be float64 exactly"):
        pyopd.reverse_kl_backward(s, t, y, grad_kl=torch.ones(4), grad_dtype=torch.float64)
    with pytest.raises(ValueError, match="grad_kl needs teacher_logits"):
        pyopd.reverse_kl_backward(s, None, y, grad_kl=torch.ones(4))
    with pytest.raises(ValueError, match="grad_logprob must have shape"):
        pyopd.reverse_kl_backward(s, t, y, grad_logprob=torch.ones(5))


def test_build_info_describes_the_build():
    info = pyopd.build_info()
    assert isinstance(info["cuda"], bool) and isinstance(info["openmp"], bool)
    assert info["cpu_isa"] in info["cpu_isa_compiled"].split(",")
    assert info["version"] == pyopd.__version__
    if info["cuda"]:
        assert "90" in info["cuda_archs"]
    assert pyopd.cuda_available() == (info["cuda"] and pyopd._C.cuda_device_count() > 0)


def test_bindings_reject_bad_params_naming_the_field():
    from pyopd import _C

    p = _C.VocabStatsFwdParams()
    with pytest.raises(ValueError, match="n_rows must be > 0"):
        _C.vocab_stats_fwd(p)
    p.n_rows, p.vocab = 2, 4
    with pytest.raises(ValueError, match="student must not be null"):
        _C.vocab_stats_fwd(p)


@pytest.mark.parametrize("device", DEVICES)
def test_teacher_hole_under_student_mass_that_later_underflows(device):
    # The student's mass at id 0 (where the teacher is -inf) underflows once a far
    # larger student logit appears in a later tile. The documented rule (since
    # the kernels' non-finite semantics were fixed): a finite student logit over
    # a -inf teacher logit gives KL = +inf however small p_0 is, never NaN, and
    # never a tile-order-dependent finite value.
    s = torch.zeros(2, 1500, dtype=torch.float64, device=device)
    t = torch.zeros(2, 1500, dtype=torch.float64, device=device)
    t[:, 0] = -math.inf
    s[:, 900] = 1000.0
    for dt in (torch.float64, torch.float32):
        got = pyopd.reverse_kl(s.to(dt), t.to(dt))
        ref = reverse_kl_ref(s, t, compute_dtype=torch.float64)
        assert bool((got.kl == math.inf).all()) and bool((ref.kl == math.inf).all())
        assert_close(got.student_entropy, ref.student_entropy, atol=1e-4, rtol=1e-5, what=f"H_s {dt}")


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_never_reads_out_of_range_token_ids(device):
    # The public functions reject such ids; the raw op (what torch.compile calls)
    # must still not index outside the row: negative ids give 0, ids >= V NaN.
    s = _logits(3, 50, 1.0, torch.float32, device, 48)
    t = _logits(3, 60, 1.0, torch.float32, device, 49)
    y = torch.tensor([-5, 50, 10**12], device=device)
    out = torch.ops.pyopd.vocab_stats_fwd(s, t, y, None, 1.0)
    kl, lps, lpt = out[0], out[3], out[4]
    assert float(lps[0]) == 0.0 and float(lpt[0]) == 0.0
    assert bool(lps[1:].isnan().all()) and bool(lpt[1:].isnan().all())
    assert bool(kl.isfinite().all())


# --------------------------------------------------------------------------- numeric ranges


@pytest.mark.parametrize("temperature,exc,match", [
    (1e-39, ValueError, r"temperature must lie in \[2.94e-39, 8.51e\+37\].*1/temperature"),
    (2e38, ValueError, r"temperature must lie in \[2.94e-39, 8.51e\+37\]"),
    (math.inf, ValueError, "temperature must be a finite number > 0"),
    (-math.inf, ValueError, "temperature must be a finite number > 0"),
    (True, TypeError, "temperature must be a number"),
    ("1.0", TypeError, "temperature must be a number"),
])
def test_temperature_outside_what_float32_represents(temperature, exc, match):
    # 1/T must be a normal float32: 1e-39 used to pass and turn every output into NaN.
    s, t, y = _ok()
    with pytest.raises(exc, match=match):
        pyopd.reverse_kl(s, t, y, temperature=temperature)
    with pytest.raises(exc, match=match):
        pyopd.token_stats(s, y, temperature=temperature)
    with pytest.raises(exc, match=match):
        pyopd.reverse_kl_backward(s, t, y, grad_kl=torch.ones(4), temperature=temperature)


@pytest.mark.parametrize("temperature,scale", [(1e-30, 1e-30), (3e-39, 1e-38), (1e37, 1e37)])
def test_extreme_but_representable_temperatures_are_exact(temperature, scale):
    # logits of the temperature's magnitude: z = logits / T is O(1) in float32
    s = _logits(6, 50, scale, torch.float32, "cpu", 60)
    t = _logits(6, 57, scale, torch.float32, "cpu", 61)
    y = _tokens(6, 50, "cpu")
    got = pyopd.reverse_kl(s, t, y, temperature=temperature)
    for f in FIELDS_KL:
        assert bool(getattr(got, f).isfinite().all()), f
    ref = reverse_kl_ref(s.double(), t.double(), y, temperature=temperature, compute_dtype=torch.float64)
    for f in FIELDS_KL:
        # lse = logsumexp(logits / T) rounds like the scaled logits do
        assert_close(getattr(got, f), getattr(ref, f), atol=1e-4, rtol=1e-5, what=f)


def test_raw_ops_reject_a_non_normal_inverse_temperature():
    # What torch.compile (and fused_linear) call: the check also lives inside the op.
    s, t, y = _ok()
    for inv_t in (math.inf, 0.0, 1e-39, -1.0, math.nan):
        with pytest.raises(ValueError, match="temperature must lie in"):
            torch.ops.pyopd.vocab_stats_fwd(s, t, y, None, inv_t)
    out = torch.ops.pyopd.vocab_stats_fwd(s, t, y, None, 1.0)
    with pytest.raises(ValueError, match="temperature must lie in"):
        torch.ops.pyopd.vocab_stats_bwd(s, t, y, None, out[7], out[0], out[1], torch.ones(4), None,
                                        None, None, math.inf, torch.float32)


def test_bad_upstream_gradients_and_grad_dtype():
    s, t, y = _ok()
    with pytest.raises(TypeError, match="grad_kl must be a floating-point tensor"):
        pyopd.reverse_kl_backward(s, t, y, grad_kl=torch.ones(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="grad_entropy must be a torch.Tensor or None"):
        pyopd.reverse_kl_backward(s, t, y, grad_entropy=[1.0] * 4)
    with pytest.raises(TypeError, match="grad_dtype must be float32, bfloat16, float16 or float64"):
        pyopd.reverse_kl_backward(s, t, y, grad_kl=torch.ones(4), grad_dtype="float32")
    with pytest.raises(TypeError, match="tokens must be an integer tensor"):
        pyopd.reverse_kl(s, t, y.bool())


@pytest.mark.parametrize("device", DEVICES)
def test_token_check_runs_once_per_call_without_host_sync_on_cuda(device):
    # On CUDA the range check must not synchronise (no .item()/bool() on the device);
    # on the CPU it raises the clear ValueError. Masked ids are never checked.
    s, t, y = (x.to(device) for x in _ok())
    mask = torch.tensor([True, False, True, True], device=device)
    y = y.clone()
    y[1] = 10**9  # masked: fine
    r = pyopd.reverse_kl(s, t, y, mask=mask)
    assert float(r.kl[1]) == 0.0
    if device == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings():  # "prototype feature" notice on every set
            warnings.simplefilter("ignore", UserWarning)
            torch.cuda.set_sync_debug_mode("error")  # any host sync inside the call raises
        try:
            pyopd.reverse_kl(s, t, y, mask=mask)
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


@pytest.mark.cuda
@pytest.mark.skipif(not pyopd.cuda_available(), reason="no CUDA device / CUDA build")
@pytest.mark.parametrize("bad", ["too_large", "negative"])
def test_out_of_range_token_fires_a_device_assert_on_cuda(bad):
    # The forward kernel checks the ids itself (no host sync): an id outside
    # [0, V) on an unmasked row poisons the CUDA context, so in a child process.
    import subprocess
    import sys
    import tempfile

    from _helpers import subprocess_env

    bad_id = "10" if bad == "too_large" else "-1"
    code = (
        "import torch, pyopd\n"
        "s = torch.randn(4, 10, device='cuda'); t = torch.randn(4, 10, device='cuda')\n"
        "m = torch.tensor([True, False, True, True], device='cuda')\n"
        "ok = pyopd.reverse_kl(s, t, torch.tensor([1, 99, 2, 3], device='cuda'), mask=m)\n"
        "torch.cuda.synchronize()\n"
        "print('masked id ignored', flush=True)\n"
        f"r = pyopd.reverse_kl(s, t, torch.tensor([1, 2, {bad_id}, 3], device='cuda'), mask=m)\n"
        "torch.cuda.synchronize()\n"
        "print('not reached', flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=subprocess_env(), cwd=tempfile.gettempdir(), timeout=300)
    assert "masked id ignored" in proc.stdout, proc.stderr
    assert proc.returncode != 0 and "not reached" not in proc.stdout
    assert "tokens must lie in [0, 10)" in proc.stderr or "assert" in proc.stderr.lower(), proc.stderr


def test_eager_calls_skip_the_op_dispatcher_and_traced_ones_use_the_ops():
    # Eager calls on plain tensors run the same implementation through a plain
    # autograd.Function (less host time a call); fake tensors (tracing) must go
    # through the custom ops, whose fake kernels give the shapes.
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func))
            return func(*args, **(kwargs or {}))

    s, t, y = _ok()
    x = s.clone().requires_grad_()
    with Seen() as seen:
        r = pyopd.reverse_kl(x, t, y)
        r.kl.sum().backward()
    assert not any(op.startswith("pyopd.") for op in seen.ops), seen.ops
    ref = reverse_kl_ref(s.double().requires_grad_(), t.double(), y, compute_dtype=torch.float64)
    assert_close(r.kl.detach(), ref.kl.detach(), atol=1e-5, rtol=1e-5)
    with FakeTensorMode() as mode:
        fs, ft, fy = (mode.from_tensor(v) for v in (s, t, y))
        fr = pyopd.reverse_kl(fs, ft, fy)
        assert fr.kl.shape == r.kl.shape and fr.kl.dtype == r.kl.dtype
