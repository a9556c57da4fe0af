"""The trainer in 2 gloo processes equals 1 process on the same global batch,
replicated (gradients all-reduced) and sharded with FSDP2 (--fsdp), and a run
resumes across world sizes and sharding from the other's checkpoint.

Sampling is replaced by a deterministic function of the prompt, so both runs
see exactly the same rollouts; everything after it (scoring, the objective's
batch signals across ranks, the global denominators, the summed gradients,
the optimizer step) is the real code path.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LOSSES = ("fire", "copsd", "rkl")
PROMPTS, N = 4, 3


def fake_sample(model, tokenizer, prompts, n, *, max_new_tokens, temperature=1.0, top_p=1.0):
    """n responses per prompt, a fixed function of the prompt text (varying lengths, some EOS)."""
    from pyopd.trainers.rollout import Rollouts, response_mask

    rows_p, rows_ids, resp, groups = [], [], [], []
    for gi, p in enumerate(prompts):
        ids = tokenizer(p)["input_ids"]
        h = zlib.crc32(p.encode())
        for j in range(n):
            length = 2 + (h + 3 * j) % (max_new_tokens - 1)
            toks = [4 + (h + 7 * j + 5 * t) % 90 for t in range(max_new_tokens)]
            if length < max_new_tokens:
                toks[length] = tokenizer.eos_token_id
            rows_p.append(p)
            rows_ids.append(ids)
            resp.append(toks)
            groups.append(gi)
    response = torch.tensor(resp)
    mask = response_mask(response, tokenizer.eos_token_id)
    response = torch.where(mask, response, torch.full_like(response, tokenizer.pad_token_id))
    return Rollouts(rows_p, rows_ids, response, mask, torch.tensor(groups), [""] * len(rows_p))


def make_trainer(cache: str, loss: str, out: str, fsdp: bool = False, steps: int = 1, save_every: int = 0):
    """A trainer on the tiny models whose sampling is `fake_sample`."""
    import pyopd.trainers.opd as opd_mod
    from pyopd.demo.fire_opd import make_prompt_source
    from pyopd.tasks.prepare import prepare_models
    from pyopd.tasks.registry import get_task
    from pyopd.trainers.opd import OPDConfig, OPDTrainer

    opd_mod.sample_rollouts = fake_sample
    prepared = prepare_models(scale="tiny", cache_dir=cache, seed=0, log=None)
    task = get_task("mixed")
    cfg = OPDConfig(loss=loss, steps=steps, prompts_per_step=PROMPTS, n=N, micro_batch=2, mini_batches=1,
                    max_new_tokens=6, eval_every=0, save_every=save_every, out_dir=out, lr=1e-2, seed=5,
                    percentile=40.0, dual_clip=3.0 if loss == "copsd" else None, fsdp=fsdp)
    ref = prepared.load_student() if loss == "copsd" else None
    return OPDTrainer(cfg, prepared.load_student(), {"mixed": prepared.load_teacher("mixed")},
                      prepared.load_tokenizer(), make_prompt_source(task, lambda e: "mixed"),
                      reference=ref, log=lambda *_: None, progress=False)


def flat_params(tr) -> torch.Tensor:
    """Every parameter, full (a collective when sharded), as one vector."""
    from pyopd.trainers.sharding import full_tensor

    return torch.cat([full_tensor(p.detach()).reshape(-1) for p in tr.student.parameters()])


def one_step(cache: str, loss: str, out: str, fsdp: bool = False):
    """Build a trainer on the tiny models and run one step on a fixed global batch."""
    tr = make_trainer(cache, loss, out, fsdp)
    seen = {}
    real_signals = tr.objective.signals

    def spy(batch):
        sig = real_signals(batch)
        seen["signals"] = sig
        return sig

    tr.objective.signals = spy
    torch.manual_seed(0)
    batch = tr.prompts(0, PROMPTS, random.Random(11))
    metrics = tr.train_step(batch)
    params = flat_params(tr)
    weight = seen["signals"].rows.get("weight", seen["signals"].rows.get("advantage"))
    return metrics, params, weight


def _worker(rank: int, world: int, store: str, cache: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        res = {}
        for loss in LOSSES:
            for fsdp in (False, True):
                metrics, params, weight = one_step(cache, loss, f"{out_dir}/run-{loss}-{fsdp}", fsdp)
                gathered = [torch.zeros_like(weight) for _ in range(world)] if weight is not None else None
                if weight is not None:
                    dist.all_gather(gathered, weight.contiguous())
                res[loss, fsdp] = {"loss": metrics["loss"], "params": params,
                                   "weight": None if weight is None else torch.cat(gathered)}
        # Resume across world sizes and sharding: the sharded 2-process run continues the
        # 1-process run's checkpoint-1 ...
        tr = make_trainer(cache, "fire", f"{out_dir}/resume-from-single", fsdp=True, steps=2)
        tr.train(resume=True)
        res["resumed_sharded"] = flat_params(tr)
        # ... and writes its own checkpoint-1 (full tensors, optimizer state by name).
        tr = make_trainer(cache, "fire", f"{out_dir}/sharded-run", fsdp=True, steps=2, save_every=1)
        tr.train(resume=False)
        res["sharded_2_steps"] = flat_params(tr)
        if rank == 0:
            torch.save(res, f"{out_dir}/dist.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters: tens of seconds on 2 cores
@pytest.mark.distributed
def test_two_processes_equal_one_process_on_the_same_global_batch(tmp_path):
    from pyopd.tasks.prepare import prepare_models

    cache = str(tmp_path / "cache")
    prepare_models(scale="tiny", cache_dir=cache, seed=0, log=None)  # built once, loaded by both ranks
    torch.set_num_threads(1)
    single = {loss: one_step(cache, loss, str(tmp_path / f"single-{loss}")) for loss in LOSSES}
    # A 1-process run of 2 steps with a checkpoint after each; its checkpoint-1 (optimizer
    # state by index) is what the sharded run resumes from.
    ref = make_trainer(cache, "fire", str(tmp_path / "single-2-steps"), steps=2, save_every=1)
    ref.train(resume=False)
    two_steps = flat_params(ref)
    (tmp_path / "resume-from-single").mkdir()
    shutil.copytree(tmp_path / "single-2-steps" / "checkpoint-1", tmp_path / "resume-from-single" / "checkpoint-1")
    mp.start_processes(_worker, args=(2, str(tmp_path / "store"), cache, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    multi = torch.load(tmp_path / "dist.pt", weights_only=True)
    report = {}
    for loss in LOSSES:
        m1, p1, w1 = single[loss]
        for fsdp in (False, True):
            got = multi[loss, fsdp]
            key = f"{loss}{'-fsdp' if fsdp else ''}"
            report[key] = {"loss_1": m1["loss"], "loss_2": got["loss"],
                           "max_param_diff": float((p1 - got["params"]).abs().max())}
            assert got["loss"] == pytest.approx(m1["loss"], rel=1e-5, abs=1e-6), key
            torch.testing.assert_close(got["params"], p1, atol=1e-5, rtol=1e-5, msg=key)
            if w1 is not None:
                torch.testing.assert_close(got["weight"], w1, atol=1e-5, rtol=1e-5, msg=key)
    # Resume across world size and sharding, both ways, lands where 2 uninterrupted steps do.
    torch.testing.assert_close(multi["sharded_2_steps"], two_steps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(multi["resumed_sharded"], two_steps, atol=1e-5, rtol=1e-5)
    back = tmp_path / "resume-from-sharded"
    back.mkdir()
    shutil.copytree(tmp_path / "sharded-run" / "checkpoint-1", back / "checkpoint-1")
    tr = make_trainer(cache, "fire", str(back), steps=2)
    tr.train(resume=True)
    torch.testing.assert_close(flat_params(tr), two_steps, atol=1e-5, rtol=1e-5)
    report["resume"] = {"max_param_diff_resumed_sharded": float((multi["resumed_sharded"] - two_steps).abs().max())}
    (tmp_path / "report.json").write_text(json.dumps(report))


def test_sharding_a_model_twice_keeps_the_first_sharding(tmp_path, prepared):
    # The demo trains one objective after another with the same teacher object:
    # the second trainer must not shard it again (fully_shard refuses a second call).
    from pyopd.trainers import sharding

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        from torch.distributed.fsdp import FSDPModule

        m = prepared.load_teacher("mixed")
        blocks = sharding.block_modules(m)
        assert len(blocks) == m.config.num_hidden_layers and not sharding.is_sharded(m)
        assert sharding.shard(m) is m and sharding.is_sharded(m)
        assert all(isinstance(b, FSDPModule) for b in blocks)  # each block is its own unit
        assert sharding.shard(m) is m  # no error, same model
    finally:
        dist.destroy_process_group()


def _prepare_worker(rank: int, world: int, store: str, cache: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from pyopd.tasks.prepare import prepare_models

        for models in (("same",), ("mixed",), None):  # entries built one after another
            p = prepare_models(scale="tiny", cache_dir=cache, seed=0, log=None, models=models)
            for name in models or ("same", "mixed"):
                p.load_teacher(name)
            p.load_student()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_ranks_prepare_an_empty_cache_once_and_all_load_it(tmp_path):
    # Under torchrun every rank calls prepare_models on the same cache: rank 0 builds,
    # the others wait and load (two ranks building at once broke a loading rank).
    mp.start_processes(_prepare_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "cache")),
                       nprocs=2, start_method="spawn")
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith("tasks-"))
    assert len(entries) == 3, entries
