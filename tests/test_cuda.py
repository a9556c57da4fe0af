"""CUDA kernels of token_stats / reverse_kl.

Two kinds of tests:
- `emu_*`: the per-thread code of csrc/cuda/vocab_stats_core.cuh compiled for
  the host (tests/cuda_host/emulate.cu, built with nvcc, run through ctypes)
  with the kernels' reductions played out thread by thread. They need nvcc but
  no GPU, and check the layouts, the split-row path and the non-finite rules
  against the float64 reference.
- `@pytest.mark.cuda`: the real kernels on a device (skipped without one);
  `bench/gpu_check.sh` runs them and fails if any is skipped.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import pytest
import torch

import pyopd
from pyopd.ops import reverse_kl_ref, token_stats_ref
from _helpers import CUDA, assert_close

ROOT = Path(__file__).resolve().parents[1]
FIELDS_KL = ("kl", "student_entropy", "teacher_entropy", "student_logprob", "teacher_logprob",
             "student_lse", "teacher_lse")
TAG = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
requires_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device / CUDA build")


def _logits(n: int, v: int, scale: float, dtype: torch.dtype, seed: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def _offset_view(x: torch.Tensor, offset: int) -> torch.Tensor:
    """x copied into a wider buffer at column `offset`: same values, another
    alignment of every row (row stride = V + offset + 5)."""
    n, v = x.shape
    big = torch.zeros(n, v + offset + 5, dtype=x.dtype, device=x.device)
    big[:, offset:offset + v] = x
    return big[:, offset:offset + v]


# ---------------------------------------------------------------------------
# host emulation of the kernels
# ---------------------------------------------------------------------------

_EMU_SOURCES = ("tests/cuda_host/emulate.cu", "csrc/cuda/vocab_stats_core.cuh",
                "csrc/include/pyopd/vocab_stats.h", "csrc/include/pyopd/common.h")


def _cuda_include() -> Optional[Path]:
    """The CUDA toolkit's include dir (cuda_bf16.h, cuda_fp16.h), if installed."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_bf16.h").exists():
            return Path(root) / "include"
    return None


@pytest.fixture(scope="session")
def emu() -> ctypes.CDLL:
    """The emulation library, built once per source version under build/.

    The core is plain C++ for the host compiler (no kernels): g++ builds it
    with the toolkit's headers, -ffp-contract=off as the device code's
    explicit roundings require.
    """
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    inc = _cuda_include()
    if cxx is None or inc is None:
        pytest.skip("the host emulation of the CUDA kernels needs a C++ compiler and the CUDA headers")
    flags = ["-std=c++17", "-O1", "-shared", "-fPIC", "-ffp-contract=off", "-x", "c++",
             "-I", str(inc), "-I", str(ROOT / "csrc/include"), "-I", str(ROOT / "csrc/cuda")]
    h = hashlib.sha256(" ".join([cxx, *flags]).encode())
    for src in _EMU_SOURCES:
        h.update((ROOT / src).read_bytes())
    out = ROOT / "build" / "cuda_host_emu" / h.hexdigest()[:16] / "libemu.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        proc = subprocess.run([cxx, *flags, str(ROOT / _EMU_SOURCES[0]), "-o", str(tmp)],
                              capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, f"emulation build failed:\n{proc.stderr[-4000:]}"
        os.replace(tmp, out)
    lib = ctypes.CDLL(str(out))
    i64, i32, vp, dbl = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_double
    lib.emu_vocab_stats_fwd.argtypes = [vp, i32, i64, vp, i32, i64, vp, vp, i64, i64, i64, dbl,
                                        ctypes.POINTER(vp), i32, i32, i64, vp]
    lib.emu_vocab_stats_bwd.argtypes = [vp, i32, i64, vp, i32, i64, vp, vp, i64, i64, i64, dbl,
                                        ctypes.POINTER(vp), ctypes.POINTER(vp), vp, i32, i32, i32, i64]
    lib.emu_vocab_stats_fwd.restype = lib.emu_vocab_stats_bwd.restype = i32
    return lib


def _ptr(x: Optional[torch.Tensor]) -> Optional[int]:
    return None if x is None else x.data_ptr()


def _ptrs(xs) -> ctypes.Array:
    return (ctypes.c_void_p * len(xs))(*[_ptr(x) for x in xs])


