"""The CPU gradient pool (pyopd.ops.buffers): reuse only what no tensor refers to any more."""
from __future__ import annotations

import gc

import pytest
import torch

import pyopd
from pyopd.ops import buffers

BIG = (1024, 4096 + 17)  # float32: ~16.1 MiB, above MIN_BYTES, odd row length


@pytest.fixture(autouse=True)
def _fresh_pool(monkeypatch):
    monkeypatch.delenv("PYOPD_CPU_GRAD_POOL", raising=False)
    gc.collect()
    buffers.release()
    yield
    gc.collect()
    buffers.release()


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_a_freed_gradient_buffer_is_reused_and_a_live_one_never():
    a = buffers.empty_gradient(BIG, torch.float32)
    assert a.shape == BIG and a.is_contiguous() and a.data_ptr() % 64 == 0
    a.fill_(1.0)
    b = buffers.empty_gradient(BIG, torch.float32)  # a is alive: another buffer
    assert _storage(b) != _storage(a)
    b.fill_(2.0)
    assert bool((a == 1.0).all())
    ptr = a.data_ptr()
    del a
    c = buffers.empty_gradient(BIG, torch.float32)  # a's buffer, not zeroed again
    assert c.data_ptr() == ptr and bool((c == 1.0).all())
    s = buffers.stats()
    assert s["buffers"] == 2 and s["in_use"] == 2 and s["reused"] == 1 and s["allocated"] == 2


def test_views_keep_the_buffer_in_use():
    a = buffers.empty_gradient(BIG, torch.float32)
    row = a[3]
    del a
    b = buffers.empty_gradient(BIG, torch.float32)
    assert _storage(b) != _storage(row)


def test_small_requests_wrong_sizes_full_pool_and_the_switch(monkeypatch):
    small = buffers.empty_gradient((8, 8), torch.float32)
    assert buffers.stats()["buffers"] == 0 and small.untyped_storage().resizable()
    big = (2300, 4113)  # 37.8 MB
    a = buffers.empty_gradient(big, torch.float32)
    ptr = a.data_ptr()
    del a
    # 18.1 MB (above MIN_BYTES) is less than half the free buffer: it gets its own.
    half = buffers.empty_gradient((1100, 4113), torch.float32)
    assert half.data_ptr() != ptr and buffers.stats()["buffers"] == 2
    big2 = buffers.empty_gradient(big, torch.float32)  # the first buffer again
    assert big2.data_ptr() == ptr
    third = buffers.empty_gradient(big, torch.float32)  # both held: a plain tensor
    assert buffers.stats()["bypassed"] == 1 and third.untyped_storage().resizable()
    monkeypatch.setenv("PYOPD_CPU_GRAD_POOL", "0")
    del big2
    off = buffers.empty_gradient(big, torch.float32)
    assert off.data_ptr() != ptr and off.untyped_storage().resizable()


def test_release_drops_only_free_buffers():
    a = buffers.empty_gradient(BIG, torch.float32)
    b = buffers.empty_gradient(BIG, torch.float32)
    del b
    freed = buffers.release()
    assert freed >= BIG[0] * BIG[1] * 4 and buffers.stats()["buffers"] == 1
    a.fill_(3.0)  # still valid
    assert float(a.sum()) == 3.0 * a.numel()


def test_autograd_gradients_stay_correct_when_kept_across_steps(monkeypatch):
    """Two backward passes through reverse_kl with the first step's gradients kept alive
    (retain_grad on the logits): neither is overwritten by the other, both equal the
    pool-free result, and .grad accumulation into a pooled tensor works."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(BIG, generator=g)
    t = torch.randn(BIG, generator=g)
    y = torch.randint(0, BIG[1], (BIG[0],), generator=g)
    w = torch.rand(BIG[0], generator=g)

    def grad_of(scale):
        x = s.clone().requires_grad_()
        logits = x * 1.0
        logits.retain_grad()
        ((pyopd.reverse_kl(logits, t, y).kl * w).sum() * scale).backward()
        return logits.grad, x.grad

    kept = [grad_of(1.0), grad_of(2.0)]
    assert buffers.stats()["allocated"] >= 1
    with monkeypatch.context() as m:
        m.setenv("PYOPD_CPU_GRAD_POOL", "0")
        want = [grad_of(1.0), grad_of(2.0)]
    for (a, b), (wa, wb) in zip(kept, want):
        assert torch.equal(a, wa) and torch.equal(b, wb)
    leaf = s.clone().requires_grad_()
    for _ in range(3):
        pyopd.reverse_kl(leaf, t, y).kl.sum().backward()
    x = s.clone().requires_grad_()
    pyopd.reverse_kl(x, t, y).kl.sum().backward()
    torch.testing.assert_close(leaf.grad, 3 * x.grad, rtol=1e-6, atol=1e-7)
