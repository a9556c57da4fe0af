"""torch.distributed helpers of the signal ops (`pyopd.ops.signals`).

The batch-level reductions of the signal ops (filter quantile, entropy maxima,
group pooling) run over every rank's rollouts when torch.distributed is
initialised. These collectives run eagerly only (`run_eager`): under
torch.compile they are a graph break (an error with fullgraph=True), never a
traced collective whose sizes depend on the data.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["all_gather_rows", "max_over_ranks", "run_eager", "sync_group"]


def sync_group(process_group, sync: Optional[bool]):
    """The group to reduce over, or None for this process alone.

    sync=None: all ranks of `process_group` (default: the world) when
    torch.distributed is initialised with more than one rank; sync=False: never;
    sync=True: required (an error without torch.distributed).
    """
    if sync is False:
        return None
    import torch.distributed as dist

    ready = dist.is_available() and dist.is_initialized()
    if not ready:
        if sync:
            raise RuntimeError("sync=True needs torch.distributed to be initialised")
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


_EAGER_REASON = (
    "the cross-rank (torch.distributed) path of the pyopd signal ops runs eagerly only: pass "
    "sync=False inside torch.compile(fullgraph=True), or call the op outside the compiled region")


def _eager(fn, *args):
    return fn(*args)


try:  # the reason shows in torch.compile's error (torch >= 2.8 takes one)
    _eager = torch.compiler.disable(_eager, reason=_EAGER_REASON)
except TypeError:
    _eager = torch.compiler.disable(_eager)


def run_eager(fn, *args):
    """fn(*args) outside any torch.compile graph.

    Under torch.compile this is a graph break: without fullgraph the
    collectives run eagerly between two graphs; with fullgraph=True the
    compile fails with an error that gives `_EAGER_REASON`.
    """
    return _eager(fn, *args)


def all_gather_rows(x: torch.Tensor, group, *, with_offset: bool = False):
    """Concatenation over the ranks of `group`, in rank order, of tensors whose first dims may differ.

    With `with_offset`, also returns the index of this rank's first row in it.
    """
    import torch.distributed as dist

    world = dist.get_world_size(group)
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes_l = [int(s) for s in torch.cat(sizes).tolist()]
    rows = max(sizes_l)
    padded = x.new_zeros((rows,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded.contiguous(), group=group)
    cat = torch.cat([o[:s] for o, s in zip(out, sizes_l)])
    if with_offset:
        return cat, sum(sizes_l[: dist.get_rank(group)])
    return cat


def max_over_ranks(x: torch.Tensor, group) -> torch.Tensor:
    """Elementwise max of `x` over the ranks of `group` (x itself when group is None); NaN propagates."""
    if group is None:
        return x
    g = all_gather_rows(x.unsqueeze(0), group)  # [ranks, ...]
    return g.amax(0)
