"""Checkpoints: safe to load (no pickled code), fallback past corrupt ones, strict weights, temp
cleanup; the metrics log never loses a previous run's data and survives a torn line."""
from __future__ import annotations

import json
import os
import random
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pyopd.trainers import checkpoint as ckpt_io
from pyopd.trainers.checkpoint import CheckpointError
from pyopd.trainers.records import JsonlLog, read_jsonl


def _tiny_lm(tied: bool, seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=tied)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def _state(model) -> dict:
    """A real optimizer + LambdaLR state after one step (what OPDTrainer.save stores)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    sched.step()
    return {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "history": [{"step": 1, "loss": 0.5, "eval/accuracy": None}],
            "config": {"loss": "fire", "reward_clip": (-3.0, 5.0), "dual_clip": None}}


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, params: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, params[k]) for k, v in model.state_dict().items())


@pytest.fixture()
def two_ckpts(tmp_path):
    """out_dir with checkpoint-1 and checkpoint-2 of different weights; returns (out, model, w1, w2)."""
    model = _tiny_lm(tied=False)
    ckpt_io.save_checkpoint(tmp_path, 1, model, None, _state(model))
    w1 = _params(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ckpt_io.save_checkpoint(tmp_path, 2, model, None, _state(model))
    w2 = _params(model)
    return tmp_path, model, w1, w2


# ----------------------------------------------------------------------------- item 1: safe loading


def test_state_file_is_plain_data_and_restores_every_rng(tmp_path):
    model = _tiny_lm(tied=False)
    state = _state(model)
    path = ckpt_io.save_checkpoint(tmp_path, 3, model, None, state)
    loaded = torch.load(path / "trainer_state.pt", weights_only=True)  # the point of item 1
    assert loaded["step"] == 3
    assert loaded["config"]["reward_clip"] == (-3.0, 5.0)
    # optimizer and LambdaLR states survive weights_only and load back into fresh objects
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.load_state_dict(loaded["optimizer"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    sched.load_state_dict(loaded["scheduler"])
    assert sched.last_epoch == 1
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(torch.as_tensor(v), torch.as_tensor(state["optimizer"]["state"][0][k])), k

    random.random(), np.random.normal(), torch.randn(1)  # make gauss caches non-trivial
    snap = ckpt_io.rng_state()
    want = (random.random(), random.gauss(0, 1), np.random.normal(), np.random.rand(3).tolist(),
            torch.randn(4))
    ckpt_io.set_rng_state(snap)
    got = (random.random(), random.gauss(0, 1), np.random.normal(), np.random.rand(3).tolist(),
           torch.randn(4))
    assert got[:4] == want[:4] and torch.equal(got[4], want[4])


class _Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_pickled_code_in_the_state_file_is_refused_not_run(two_ckpts, tmp_path_factory):
    out, model, w1, _ = two_ckpts
    marker = tmp_path_factory.mktemp("m") / "pwned"
    f = out / "checkpoint-2" / "trainer_state.pt"
    good = torch.load(f, weights_only=True)
    torch.save({**good, "evil": _Evil(marker)}, f)
    with pytest.raises(CheckpointError, match="checkpoint-2/trainer_state.pt.*refused"):
        ckpt_io.load_state(out / "checkpoint-2")
    assert not marker.exists()
    logs: list[str] = []
    path, state = ckpt_io.load_latest(out, model, logs.append)
    assert path.name == "checkpoint-1" and state["step"] == 1 and _same(model, w1)
    assert not marker.exists()
    assert any("checkpoint-2" in m and "refused" in m for m in logs), logs


def test_state_that_is_not_plain_data_is_refused_when_saving(tmp_path):
    model = _tiny_lm(tied=False)
    with pytest.raises(TypeError, match=r"state\['extra'\]\['f'\] is a function"):
        ckpt_io.save_checkpoint(tmp_path, 1, model, None, {"extra": {"f": lambda: 0}})
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temp dir


# ----------------------------------------------------------------------------- item 11: fallback


def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


CORRUPTIONS = {
    "truncated safetensors": (lambda c: _truncate(c / "model.safetensors"), "model.safetensors"),
    "missing safetensors": (lambda c: (c / "model.safetensors").unlink(), "no \\*.safetensors"),
    "garbage state": (lambda c: (c / "trainer_state.pt").write_bytes(b"\x00garbage" * 50),
                      "trainer_state.pt"),
    "truncated state": (lambda c: _truncate(c / "trainer_state.pt"), "trainer_state.pt"),
    "missing state": (lambda c: (c / "trainer_state.pt").unlink(), "trainer_state.pt: missing"),
    "no marker": (lambda c: (c / "COMPLETE").unlink(), "COMPLETE"),
}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_corrupt_newest_checkpoint_falls_back_to_the_older_one(two_ckpts, how):
    out, model, w1, w2 = two_ckpts
    corrupt, reason = CORRUPTIONS[how]
    corrupt(out / "checkpoint-2")
    logs: list[str] = []
    path, state = ckpt_io.load_latest(out, model, logs.append, required=("optimizer", "scheduler"))
    assert path == out / "checkpoint-1" and state["step"] == 1
    assert _same(model, w1)
    skipped = [m for m in logs if "skipping checkpoint checkpoint-2" in m]
    assert len(skipped) == 1, logs
    assert re.search(reason, skipped[0]), skipped[0]


def test_every_checkpoint_broken_is_an_error_naming_the_directory(two_ckpts):
    out, model, _, w2 = two_ckpts
    _truncate(out / "checkpoint-2" / "model.safetensors")
    (out / "checkpoint-1" / "trainer_state.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError) as ei:
        ckpt_io.load_latest(out, model, None)
    msg = str(ei.value)
    assert str(out) in msg and "checkpoint-2/model.safetensors" in msg
    assert "checkpoint-1/trainer_state.pt" in msg
    assert _same(model, w2)  # untouched


def test_no_checkpoint_at_all_is_none(tmp_path):
    assert ckpt_io.load_latest(tmp_path / "absent", _tiny_lm(False), None) is None
    assert ckpt_io.load_latest(tmp_path, _tiny_lm(False), None) is None


def test_state_missing_a_required_key_is_skipped(two_ckpts):
    out, model, w1, _ = two_ckpts
    f = out / "checkpoint-2" / "trainer_state.pt"
    st = torch.load(f, weights_only=True)
    del st["optimizer"]
    torch.save(st, f)
    logs: list[str] = []
    path, _ = ckpt_io.load_latest(out, model, logs.append, required=("optimizer",))
    assert path.name == "checkpoint-1" and _same(model, w1)
    assert any("lacks ['optimizer']" in m for m in logs), logs


# ----------------------------------------------------------------------------- item 12: temp dirs


def test_leftover_temp_dirs_are_removed_and_nothing_else(tmp_path, monkeypatch):
    model = _tiny_lm(tied=False)
    leaked = [tmp_path / ".checkpoint-3.tmp-0123abcd", tmp_path / ".checkpoint-10.tmp-ffffffff"]
    others = [tmp_path / ".checkpoint-3.tmp-notahex!", tmp_path / "checkpoint-notes",
              tmp_path / "sub" / ".checkpoint-1.tmp-0123abcd", tmp_path / ".checkpoint-4.tmp-0123abcd.txt"]
    for d in leaked + others[:3]:
        d.mkdir(parents=True)
        (d / "x").write_text("x")
    others[3].write_text("a file, not a temp dir")
    logs: list[str] = []
    ckpt_io.save_checkpoint(tmp_path, 1, model, None, {}, log=logs.append)
    assert not any(d.exists() for d in leaked)
    assert all(d.exists() for d in others)
    assert any("removed 2 unfinished checkpoint temp dir" in m for m in logs), logs
    # resuming cleans too, on rank 0 only (other ranks resume at the same time and only read)
    leaked[0].mkdir()
    monkeypatch.setattr(ckpt_io, "_rank", lambda: 1)
    ckpt_io.load_latest(tmp_path, model, logs.append)
    assert leaked[0].exists()
    monkeypatch.undo()
    ckpt_io.load_latest(tmp_path, model, logs.append)
    assert not leaked[0].exists()


# ----------------------------------------------------------------------------- item 13: strict weights


def test_untied_model_needs_lm_head_in_the_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _tiny_lm(tied=False)
    ckpt_io.save_checkpoint(tmp_path, 1, model, None, {})
    f = tmp_path / "checkpoint-1" / "model.safetensors"
    sd = load_file(f)
    assert "lm_head.weight" in sd
    del sd["lm_head.weight"]
    save_file(sd, f, metadata={"format": "pt"})
    other = _tiny_lm(tied=False, seed=1)
    before = _params(other)
    with pytest.raises(CheckpointError, match=r"missing \['lm_head.weight'\]"):
        ckpt_io.load_weights(other, tmp_path / "checkpoint-1")
    assert _same(other, before)  # not half-loaded


def test_tied_model_loads_without_a_separate_lm_head(tmp_path):
    from safetensors.torch import load_file

    model = _tiny_lm(tied=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ckpt_io.save_checkpoint(tmp_path, 1, model, None, {})
    assert "lm_head.weight" not in load_file(tmp_path / "checkpoint-1" / "model.safetensors")
    other = _tiny_lm(tied=True, seed=1)
    ckpt_io.load_weights(other, tmp_path / "checkpoint-1")
    assert _same(other, _params(model))
    assert torch.equal(other.lm_head.weight, model.model.embed_tokens.weight)


def test_config_says_tied_but_weights_are_not_is_still_an_error(tmp_path):
    # A tie that exists only in the config would keep the old head silently: check storage.
    src = _tiny_lm(tied=True)
    ckpt_io.save_checkpoint(tmp_path, 1, src, None, {})
    other = _tiny_lm(tied=True, seed=1)
    other.lm_head.weight = torch.nn.Parameter(other.lm_head.weight.detach().clone())
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        ckpt_io.load_weights(other, tmp_path / "checkpoint-1")


def test_wrong_shape_is_a_clear_error(tmp_path):
    ckpt_io.save_checkpoint(tmp_path, 1, _tiny_lm(tied=False), None, {})
    bigger = LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32,
                                          num_hidden_layers=1, num_attention_heads=2,
                                          num_key_value_heads=2, tie_word_embeddings=False))
    with pytest.raises(CheckpointError, match="wrong shape.*lm_head.weight"):
        ckpt_io.load_weights(bigger, tmp_path / "checkpoint-1")


# ----------------------------------------------------------------------------- item 10 + torn lines


def test_new_log_moves_a_previous_runs_log_aside(tmp_path):
    path = tmp_path / "metrics.jsonl"
    old = '{"step": 0, "eval/accuracy": 0.25}\n{"step": 1, "loss": 0.5}\n'
    path.write_text(old)
    logs: list[str] = []
    log = JsonlLog(path, resume_step=None, log=logs.append)
    log.write({"step": 0, "eval/accuracy": 0.5})
    kept = list(tmp_path.glob("metrics.jsonl.prev-*"))
    assert len(kept) == 1 and kept[0].read_text() == old
    assert read_jsonl(path) == [{"step": 0, "eval/accuracy": 0.5}]
    assert any(kept[0].name in m for m in logs), logs
    # a second new run keeps both earlier logs (no overwrite of the first .prev file)
    JsonlLog(path, resume_step=None, log=logs.append)
    assert len(list(tmp_path.glob("metrics.jsonl.prev-*"))) == 2


def test_empty_previous_log_is_not_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("")
    JsonlLog(path, resume_step=None)
    assert list(tmp_path.glob("*.prev-*")) == []


def test_torn_last_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    logs: list[str] = []
    log = JsonlLog(path, resume_step=2, log=logs.append)
    log.write({"step": 3, "loss": 0.3})
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
    assert any("torn last line 3" in m for m in logs), logs


def test_resume_drops_steps_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(5)))
    JsonlLog(path, resume_step=2)
    assert [r["step"] for r in read_jsonl(path)] == [0, 1, 2]


def test_malformed_line_in_the_middle_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    text = '{"step": 1}\nnot json\n{"step": 2}\n'
    path.write_text(text)
    with pytest.raises(ValueError, match="metrics.jsonl: line 2"):
        JsonlLog(path, resume_step=2)
    assert path.read_text() == text  # nothing rewritten


# ----------------------------------------------------------------------------- end to end (trainer)


def _trainer(prepared, out: Path, steps: int, logs: list):
    from pyopd.demo import make_prompt_source
    from pyopd.tasks.registry import get_task
    from pyopd.trainers.opd import OPDConfig, OPDTrainer

    cfg = OPDConfig(loss="fire", steps=steps, prompts_per_step=4, n=2, micro_batch=3, mini_batches=2,
                    max_new_tokens=8, save_every=1, keep_last=3, out_dir=str(out), lr=1e-3, seed=3)
    return OPDTrainer(cfg, prepared.load_student(), {"mixed": prepared.load_teacher("mixed")},
                      prepared.load_tokenizer(), make_prompt_source(get_task("mixed"), lambda e: "mixed"),
                      log=logs.append, progress=False)


def test_trainer_resumes_past_a_corrupt_checkpoint_and_a_torn_log(prepared, tmp_path):
    full = _trainer(prepared, tmp_path / "full", 3, [])
    full.train()
    out = tmp_path / "part"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 7, "from": "an older run"}\n')
    logs: list[str] = []
    _trainer(prepared, out, 2, logs).train(resume=False)
    assert any("moved it to metrics.jsonl.prev-" in m for m in logs), logs
    # a kill: checkpoint-2's weights torn, a half-written log line, a temp dir left behind
    _truncate(out / "checkpoint-2" / "model.safetensors")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    (out / ".checkpoint-3.tmp-deadbeef").mkdir()
    logs.clear()
    resumed = _trainer(prepared, out, 3, logs)
    resumed.train(resume=True)
    assert any("skipping checkpoint checkpoint-2" in m for m in logs), logs
    assert any("torn last line" in m for m in logs), logs
    assert not (out / ".checkpoint-3.tmp-deadbeef").exists()
    assert resumed.step == 3
    for (n, a), b in zip(full.student.named_parameters(), resumed.student.parameters()):
        assert torch.equal(a, b), n  # resumed from step 1 and still bit-exact
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]


def test_numpy_values_in_the_state_are_stored_as_plain_data(tmp_path):
    # np.float64 subclasses float but pickles as a numpy object a safe load refuses
    model = _tiny_lm(tied=False)
    hist = [{"step": np.int64(1), "loss": np.float64(0.25), "ok": np.bool_(True),
             "hist": np.arange(3, dtype=np.float32), "name": np.str_("fire")}]
    path = ckpt_io.save_checkpoint(tmp_path, 1, model, None, {"history": hist})
    got = ckpt_io.load_state(path)["history"][0]
    assert got["step"] == 1 and type(got["step"]) is int
    assert got["loss"] == 0.25 and type(got["loss"]) is float
    assert got["ok"] is True and got["name"] == "fire" and type(got["name"]) is str
    assert torch.equal(got["hist"], torch.arange(3, dtype=torch.float32))
