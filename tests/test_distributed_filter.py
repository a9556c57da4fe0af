"""The FiRe-OPD filter, weights and COPSD group statistics do not depend on how the batch is split.

Whole batch in one call == the same batch computed once and sliced into 4
micro-batches (the loss accumulated with the whole batch's denominator) ==
the batch split unevenly over 2 gloo processes with torch.distributed.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyopd.losses import copsd_loss, fire_opd_loss, fire_opd_signals
from pyopd.ops.signals import fire_token_weights, group_advantages, trajectory_filter, trajectory_scores

B, T, P = 21, 13, 30.0
SPLIT = 8  # rank 0 gets rows [0, 8), rank 1 rows [8, 21): uneven on purpose
TEACHERS = 2


def make_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    d = dict(
        old=old,
        logprob=old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64),
        lq=-torch.rand(B, T, generator=g, dtype=torch.float64) * 3,
        ht=torch.rand(B, T, generator=g, dtype=torch.float64) * 2,
        hs=torch.rand(B, T, generator=g, dtype=torch.float64) * 2,
        kl=torch.rand(B, T, generator=g, dtype=torch.float64),
        mask=torch.arange(T).unsqueeze(0) < torch.randint(0, T + 1, (B, 1), generator=g),
        # prompts of 3 rollouts each, interleaved so that every group spans both ranks
        group=torch.arange(B) % 7 * 1000 + 5,
        teacher=torch.arange(B) % TEACHERS,
    )
    d["mask"][3] = False  # an empty rollout
    return d


def compute(d, rows, **sync):
    """Everything a trainer computes on its (local) batch; float results and the loss gradient."""
    sl = {k: v[rows] for k, v in d.items() if isinstance(v, torch.Tensor)}
    ts = trajectory_scores(sl["lq"], sl["mask"], kl=sl["kl"], p=P, **sync)
    ts_multi = trajectory_scores(sl["lq"], sl["mask"], p=P, teacher_index=sl["teacher"], **sync)
    wb = fire_token_weights(sl["ht"], sl["hs"], sl["mask"], keep=ts.keep, normalize="batch", **sync)
    wt = fire_token_weights(sl["ht"], sl["hs"], sl["mask"], keep=ts_multi.keep, teacher_index=sl["teacher"], **sync)
    ga = group_advantages(sl["lq"], sl["old"], sl["mask"], sl["group"], **sync)
    sig = fire_opd_signals(sl["lq"], sl["mask"], teacher_entropy=sl["ht"], student_entropy=sl["hs"], p=P, **sync)
    lp = sl["logprob"].clone().requires_grad_()
    # whole-batch denominators: known to every rank from the synchronised keep mask
    D_fire, D_copsd = d["fire_D"], float(d["mask"].sum())
    fire, _ = fire_opd_loss(lp, sl["old"], sl["lq"], sl["mask"], keep=sig.keep, weight=sig.weight, denominator=D_fire)
    cop, _ = copsd_loss(lp, sl["old"], None, sl["mask"], advantages=ga.advantage, denominator=D_copsd)
    (fire + cop).backward()
    return dict(
        keep=ts.keep, score=ts.score, threshold=ts.threshold, num_scored=ts.num_scored,
        keep_multi=ts_multi.keep, threshold_multi=ts_multi.threshold,
        weight_batch=wb.weight, weight_teacher=wt.weight, max_t=wt.max_teacher_entropy, max_s=wb.max_student_entropy,
        advantage=ga.advantage, group_std=ga.group_std, group_count=ga.group_count,
        sig_keep=sig.keep, sig_weight=sig.weight,
        loss=(fire + cop).detach().reshape(1), grad=lp.grad,
    )


def whole_batch_reference():
    d = make_data()
    sig = fire_opd_signals(d["lq"], d["mask"], teacher_entropy=d["ht"], student_entropy=d["hs"], p=P)
    d["fire_D"] = float((d["mask"] & sig.keep.unsqueeze(1)).sum())
    return d, compute(d, slice(0, B))


PER_ROW = ("keep", "score", "keep_multi", "weight_batch", "weight_teacher", "advantage", "group_std",
           "group_count", "sig_keep", "sig_weight", "grad")
SHARED = ("threshold", "num_scored", "threshold_multi", "max_t", "max_s")


def assert_match(parts, whole):
    for k in PER_ROW:
        got = torch.cat([p[k] for p in parts])
        if got.dtype in (torch.bool, torch.int64):
            assert torch.equal(got, whole[k]), k
        else:
            torch.testing.assert_close(got, whole[k], rtol=1e-12, atol=1e-12, msg=lambda m: f"{k}: {m}")
    for k in SHARED:
        for p in parts:
            torch.testing.assert_close(p[k], whole[k], rtol=1e-12, atol=1e-12, msg=lambda m: f"{k}: {m}")
    torch.testing.assert_close(sum(p["loss"] for p in parts), whole["loss"], rtol=1e-12, atol=1e-12)


def test_whole_batch_filters_floor_p_percent():
    d, whole = whole_batch_reference()
    n = int(whole["num_scored"][0])
    assert n == int((d["mask"].sum(-1) > 0).sum()) and n >= 15
    assert int((~whole["keep"]).sum()) - (B - n) == int(P * n // 100)  # exactly floor(p% of n) dropped


def test_four_micro_batches_of_whole_batch_signals_match():
    d, whole = whole_batch_reference()
    # The signals are computed ONCE on the whole batch and sliced; only the loss
    # runs per micro-batch, with the whole batch's denominator.
    sig = fire_opd_signals(d["lq"], d["mask"], teacher_entropy=d["ht"], student_entropy=d["hs"], p=P)
    ga = group_advantages(d["lq"], d["old"], d["mask"], d["group"])
    lp = d["logprob"].clone().requires_grad_()
    total = 0.0
    for idx in torch.arange(B).chunk(4):
        f, _ = fire_opd_loss(lp[idx], d["old"][idx], d["lq"][idx], d["mask"][idx], keep=sig.keep[idx],
                             weight=sig.weight[idx], denominator=d["fire_D"])
        c, _ = copsd_loss(lp[idx], d["old"][idx], None, d["mask"][idx], advantages=ga.advantage[idx],
                          denominator=float(d["mask"].sum()))
        total = total + f + c
    total.backward()
    torch.testing.assert_close(total.detach().reshape(1), whole["loss"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lp.grad, whole["grad"], rtol=1e-12, atol=1e-12)
    # Filtering each micro-batch on its own would be a different (wrong) filter...
    chunks = torch.arange(B).chunk(4)
    per_mb = [trajectory_scores(d["lq"][i], d["mask"][i], p=P) for i in chunks]
    assert not torch.equal(torch.cat([t.keep for t in per_mb]), whole["keep"])
    # ...but scores computed per micro-batch, filtered once together, are the whole-batch filter.
    f = trajectory_filter(torch.cat([t.score for t in per_mb]), torch.cat([t.length for t in per_mb]), p=P)
    assert torch.equal(f.keep, whole["keep"])
    assert torch.equal(f.threshold, whole["threshold"]) and torch.equal(f.num_scored, whole["num_scored"])


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        d = make_data()
        sig = fire_opd_signals(d["lq"], d["mask"], teacher_entropy=d["ht"], student_entropy=d["hs"], p=P, sync=False)
        d["fire_D"] = float((d["mask"] & sig.keep.unsqueeze(1)).sum())
        rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, B)
        out = compute(d, rows)  # sync=None: synchronised because torch.distributed is initialised
        # and without synchronisation each rank filters its own rows (what must not happen silently)
        out["local_keep"] = trajectory_scores(d["lq"][rows], d["mask"][rows], p=P, sync=False).keep
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow  # two spawned interpreters importing torch: ~6-12 s
def test_two_gloo_ranks_match_whole_batch(tmp_path):
    _, whole = whole_batch_reference()
    mp.start_processes(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert_match(parts, whole)
    local = torch.cat([p["local_keep"] for p in parts])
    assert not torch.equal(local, whole["keep"])
