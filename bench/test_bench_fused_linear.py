"""Forward + backward from hidden states: fused linear + reverse KL vs the materialised logits.

Run:  python -m pytest bench/test_bench_fused_linear.py --benchmark-only -s
      (PYOPD_BENCH_DEVICE=cuda for the GPU shape; Liger-Kernel joins when importable)

Providers, side by side in one run, each differentiating the student's hidden
states and lm_head weight through the same loss (kl + 0.01 H - log p(y)):
  pyopd              pyopd.fused_linear_reverse_kl (chunked, logits recomputed in backward)
  pyopd-materialised pyopd.reverse_kl(h @ W.T, ht @ Wt.T), autograd through the matmul
  eager              log_softmax of both (float32), KL sum, autograd (pyopd.ops.reverse_kl_ref)
  liger (CUDA only)  LigerFusedLinearJSD(jsd_beta=1), its own mean-KL loss

and two that differentiate the KL term alone (loss = kl.sum()), since the
gradient-in-forward op takes a loss linear in the KL:
  pyopd-loss             pyopd.fused_linear_reverse_kl_loss with coef = 1 (4 matmuls, no recompute)
  pyopd-materialised-kl  pyopd.reverse_kl(h @ W.T, ht @ Wt.T).kl.sum(), autograd through the matmul

Every provider is checked before it is timed, on the first 64 rows: against
pyopd, or (the two kl-only providers) against each other. Recorded per case:
median time of forward + backward, peak extra memory of one forward +
backward (CPU: resident-set high-water mark, which includes
the returned gradients; CUDA: max_memory_allocated) and the bytes of those
gradients, so the extra memory beyond them can be read off.

CPU rounds: the first call (which also gives the memory figure) is the warm-up,
then 3 timed rounds; the shapes are as specified, each round takes tens of
seconds on 2 cores.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import pyopd
from pyopd.ops import reverse_kl_ref
from _memory import peak_extra_bytes
from _results import record

DEVICE = os.environ.get("PYOPD_BENCH_DEVICE", "cpu")
if DEVICE == "cuda" and not pyopd.cuda_available():
    pytest.skip("PYOPD_BENCH_DEVICE=cuda but no CUDA device / CUDA build", allow_module_level=True)

if DEVICE == "cpu":
    SHAPES = [(4096, 1024, 32768, torch.float32), (1024, 2048, 151936, torch.bfloat16)]
    ROUNDS = 3
else:
    SHAPES = [(8192, 4096, 151936, torch.bfloat16)]
    ROUNDS = 10

PROVIDERS = (["pyopd", "pyopd-materialised", "eager", "pyopd-loss", "pyopd-materialised-kl"]
             + (["liger"] if DEVICE == "cuda" else []))
# The provider each one is checked against (the same loss); pyopd is the default.
CHECK_AGAINST = {"pyopd-loss": "pyopd-materialised-kl", "pyopd-materialised-kl": "pyopd-loss"}


def _shape_id(shape) -> str:
    n, h, v, dt = shape
    return f"N{n}-H{h}-V{v}-{str(dt).replace('torch.', '')}"


def _inputs(n, h, v, dtype):
    """Hidden states ~ N(0, 1) and weights scaled so that the logits have a std of ~2."""
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=DEVICE).mul_(scale).to(dtype)

    s_h, t_h = randn(n, h), randn(n, h)
    s_w, t_w = randn(v, h, scale=2 / math.sqrt(h)), randn(v, h, scale=2 / math.sqrt(h))
    y = torch.randint(0, v, (n,), device=DEVICE, generator=g)
    return s_h, s_w, t_h, t_w, y


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _loss(r):
    return r.kl.sum() + 0.01 * r.student_entropy.sum() - r.student_logprob.sum()


_liger_cache: dict = {}


def _liger():
    """LigerFusedLinearJSD with beta = 1 (reverse KL), or None when unavailable."""
    if "fn" not in _liger_cache:
        try:
            from liger_kernel.transformers import LigerFusedLinearJSD

            _liger_cache["fn"] = LigerFusedLinearJSD(jsd_beta=1.0)
        except Exception:  # not installed, no Triton, or a version that rejects beta = 1
            _liger_cache["fn"] = None
    return _liger_cache["fn"]


def _fwd_bwd(provider, s_h, s_w, t_h, t_w, y):
    """One forward + backward; returns (loss, grad_hidden, grad_weight)."""
    x = s_h.detach().requires_grad_()
    w = s_w.detach().requires_grad_()
    if provider == "pyopd":
        loss = _loss(pyopd.fused_linear_reverse_kl(x, w, t_h, t_w, y))
    elif provider == "pyopd-materialised":
        with torch.no_grad():
            t_logits = t_h @ t_w.T
        loss = _loss(pyopd.reverse_kl(x @ w.T, t_logits, y))
    elif provider == "pyopd-loss":
        coef = torch.ones(y.shape, device=y.device)
        loss, _ = pyopd.fused_linear_reverse_kl_loss(x, w, t_h, t_w, coef, y)
    elif provider == "pyopd-materialised-kl":
        with torch.no_grad():
            t_logits = t_h @ t_w.T
        loss = pyopd.reverse_kl(x @ w.T, t_logits, y).kl.sum()
    elif provider == "eager":
        with torch.no_grad():
            t_logits = t_h @ t_w.T
        loss = _loss(reverse_kl_ref(x @ w.T, t_logits, y, compute_dtype=torch.float32))
    else:
        loss = _liger()(x, w, t_h, t_w, None)  # no shift_labels: every row counts
    loss.backward()
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_fused_linear_reverse_kl_fwd_bwd(benchmark, provider, shape):
    n, h, v, dtype = shape
    if provider == "liger" and _liger() is None:
        pytest.skip("Liger-Kernel (with jsd_beta = 1) not importable")
    s_h, s_w, t_h, t_w, y = _inputs(n, h, v, dtype)

    # Check before timing, on the first 64 rows.
    sl = (s_h[:64], s_w, t_h[:64], t_w, y[:64])
    if provider == "liger":
        ours = pyopd.fused_linear_reverse_kl(*sl).kl.mean()
        theirs, _, _ = _fwd_bwd(provider, *sl)
        torch.testing.assert_close(theirs.float(), ours.float(), rtol=2e-2, atol=2e-2)
    elif provider != "pyopd":
        ours = _fwd_bwd(CHECK_AGAINST.get(provider, "pyopd"), *sl)
        theirs = _fwd_bwd(provider, *sl)
        torch.testing.assert_close(theirs[0].float(), ours[0].float(), rtol=1e-3, atol=1e-1)
        for a, b in zip(theirs[1:], ours[1:]):
            torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)

    def run():
        out = _fwd_bwd(provider, s_h, s_w, t_h, t_w, y)
        _sync()
        return out

    grad_bytes = (s_h.numel() + s_w.numel()) * s_h.element_size()
    if DEVICE == "cpu":
        # The first call is the warm-up and gives the memory figure.
        benchmark.extra_info["peak_extra_fwd_bwd_bytes"] = peak_extra_bytes(run)
    else:
        run()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        benchmark.extra_info["peak_extra_fwd_bwd_bytes"] = torch.cuda.max_memory_allocated() - base
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(provider=provider, shape=_shape_id(shape), grad_bytes=grad_bytes,
                                logits_bytes=n * v * s_h.element_size())
    record(benchmark, "fused linear + reverse_kl fwd+bwd")
