"""TRL's GKD loss (beta=1) vs the TRL plug-in's loss, forward + backward on the same logits (CPU).

Run:  python -m pytest bench/test_bench_trl.py --benchmark-only -s

Providers, side by side in one run, each differentiating the student logits
[B, T, V] through GKD's token-mean reverse KL over the completion positions
(labels != -100; the first PROMPT positions of every row are prompt):
  pyopd       pyopd.integrations.trl.gkd_reverse_kl_loss (fused kernel)
  pyopd_fire  the same with FiRe-OPD's filter and weights (fire_opd_signals once)
  trl         trl.experimental.gkd.GKDTrainer.generalized_jsd_loss(beta=1)
              (log_softmax of both models, F.kl_div, boolean-mask select)

Every provider is checked against pyopd before it is timed (loss and gradient
on the first row; pyopd_fire against its own definition). Recorded: median
time of forward + backward, and the peak extra host memory of one forward +
backward (resident-set high-water mark, bench/_memory.py), which includes the
returned [B, T, V] gradient (grad_bytes) for every provider.

CPU rounds: the first call (which also gives the memory figure) is the
warm-up, then 3 timed rounds.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

pytest.importorskip("trl", minversion="1.16", reason="TRL >= 1.16 is not installed (pip install 'pyopd[trl]')")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # trl.experimental warns on import
    from trl.experimental.gkd import GKDTrainer

from pyopd.integrations.trl import FireOptions, gkd_reverse_kl_loss  # noqa: E402
from _memory import peak_extra_bytes  # noqa: E402
from _results import record  # noqa: E402

SHAPES = [(4, 512, 32768, torch.float32)]
PROMPT = 64  # leading positions of each row that are prompt (label -100)
ROUNDS = int(os.environ.get("PYOPD_BENCH_ROUNDS", "3"))
PROVIDERS = ["pyopd", "pyopd_fire", "trl"]


def _shape_id(shape) -> str:
    b, t, v, dt = shape
    return f"B{b}-T{t}-V{v}-{str(dt).replace('torch.', '')}"


def _inputs(b, t, v, dtype):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(b, t, v, generator=g).mul_(2).to(dtype)
    te = torch.randn(b, t, v, generator=g).mul_(2).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, :PROMPT] = -100
    return s, te, labels


def _fwd_bwd(provider, s, te, labels):
    """One forward + backward; returns (loss, grad of the student logits)."""
    x = s.detach().requires_grad_()
    if provider == "trl":
        loss = GKDTrainer.generalized_jsd_loss(x, te, labels=labels, beta=1.0)
    else:
        fire = FireOptions(p=20.0) if provider == "pyopd_fire" else None
        loss = gkd_reverse_kl_loss(x, te, labels, fire=fire).loss
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_gkd_loss_fwd_bwd(benchmark, provider, shape):
    b, t, v, dtype = shape
    s, te, labels = _inputs(b, t, v, dtype)

    # Check before timing on the first row (FiRe keeps a lone rollout, weight ~1 each).
    sl = (s[:1], te[:1], labels[:1])
    ours = _fwd_bwd("pyopd", *sl)
    if provider == "trl":
        theirs = _fwd_bwd("trl", *sl)
        torch.testing.assert_close(theirs[0], ours[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs[1], ours[1], rtol=1e-5, atol=1e-7)
    elif provider == "pyopd_fire":
        res = gkd_reverse_kl_loss(*sl, fire=FireOptions(p=20.0))
        m = res.mask & res.fire.keep[:, None]
        expected = (res.fire.weight * res.signals.kl)[m].sum() / res.mask.sum()
        torch.testing.assert_close(res.loss, expected, rtol=1e-6, atol=1e-6)

    def run():
        return _fwd_bwd(provider, s, te, labels)

    benchmark.extra_info["peak_extra_fwd_bwd_bytes"] = peak_extra_bytes(run)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(provider=provider, shape=_shape_id(shape), grad_bytes=s.numel() * s.element_size(),
                                logits_bytes=s.numel() * s.element_size())
    record(benchmark, "GKD reverse KL (beta=1) fwd+bwd")
