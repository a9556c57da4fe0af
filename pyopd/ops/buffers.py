"""Reused host memory for the [N, V] gradient of the eager CPU backward.

PyTorch's CPU allocator hands every large tensor a new mapping from the OS, and
the OS zeroes each page on first write. For the gradient w.r.t. the logits,
allocated once per backward and freed a few operations later (after the
lm_head's backward matmul has read it), that zeroing is a large share of the
whole step: on this project's 2-core Xeon, one thread, the backward kernel
takes 120 ms at N x V = 4096 x 32768 float32 and the same backward into a new
tensor 173 ms (`bench/cpu_profile.py`).

So the eager CPU backward takes its gradient from a small pool of buffers that
outlive the tensors made from them: a buffer is free again when no tensor
refers to it any more (the tensors are `torch.frombuffer` views of it, each
holding a reference), and is then handed out without being zeroed. It is the
role PyTorch's caching allocator plays on CUDA, for one kind of tensor only:

* only requests of at least ``MIN_BYTES``; a free buffer is reused for a
  request of at least half its size, so a small gradient never pins a large
  buffer;
* at most ``MAX_BUFFERS`` buffers; when all are in use, or with
  ``PYOPD_CPU_GRAD_POOL=0`` (read at each call), the gradient is a plain
  ``torch.empty``;
* `release()` drops the free buffers (memory in use stays with its tensors).

The returned tensors are ordinary, writable, 64-byte aligned tensors; their
storage cannot be resized (``resize_`` raises), which autograd never asks of a
gradient. torch.compile and tensor subclasses never come here (they go
through the ``pyopd::vocab_stats_bwd`` custom op, which allocates normally).
"""
from __future__ import annotations

import math
import os
import sys
import threading

import torch

__all__ = ["MAX_BUFFERS", "MIN_BYTES", "empty_gradient", "release", "stats"]

MIN_BYTES: int = 16 * 2**20
MAX_BUFFERS: int = 2
_ALIGN = 64

_lock = threading.Lock()
_buffers: list[bytearray] = []
_counts = {"reused": 0, "allocated": 0, "bypassed": 0}


def _enabled() -> bool:
    return os.environ.get("PYOPD_CPU_GRAD_POOL", "1") != "0"


def _is_free(i: int) -> bool:
    """No tensor refers to buffer i: its only references are the list's and getrefcount's argument."""
    return sys.getrefcount(_buffers[i]) == 2


def _free_index(nbytes: int) -> int:
    """Index of a free buffer that fits ``nbytes`` without being more than twice as large, or -1."""
    for i in range(len(_buffers)):
        if nbytes <= len(_buffers[i]) - _ALIGN <= 2 * nbytes and _is_free(i):
            return i
    return -1


def _view(buf: bytearray, shape, dtype: torch.dtype, count: int) -> torch.Tensor:
    addr = torch.frombuffer(buf, dtype=torch.uint8, count=1).data_ptr()
    return torch.frombuffer(buf, dtype=dtype, count=count, offset=(-addr) % _ALIGN).view(shape)


def empty_gradient(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor, from the pool when it is large enough."""
    count = math.prod(shape)
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if nbytes < MIN_BYTES or not _enabled():
        return torch.empty(shape, dtype=dtype)
    with _lock:
        i = _free_index(nbytes)
        if i >= 0:
            _counts["reused"] += 1
            return _view(_buffers[i], shape, dtype, count)
        if len(_buffers) >= MAX_BUFFERS:
            # Replace a free buffer of the wrong size, else give up on pooling this one.
            free = [j for j in range(len(_buffers)) if _is_free(j)]
            if not free:
                _counts["bypassed"] += 1
                return torch.empty(shape, dtype=dtype)
            del _buffers[free[0]]
        _buffers.append(bytearray(nbytes + _ALIGN))
        _counts["allocated"] += 1
        return _view(_buffers[-1], shape, dtype, count)


def release() -> int:
    """Drops the pool's free buffers; returns the bytes released."""
    with _lock:
        free = [i for i in range(len(_buffers)) if _is_free(i)]
        freed = sum(len(_buffers[i]) for i in free)
        for i in reversed(free):
            del _buffers[i]
        return freed


def stats() -> dict:
    """Buffers held (bytes, in use or free) and how requests were served, for tests and profiling."""
    with _lock:
        in_use = sum(not _is_free(i) for i in range(len(_buffers)))
        return {"buffers": len(_buffers), "in_use": in_use,
                "bytes": sum(len(b) for b in _buffers), **_counts}
