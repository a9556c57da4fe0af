"""trajectory_scores / fire_token_weights / group_advantages: pyopd vs their eager PyTorch references.

Run:  python -m pytest bench/test_bench_signals.py --benchmark-only -s
      (PYOPD_BENCH_DEVICE=cuda on a GPU; bench/gpu_check.sh runs every bench file)

Shape: a rollout batch of B = 256 responses of T = 4096 tokens, float32
per-token signals (what `pyopd.reverse_kl` returns) and a prefix response mask.
These ops are tiny next to the vocabulary pass (that reads ~0.6 MB per token,
these read ~20 bytes), so the point is a handful of launches and no [B, T]
temporaries instead of the reference's dozen eager ops: the ratio to eager
and the fraction of a streaming copy of the same bytes are what to look at.
Every case is checked against the reference before it is timed.
"""
from __future__ import annotations

import os

import pytest
import torch

import pyopd
from _results import record
from pyopd.ops.signals import fire_token_weights, group_advantages, trajectory_scores
from pyopd.ops.signals_reference import (
    fire_token_weights_ref,
    group_advantages_ref,
    trajectory_scores_ref,
)

DEVICE = os.environ.get("PYOPD_BENCH_DEVICE", "cpu")
if DEVICE == "cuda" and not pyopd.cuda_available():
    pytest.skip("PYOPD_BENCH_DEVICE=cuda but no CUDA device / CUDA build", allow_module_level=True)

B, T = 256, 4096
GROUP = 8  # rollouts per prompt
SHAPE_ID = f"B{B}-T{T}-float32"
ROUNDS = 5 if DEVICE == "cpu" else 50
PROVIDERS = ["pyopd", "eager"]

# Bytes the pyopd kernels move per token (float32 signals, 1-byte mask):
#   trajectory_scores:  one pass reading 4 signals + mask
#   fire_token_weights: row maxima (2 signals + mask), then weights (2 signals + mask, 1 write)
#   group_advantages:   row moments (2 signals + mask; the second sweep is cache-resident),
#                       then advantages (2 signals + mask, 1 write)
BYTES_PER_TOKEN = {"trajectory_scores": 17, "fire_token_weights": 22, "group_advantages": 22}


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    length = torch.randint(T // 4, T + 1, (B,), generator=g)
    d = {
        "mask": torch.arange(T).unsqueeze(0) < length.unsqueeze(1),
        "teacher_logprob": -torch.rand(B, T, generator=g) * 4,
        "student_logprob": -torch.rand(B, T, generator=g) * 4,
        "kl": torch.rand(B, T, generator=g),
        "teacher_entropy": torch.rand(B, T, generator=g) * 3,
        "student_entropy": torch.rand(B, T, generator=g) * 3,
        "group": torch.arange(B) // GROUP,
    }
    d = {k: v.to(DEVICE) for k, v in d.items()}
    d["keep"] = trajectory_scores_ref(d["teacher_logprob"], d["mask"], p=20).keep
    return d


def _calls(d):
    sig = dict(kl=d["kl"], teacher_entropy=d["teacher_entropy"], student_entropy=d["student_entropy"])
    fw = (d["teacher_entropy"], d["student_entropy"], d["mask"])
    ga = (d["teacher_logprob"], d["student_logprob"], d["mask"], d["group"])
    return {
        "trajectory_scores": {
            "pyopd": lambda: trajectory_scores(d["teacher_logprob"], d["mask"], p=20, **sig),
            "eager": lambda: trajectory_scores_ref(d["teacher_logprob"], d["mask"], p=20, **sig),
        },
        "fire_token_weights": {
            "pyopd": lambda: fire_token_weights(*fw, keep=d["keep"]),
            "eager": lambda: fire_token_weights_ref(*fw, keep=d["keep"]),
        },
        "group_advantages": {
            "pyopd": lambda: group_advantages(*ga),
            "eager": lambda: group_advantages_ref(*ga),
        },
    }


def _check(op, ours, ref):
    if op == "trajectory_scores":
        assert torch.equal(ours.keep, ref.keep)
        torch.testing.assert_close(ours.score, ref.score, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.mean_kl, ref.mean_kl, rtol=1e-5, atol=1e-5)
    elif op == "fire_token_weights":
        torch.testing.assert_close(ours.weight, ref.weight, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(ours.advantage, ref.advantage, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", list(BYTES_PER_TOKEN))
def test_signals(benchmark, data, op, provider):
    calls = _calls(data)[op]
    _check(op, calls["pyopd"](), calls["eager"]())  # check before timing
    fn = calls[provider]

    def run():
        out = fn()
        _sync()
        return out

    run()  # warm-up
    benchmark.group = f"{op} {SHAPE_ID}"
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    nbytes = BYTES_PER_TOKEN[op] * B * T
    benchmark.extra_info.update(provider=provider, shape=SHAPE_ID, bytes=nbytes,
                                gbps=nbytes / benchmark.stats.stats.median / 1e9)
    record(benchmark, op)


def test_streaming_copy_roofline_signals(benchmark):
    """A plain copy of as many bytes as group_advantages moves: the practical ceiling."""
    nbytes = BYTES_PER_TOKEN["group_advantages"] * B * T
    src = torch.ones(nbytes // 2 // 4, device=DEVICE)
    dst = torch.empty_like(src)

    def run():
        dst.copy_(src)
        _sync()

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(provider="copy", shape=SHAPE_ID, bytes=nbytes,
                                gbps=nbytes / benchmark.stats.stats.median / 1e9)
    record(benchmark, "signals")