def _launch_shape(mode: str, length: int) -> tuple[int, int, int]:
    """(threads per row, slices, slice length) of a kernel launch mode."""
    if mode == "warp":
        return 32, 1, length
    if mode == "block":
        return 256, 1, length
    n = int(mode.split("-")[1])  # "split-N": N slices, as split_for makes them
    sl = -(-length // n)
    sl = -(-sl // 256) * 256
    return 256, -(-length // sl), sl


def emu_forward(lib, s, t, y=None, mask=None, temperature=1.0, mode="block", token_ok=None):
    """Runs the emulated forward; returns (ReverseKL-like dict, stats [N, 4]).
    token_ok: an int32 [1] tensor the kernel sets to 0 on a bad unmasked id."""
    n, v = s.shape
    vt = t.shape[1] if t is not None else 0
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    outs = [torch.full((n,), 7.0, dtype=acc) for _ in range(7)] + [torch.zeros(n, 4, dtype=acc)]
    tpr, ns, sl = _launch_shape(mode, vt if t is not None else v)
    rc = lib.emu_vocab_stats_fwd(
        _ptr(s), TAG[s.dtype], s.stride(0), _ptr(t), TAG[t.dtype] if t is not None else 0,
        t.stride(0) if t is not None else 0, _ptr(y), _ptr(mask), n, v, vt, 1.0 / temperature,
        _ptrs(outs), tpr, ns, sl, _ptr(token_ok))
    assert rc == 0
    return dict(zip(FIELDS_KL, outs[:7])), outs[7]


def emu_backward(lib, s, t, y, stats, kl, hs, grads, *, mask=None, temperature=1.0, mode="block",
                 grad_dtype=None, grad_offset=0):
    """Gradient [N, V] of sum(g_kl kl + g_lp logprob + g_h entropy + g_lse lse) (grads: 4 or None)."""
    n, v = s.shape
    gd = grad_dtype or s.dtype
    buf = torch.full((n * v + grad_offset + 8,), 12345.0, dtype=gd)  # overwritten everywhere
    out = buf[grad_offset:grad_offset + n * v].view(n, v)
    tpr, ns, sl = _launch_shape(mode, v)
    rc = lib.emu_vocab_stats_bwd(
        _ptr(s), TAG[s.dtype], s.stride(0), _ptr(t), TAG[t.dtype] if t is not None else 0,
        t.stride(0) if t is not None else 0, _ptr(y), _ptr(mask), n, v,
        t.shape[1] if t is not None else 0, 1.0 / temperature, _ptrs([stats, kl, hs]), _ptrs(grads),
        _ptr(out), TAG[gd], tpr, ns, sl)
    assert rc == 0
    return out


def _ref_grad(s, t, y, w, mask=None, temperature=1.0):
    """float64 autograd gradient of sum(w0 kl + w1 lp_s + w2 H_s + w3 lse_s)."""
    x = s.double().requires_grad_()
    r = reverse_kl_ref(x, t.double(), y, mask=mask, temperature=temperature, compute_dtype=torch.float64)
    loss = (w[0] * r.kl + w[1] * r.student_logprob + w[2] * r.student_entropy + w[3] * r.student_lse).sum()
    loss.backward()
    return x.grad


def _check_fwd(got, s, t, y, mask=None, temperature=1.0, atol=3e-5, rtol=3e-5):
    ref = reverse_kl_ref(s.double(), t.double(), y, mask=mask, temperature=temperature,
                         compute_dtype=torch.float64)
    for f in FIELDS_KL:
        assert_close(got[f], getattr(ref, f), atol=atol, rtol=rtol, what=f)


DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
               (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
               (torch.float32, torch.bfloat16), (torch.float16, torch.float32),
               (torch.float64, torch.float64)]
# (V, Vt, mode, layout): warp rows, block rows, split rows. V = 32001 is odd,
# so its rows start at every 16-byte phase even when contiguous; "offsets"
# puts student and teacher at different phases on top.
CASES = [(37, 37, "warp", "contiguous"), (37, 37, "warp", "offsets"), (1000, 1003, "warp", "offsets"),
         (5000, 5000, "block", "contiguous"), (5000, 5000, "block", "offsets"),
         (32001, 32064, "block", "offsets"), (32001, 32064, "split-5", "offsets"),
         (9000, 9000, "split-3", "contiguous")]


@pytest.mark.parametrize("sdt,tdt", DTYPE_PAIRS, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("v,vt,mode,layout", CASES)
def test_emu_forward_and_backward_match_reference(emu, sdt, tdt, v, vt, mode, layout):
    n = 3
    s = _logits(n, v, 3.0, sdt, 1)
    t = _logits(n, vt, 3.0, tdt, 2)
    if layout == "offsets":  # student and teacher at different 16-byte phases
        s, t = _offset_view(s, 1), _offset_view(t, 3)
    y = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(3))
    got, stats = emu_forward(emu, s, t, y, temperature=0.8, mode=mode)
    _check_fwd(got, s, t, y, temperature=0.8)

    w = torch.randn(4, n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    acc = stats.dtype
    grads = [w[k].to(acc) for k in range(4)]
    exact = _ref_grad(s, t, y, w, temperature=0.8)
    low = sdt in (torch.bfloat16, torch.float16)
    for gd, goff in ((None, 0), (None, 3), (torch.float32 if sdt != torch.float64 else None, 1)):
        g = emu_backward(emu, s, t, y, stats, got["kl"], got["student_entropy"], grads,
                         temperature=0.8, mode=mode, grad_dtype=gd, grad_offset=goff)
        # bf16 / fp16 gradients: one rounding of values up to ~|grad| <= 2
        # float32: |grad| up to ~1 carries a few ulp (PyTorch's float32 is no better)
        atol, rtol = (8e-3, 8e-3) if (low and gd is None) else (2e-6, 3e-5) if sdt != torch.float64 \
            else (1e-12, 1e-10)
        assert_close(g, exact, atol=atol, rtol=rtol, what=f"grad {gd} offset {goff}")


@pytest.mark.parametrize("mode", ["warp", "block", "split-4"])
def test_emu_token_stats_and_split_agree(emu, mode):
    v = 300 if mode == "warp" else 20000
    s = _logits(4, v, 2.0, torch.bfloat16, 5)
    s = _offset_view(s, 5)
    y = torch.tensor([0, 1, v - 1, 17])
    got, stats = emu_forward(emu, s, None, y, mode=mode)
    ref = token_stats_ref(s.double(), y, compute_dtype=torch.float64)
    assert_close(got["student_logprob"], ref.logprob, atol=3e-5, rtol=3e-5, what="logprob")
    assert_close(got["student_entropy"], ref.entropy, atol=3e-5, rtol=3e-5, what="entropy")
    assert_close(got["student_lse"], ref.lse, atol=3e-5, rtol=3e-5, what="lse")
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    grads = [None, w[1].float(), w[2].float(), w[3].float()]
    g = emu_backward(emu, s, None, y, stats, None, got["student_entropy"], grads, mode=mode,
                     grad_dtype=torch.float32, grad_offset=1)
    x = s.double().requires_grad_()
    r = token_stats_ref(x, y, compute_dtype=torch.float64)
    (w[1] * r.logprob + w[2] * r.entropy + w[3] * r.lse).sum().backward()
    assert_close(g, x.grad, atol=2e-6, rtol=2e-6, what="grad")


@pytest.mark.parametrize("mode", ["warp", "block", "split-3"])
def test_emu_no_token_ignores_logprob_grad(emu, mode):
    v = 500 if mode == "warp" else 13000
    s, t = _logits(3, v, 2.0, torch.float32, 7), _logits(3, v, 2.0, torch.float32, 8)
    got, stats = emu_forward(emu, s, t, None, mode=mode)
    assert bool((got["student_logprob"] == 0).all() and (got["teacher_logprob"] == 0).all())
    g_kl = torch.tensor([1.0, -0.5, 2.0])
    args = (emu, s, t, None, stats, got["kl"], got["student_entropy"])
    with_lp = emu_backward(*args, [g_kl, torch.tensor([3.0, -7.0, 1.0]), None, None], mode=mode)
    without = emu_backward(*args, [g_kl, None, None, None], mode=mode)
    assert torch.equal(with_lp, without)  # logprob is the constant 0: no contribution


@pytest.mark.parametrize("mode", ["warp", "block", "split-3"])
def test_emu_token_flag(emu, mode):
    # The device-side token check: the flag drops to 0 only for an id outside
    # [0, V) on a row that counts (masked rows and tokens=None never touch it).
    v = 300 if mode == "warp" else 9000
    s, t = _logits(4, v, 2.0, torch.float32, 11), _logits(4, v, 2.0, torch.float32, 12)
    mask = torch.tensor([True, False, True, True])
    cases = [([0, 1, v - 1, 5], None, 1), ([0, -1, v - 1, 5], mask, 1), ([0, v, 2, 5], mask, 1),
             ([0, 1, v, 5], mask, 0), ([0, 1, 2, -3], mask, 0), ([v, 1, 2, 3], None, 0),
             ([-100, 1, 2, 3], None, 0)]
    for ids, m, want in cases:
        ok = torch.ones(1, dtype=torch.int32)
        emu_forward(emu, s, t, torch.tensor(ids), mask=m, mode=mode, token_ok=ok)
        assert int(ok) == want, (ids, m)
    ok = torch.ones(1, dtype=torch.int32)
    emu_forward(emu, s, t, None, mode=mode, token_ok=ok)
    assert int(ok) == 1


@pytest.mark.parametrize("mode", ["warp", "block", "split-2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_emu_non_finite_rows(emu, mode, dtype):
    v = 200 if mode == "warp" else 9000
    n = 8
    s, t = _logits(n, v, 2.0, dtype, 9), _logits(n, v + 3, 2.0, dtype, 10)
    s[1, 7] = math.inf                       # +inf logit: lse +inf, the rest NaN
    s[2, 9] = math.nan                       # NaN logit
    s[3] = -math.inf                         # no distribution at all
    t[4, v - 1] = -math.inf                  # teacher hole under student mass: KL +inf
    s[5, 0], t[5, 0] = -math.inf, -math.inf  # -inf in both: legal, contributes 0
    s[5, 1] = -math.inf                      # -inf student logit alone: legal
    t[6, v + 1] = math.inf                   # +inf teacher logit in the tail: KL NaN
    t[7, 3] = -math.inf                      # hole where the student's p underflows
    s[7, 3] = -200.0
    s[7, 100] = 400.0
    y = torch.tensor([0, 0, 0, 0, 0, 0, 0, 3])
    mask = torch.ones(n, dtype=torch.bool)
    got, stats = emu_forward(emu, s, t, y, mask=mask, mode=mode)
    ref = reverse_kl_ref(s, t, y, compute_dtype=torch.float64)
    for f in FIELDS_KL:
        assert_close(got[f], getattr(ref, f), atol=2e-5, rtol=2e-5, what=f)
    assert float(got["student_lse"][1]) == math.inf and math.isnan(float(got["student_entropy"][1]))
    assert math.isnan(float(got["kl"][1])) and math.isnan(float(got["student_logprob"][1]))
    assert math.isnan(float(got["student_lse"][2])) and math.isnan(float(got["kl"][2]))
    assert float(got["student_lse"][3]) == -math.inf and math.isnan(float(got["kl"][3]))
    assert float(got["kl"][4]) == math.inf
    assert all(math.isfinite(float(got[f][5])) for f in FIELDS_KL if "logprob" not in f)
    assert float(got["student_logprob"][5]) == -math.inf  # the sampled id 0 has a -inf logit
    assert math.isnan(float(got["kl"][6])) and float(got["teacher_lse"][6]) == math.inf
    assert float(got["kl"][7]) == math.inf  # p_3 = exp(-600) underflows, the hole still counts
    assert float(got["student_logprob"][7]) <= 0.0

    acc = stats.dtype
    ones = torch.ones(n, dtype=acc)
    common = (emu, s, t, y, stats, got["kl"], got["student_entropy"])
    # g_kl != 0: rows 1, 2, 3 (no lse), 4 and 7 (+inf KL) and 6 (NaN KL) are undefined.
    g = emu_backward(*common, [ones, ones, None, None], mode=mode)
    nan_rows = {1, 2, 3, 4, 6, 7}
    for r in range(n):
        if r in nan_rows:
            assert bool(g[r].isnan().all()), r
        else:
            assert bool(g[r].isfinite().all()), r
    assert float(g[5, 1]) == 0.0  # a -inf student logit: exactly 0 (id 0, sampled, gets the one-hot 1)
    # Without a KL gradient the holes do not matter; a NaN entropy with g_h = 0 neither.
    g = emu_backward(*common, [None, ones, None, ones], mode=mode)
    for r in range(n):
        assert bool(g[r].isnan().all()) == (r in {1, 2, 3}), r
    # The same with zero upstream tensors (what autograd passes for an unused
    # output): 0 * (+inf KL) must not make rows 4 and 7 NaN.
    zeros = torch.zeros(n, dtype=acc)
    g0 = emu_backward(*common, [zeros, ones, zeros, ones], mode=mode)
    assert torch.equal(g0.isnan(), g.isnan())
    assert torch.equal(g0.nan_to_num(), g.nan_to_num())
    # A masked row keeps a zero gradient whatever it holds.
    mask[[1, 4]] = False
    got_m, stats_m = emu_forward(emu, s, t, y, mask=mask, mode=mode)
    assert float(got_m["kl"][1]) == 0.0 and float(got_m["student_lse"][4]) == 0.0
    g = emu_backward(emu, s, t, y, stats_m, got_m["kl"], got_m["student_entropy"],
                     [ones, ones, ones, ones], mask=mask, mode=mode)
    assert bool((g[[1, 4]] == 0).all())


@pytest.mark.parametrize("mode", ["warp", "block"])
def test_emu_large_logits_round_z_before_the_max(emu, mode):
    # Logits of 1e4 at T = 0.7: z = x * (1/T) must be rounded before the max is
    # subtracted, or the sampled max token gets log p > 0.
    v = 300 if mode == "warp" else 6000
    s = _logits(6, v, 1.0, torch.float32, 11) + 1e4
    t = _logits(6, v, 1.0, torch.float32, 12) + 1e4
    s[torch.arange(6), torch.arange(6) * 13] = 1e4 + 40.0
    y = torch.arange(6) * 13
    got, stats = emu_forward(emu, s, t, y, temperature=0.7, mode=mode)
    assert bool((got["student_logprob"] <= 0).all())
    _check_fwd(got, s, t, y, temperature=0.7, atol=2e-3, rtol=1e-6)
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    g = emu_backward(emu, s, t, y, stats, got["kl"], got["student_entropy"],
                     [w[k].float() for k in range(4)], temperature=0.7, mode=mode)
    # z carries a rounding of ~1e-3 at 1.4e4 (as in float32 PyTorch): p_j is off by that, relatively
    assert_close(g, _ref_grad(s, t, y, w, temperature=0.7), atol=3e-3, rtol=3e-3, what="grad")


# ---------------------------------------------------------------------------
# CUDA status (runs everywhere)
# ---------------------------------------------------------------------------


def test_cuda_status_says_why_not():
    st = pyopd.cuda_status()
    assert st.available == pyopd.cuda_available()
    if st.available:
        assert st.reason == "" and st.driver_version >= st.runtime_version // 1000 * 1000 > 0
        return
    assert st.reason, "an unavailable CUDA build must say why"
    if not pyopd.build_info()["cuda"]:
        assert "no CUDA kernels" in st.reason and st.runtime_version == 0
        return
    assert st.runtime_version >= 11000
    if st.driver_version == 0:
        assert "no NVIDIA driver" in st.reason and ">= " in st.reason
    elif st.driver_version // 1000 < st.runtime_version // 1000:
        assert "update the driver" in st.reason
    # The kernels' own error on a CUDA launch carries the reason. With no usable
    # device the launch fails at the device check, before any pointer is read.
    p = pyopd._C.VocabStatsFwdParams()
    p.student, p.n_rows, p.vocab, p.student_row_stride = 16, 1, 4, 4
    p.student_entropy = p.student_logprob = p.student_lse = p.stats = 16
    with pytest.raises(RuntimeError, match="pyopd CUDA kernels cannot run: "):
        pyopd._C.vocab_stats_fwd(p, 0, 0)


# ---------------------------------------------------------------------------
# on a device
# ---------------------------------------------------------------------------


def _rowwise_ref(s, t, y, temperature=1.0):
    """float64 reference computed row by row (rows of 2^27 ids fit; the whole would not)."""
    outs = {f: [] for f in FIELDS_KL}
    for r in range(s.shape[0]):
        ref = reverse_kl_ref(s[r:r + 1].double(), t[r:r + 1].double(), y[r:r + 1],
                             temperature=temperature, compute_dtype=torch.float64)
        for f in FIELDS_KL:
            outs[f].append(getattr(ref, f))
        del ref
    return {f: torch.cat(v) for f, v in outs.items()}


@pytest.mark.parametrize("sdt,tdt", DTYPE_PAIRS, ids=lambda d: str(d).split(".")[-1])
# warp rows; block rows (N >= 2x the SMs of an H100/H200: not split); split rows
@pytest.mark.parametrize("n,v,vt", [(64, 37, 40), (64, 4096, 4096), (320, 8000, 8003),
                                    (256, 32001, 32064), (3, 151936, 151936)])
@pytest.mark.parametrize("layout", ["contiguous", "offsets"])
@pytest.mark.cuda
@requires_cuda
def test_device_matches_reference(sdt, tdt, n, v, vt, layout):
    s = _logits(n, v, 3.0, sdt, 20, "cuda")
    t = _logits(n, vt, 3.0, tdt, 21, "cuda")
    if layout == "offsets":
        s, t = _offset_view(s, 1), _offset_view(t, 3)
    y = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(22)).cuda()
    s_req = s.detach().clone().requires_grad_() if layout == "contiguous" else s.detach().requires_grad_()
    got = pyopd.reverse_kl(s_req, t, y, temperature=0.9)
    ref = reverse_kl_ref(s.double(), t.double(), y, temperature=0.9, compute_dtype=torch.float64)
    for f in FIELDS_KL:
        assert_close(getattr(got, f), getattr(ref, f), atol=5e-5, rtol=5e-5, what=f)
    w = torch.randn(4, n, dtype=torch.float64, device="cuda")
    wo = w.to(got.kl.dtype)  # upstream grads in the outputs' dtype
    (wo[0] * got.kl + wo[1] * got.student_logprob + wo[2] * got.student_entropy
     + wo[3] * got.student_lse).to(torch.float64).sum().backward()
    exact = _ref_grad(s, t, y, w, temperature=0.9)
    low = sdt in (torch.bfloat16, torch.float16)
    # float32: p_j (a lp_j - g_kl lq_j + b) cancels where the bracket is small: a few
    # 1e-6 absolute (the CPU kernels and float32 PyTorch are no better)
    atol, rtol = (8e-3, 8e-3) if low else (2e-5, 1e-4) if sdt == torch.float32 else (1e-12, 1e-10)
    assert_close(s_req.grad, exact, atol=atol, rtol=rtol, what="grad")


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("offsets", [False, True])
@pytest.mark.cuda
@requires_cuda
def test_device_small_n_split_rows(n, offsets):
    # Few rows: each row is split over several blocks (forward: partial states
    # merged by a second kernel; backward: independent slices).
    v = 151936
    s = _logits(n, v, 4.0, torch.bfloat16, 30, "cuda")
    t = _logits(n, v + 64, 4.0, torch.bfloat16, 31, "cuda")
    s[:, 100_000] = 30.0  # the max far into the row: slices must rebase when merged
    t[0, 5] = -math.inf   # a hole in one slice
    if offsets:
        s, t = _offset_view(s, 3), _offset_view(t, 1)
    y = torch.full((n,), 100_000, device="cuda")
    x = s.detach().clone().requires_grad_()
    got = pyopd.reverse_kl(x, t, y)
    ref = reverse_kl_ref(s.double(), t.double(), y, compute_dtype=torch.float64)
    for f in FIELDS_KL:
        assert_close(getattr(got, f), getattr(ref, f), atol=5e-5, rtol=5e-5, what=f)
    assert float(got.kl[0].detach()) == math.inf
    (got.student_logprob.sum() + got.student_entropy.sum()).backward()
    xr = s.double().requires_grad_()
    r = reverse_kl_ref(xr, t.double(), y, compute_dtype=torch.float64)
    (r.student_logprob.sum() + r.student_entropy.sum()).backward()
    assert_close(x.grad, xr.grad, atol=8e-3, rtol=8e-3, what="grad")


@pytest.mark.cuda
@requires_cuda
def test_device_non_default_stream():
    n, v = 16, 50000
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        s = _logits(n, v, 2.0, torch.float32, 40, "cuda").requires_grad_()
        t = _logits(n, v, 2.0, torch.float32, 41, "cuda")
        y = torch.randint(0, v, (n,), device="cuda")
        got = pyopd.reverse_kl(s, t, y)
        got.kl.sum().backward()
    stream.synchronize()
    ref = reverse_kl_ref(s.detach().double(), t.double(), y, compute_dtype=torch.float64)
    for f in FIELDS_KL:
        assert_close(getattr(got, f), getattr(ref, f), atol=5e-5, rtol=5e-5, what=f)
    exact = _ref_grad(s.detach(), t, y, torch.tensor([[1.0] * n, [0.0] * n, [0.0] * n, [0.0] * n],
                                                     dtype=torch.float64, device="cuda"))
    assert_close(s.grad, exact, atol=2e-6, rtol=3e-5, what="grad")


@pytest.mark.cuda
@requires_cuda
def test_device_non_finite_semantics():
    v = 9000
    s, t = _logits(8, v, 2.0, torch.float32, 50, "cuda"), _logits(8, v + 3, 2.0, torch.float32, 51, "cuda")
    s[1, 7] = math.inf
    s[2, 9] = math.nan
    s[3] = -math.inf
    t[4, v - 1] = -math.inf
    s[5, 0], t[5, 0] = -math.inf, -math.inf
    t[7, 3], s[7, 3], s[7, 100] = -math.inf, -200.0, 400.0
    got = pyopd.reverse_kl(s, t, torch.zeros(8, dtype=torch.long, device="cuda"))
    assert float(got.student_lse[1]) == math.inf and math.isnan(float(got.kl[1]))
    assert math.isnan(float(got.student_lse[2]))
    assert float(got.student_lse[3]) == -math.inf
    assert float(got.kl[4]) == math.inf and float(got.kl[7]) == math.inf
    assert all(math.isfinite(float(getattr(got, f)[5])) for f in FIELDS_KL if "logprob" not in f)
    res, g = pyopd.reverse_kl_backward(s, t, None, grad_kl=torch.ones(8, device="cuda"),
                                       grad_logprob=torch.ones(8, device="cuda"))
    for r in range(8):
        assert bool(g[r].isnan().all()) == (r in {1, 2, 3, 4, 7}), r
    _, g2 = pyopd.reverse_kl_backward(s, t, None, grad_kl=torch.ones(8, device="cuda"))
    assert torch.equal(g[[0, 5, 6]], g2[[0, 5, 6]])  # no tokens: the logprob grad adds nothing


@pytest.mark.cuda
@requires_cuda
@pytest.mark.slow
def test_device_more_than_2_31_elements():
    # N * V = 2^31 + 2^27 > 2^31: row offsets must be 64-bit (2 x 4.25 GiB of
    # bf16 logits, 4.25 GiB of gradient).
    n, v = 17, 2 ** 27
    free, _total = torch.cuda.mem_get_info()
    if free < 40 * 2 ** 30:
        pytest.fail(f"needs ~40 GiB of free GPU memory, has {free / 2 ** 30:.1f}")
    g = torch.Generator(device="cuda").manual_seed(60)
    s = torch.randn(n, v, generator=g, device="cuda", dtype=torch.bfloat16)
    t = torch.randn(n, v, generator=g, device="cuda", dtype=torch.bfloat16)
    s[-1, -1] = 25.0  # the last row's last id: beyond 2^31 elements from the start
    y = torch.full((n,), v - 1, device="cuda")
    x = s.requires_grad_()
    got = pyopd.reverse_kl(x, t, y)
    ref = _rowwise_ref(s.detach(), t, y)
    # float32 sums of 2^27 terms: ~1e-5 relative; a wrong row offset would be off
    # by whole units (the last row's spike moves its lse from ~19.5 to 25)
    for f in FIELDS_KL:
        assert_close(getattr(got, f), ref[f], atol=5e-4, rtol=1e-4, what=f)
    got.student_logprob[-1].backward()
    # d logprob_y / d s_j = [j == y] - p_j, for the last row only
    row = s[-1].detach().double()
    expect_last = -torch.softmax(row, 0)
    expect_last[-1] += 1.0
    assert_close(x.grad[-1, -4096:], expect_last[-4096:], atol=1e-6, rtol=1e-2, what="grad last row")
    assert bool((x.grad[:-1] == 0).all())
