"""Atomic checkpoints that are safe to load, and exact resume.

A checkpoint is a directory ``checkpoint-<step>`` holding the model
(``save_pretrained``, safetensors), ``trainer_state.pt`` (optimizer,
scheduler, RNG states, step) and, written last, ``COMPLETE``. It is built in
a hidden temporary sibling ``.checkpoint-<step>.tmp-<hex>`` and renamed into
place, so a run killed at any moment leaves either the previous checkpoints or
the new one, never a half-written directory that looks valid. Older
checkpoints are pruned only after the new one is in place; temporary
directories left by a kill are removed at the next save or resume.

A checkpoint directory is data a user may download or share, so nothing in it
may run code when loaded: ``trainer_state.pt`` holds only plain data (tensors,
numbers, strings, None, lists, tuples, dicts; the python/numpy RNG states are
converted to lists and tensors) and is read with ``torch.load(weights_only=True)``.
A state file that needs anything else (a pickled object) is refused.

`load_latest` resumes from the newest checkpoint that loads completely
(weights AND state) and names every newer checkpoint it had to skip and why.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

_NAME = re.compile(r"^checkpoint-(\d+)$")
# What save_checkpoint builds before the atomic rename; anything else is never touched.
_TEMP = re.compile(r"^\.checkpoint-\d+\.tmp-[0-9a-f]{8}$")
MARKER = "COMPLETE"
STATE = "trainer_state.pt"

Log = Optional[Callable[[str], None]]


class CheckpointError(RuntimeError):
    """A checkpoint (or a directory of them) that cannot be loaded; the message names the file."""


# ----------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """The python, numpy and torch (CPU) RNG states as plain lists/tensors (weights_only-safe)."""
    version, internal, gauss = random.getstate()
    algo, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": [int(version), list(internal), gauss],
        "numpy": {"algo": str(algo), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states written by `rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    npst = state["numpy"]
    np.random.set_state((npst["algo"], npst["keys"].numpy().astype(np.uint32), int(npst["pos"]),
                         int(npst["has_gauss"]), float(npst["cached_gaussian"])))
    torch.set_rng_state(state["torch"])


# ----------------------------------------------------------------------------- writing

_SCALARS = (str, int, float, bool, type(None))


def to_plain(obj: Any, where: str = "state") -> Any:
    """A copy of ``obj`` that ``torch.load(weights_only=True)`` accepts, or TypeError naming the value.

    numpy scalars/arrays (e.g. metrics from a user callback) become python
    numbers/tensors and subclasses of the plain types their base type: a
    ``numpy.float64`` IS a float, yet pickles as a numpy object that a safe
    load refuses, so a plain isinstance check would let an unloadable
    checkpoint through. Checked when saving, not when someone tries to resume.
    """
    if type(obj) in _SCALARS or isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            key = to_plain(k, f"{where} key") if isinstance(k, (str, int, np.integer)) else None
            if key is None or type(key) not in (str, int):
                raise TypeError(f"checkpoint {where}[{k!r}]: key is a {type(k).__name__}; "
                                f"only str/int keys are stored")
            out[key] = to_plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        item = obj.item()
        if type(item) in _SCALARS:
            return item
    for base in (bool, int, float, str):  # subclasses of the plain types
        if isinstance(obj, base):
            return base(obj)
    raise TypeError(f"checkpoint {where} is a {type(obj).__name__}; only tensors, numbers, "
                    f"strings, None, lists, tuples and dicts are stored (weights_only-safe)")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_temp(out_dir: Path, log: Log = None) -> list[Path]:
    """Remove ``.checkpoint-<step>.tmp-<hex>`` directories a killed save left in ``out_dir``.

    Only direct children matching that exact pattern are removed. Returns them.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    gone = [p for p in out_dir.iterdir() if _TEMP.match(p.name) and p.is_dir() and not p.is_symlink()]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    if gone and log is not None:
        log(f"[pyopd] removed {len(gone)} unfinished checkpoint temp dir(s) in {out_dir}: "
            f"{', '.join(sorted(p.name for p in gone))}")
    return gone


def save_checkpoint(out_dir: Path, step: int, model, tokenizer, state: dict[str, Any],
                    keep_last: int = 2, log: Log = None,
                    weights: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """Write ``out_dir/checkpoint-<step>`` atomically; keep the ``keep_last`` newest.

    ``weights``: the full state dict to write instead of ``model``'s own (a
    sharded model's, gathered by `pyopd.trainers.sharding.full_model_state`).

    ``state`` must be plain data (see `to_plain`; numpy values are converted,
    anything else is a TypeError before anything is written); ``step`` and the
    RNG states are added here.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    full = to_plain({**state, "step": int(step), "rng": rng_state()})
    clean_temp(out_dir, log)  # leftovers of an earlier kill
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".checkpoint-{step}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        if weights is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(full, tmp / STATE)
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        (tmp / MARKER).write_text(f"{step}\n")  # last: its presence means everything above is on disk
        with open(tmp / MARKER, "rb") as fh:
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # same step saved before (a resumed run): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- reading


def _candidates(out_dir: Path) -> list[Path]:
    """Every ``checkpoint-<step>`` directory, oldest first (complete or not)."""
    if not out_dir.is_dir():
        return []
    found = []
    for p in out_dir.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (directories without the marker are ignored)."""
    return [p for p in _candidates(Path(out_dir))
            if (p / MARKER).is_file() and (p / STATE).is_file()]


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def load_state(ckpt: Path) -> dict[str, Any]:
    """``trainer_state.pt`` of ``ckpt``, read with ``weights_only=True`` (never runs pickled code).

    Raises CheckpointError naming the file when it is missing, unreadable, or
    needs anything but plain data.
    """
    f = Path(ckpt) / STATE
    if not f.is_file():
        raise CheckpointError(f"{f}: missing")
    try:
        state = torch.load(f, weights_only=True, map_location="cpu")
    except Exception as e:  # UnpicklingError, truncated zip, EOF ...: all mean "do not trust it"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{f}: refused to load: not a plain-data trainer state readable with "
            f"torch.load(weights_only=True) ({type(e).__name__}: {first})") from e
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "rng" not in state:
        raise CheckpointError(f"{f}: not a pyopd trainer state (needs a dict with 'step' and 'rng')")
    return state


def read_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint's ``*.safetensors`` files (CheckpointError names a bad file)."""
    from safetensors.torch import load_file

    files = sorted(Path(ckpt).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{ckpt}: no *.safetensors weights")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(f))
        except Exception as e:  # truncated header or data
            raise CheckpointError(f"{f}: unreadable safetensors ({type(e).__name__}: {e})") from e
    return sd


def _tied_to_loaded(model, missing: Sequence[str], loaded: set[str]) -> set[str]:
    """The missing names whose tensor IS (same storage) a tensor the checkpoint provides."""
    tensors = model.state_dict(keep_vars=True)
    ptr_loaded = {tensors[k].data_ptr() for k in loaded if k in tensors}
    return {k for k in missing if k in tensors and tensors[k].data_ptr() in ptr_loaded}


def load_weights(model, ckpt: Path, sd: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Load the checkpoint's safetensors weights into ``model`` in place (strict).

    Every parameter and buffer of the model's state dict must come from the
    checkpoint. The one exception is a weight that is actually tied in this
    model (it shares storage with one the checkpoint provides, e.g. ``lm_head``
    tied to the input embeddings): ``save_pretrained`` stores it once. The
    model is changed only after every check has passed.
    """
    sd = read_weights(ckpt) if sd is None else sd
    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in sd]
    unexpected = sorted(k for k in sd if k not in expected)
    missing = [k for k in missing if k not in _tied_to_loaded(model, missing, set(sd))]
    bad_shape = [f"{k}: {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}"
                 for k in sd if k in expected and sd[k].shape != expected[k].shape]
    if missing or unexpected or bad_shape:
        raise CheckpointError(f"{ckpt}: does not match the model: missing {missing}, "
                              f"unexpected {unexpected}, wrong shape {bad_shape}")
    from pyopd.trainers import sharding

    if sharding.is_sharded(model):  # each rank keeps its shard of the full tensors
        sharding.load_full_model_state(model, sd)
    else:
        model.load_state_dict(sd, strict=False)


def _rank() -> int:
    """This process's torch.distributed rank (0 when not distributed)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def load_latest(out_dir: Path, model, log: Log = None,
                required: Sequence[str] = ()) -> Optional[tuple[Path, dict[str, Any]]]:
    """Load the newest checkpoint in ``out_dir`` that loads completely; return (path, state).

    Newer checkpoints that fail (no COMPLETE marker, missing/truncated
    safetensors, weights that do not match ``model``, a state file that is not
    plain data or lacks a ``required`` key, a step that disagrees with the
    directory name) are skipped with a log line naming them and why. ``model``
    receives the weights of the returned checkpoint only. Returns None when
    ``out_dir`` has no ``checkpoint-<step>`` directory at all; raises
    CheckpointError naming the directory and every reason when there are some
    but none loads, so a run never silently starts from scratch over them.
    Stale temporary directories of killed saves are removed first (by rank 0
    alone when torch.distributed is initialised).
    """
    out_dir = Path(out_dir)
    if _rank() == 0:  # every rank resumes, one cleans (the others only read)
        clean_temp(out_dir, log)
    cands = _candidates(out_dir)
    if not cands:
        return None
    reasons: list[str] = []
    for path in reversed(cands):
        try:
            if not (path / MARKER).is_file():
                raise CheckpointError(f"{path}: no {MARKER} marker (the save did not finish)")
            state = load_state(path)
            lost = [k for k in required if k not in state]
            if lost:
                raise CheckpointError(f"{path / STATE}: lacks {lost}")
            step = int(_NAME.match(path.name).group(1))
            if state["step"] != step:
                raise CheckpointError(f"{path / STATE}: records step {state['step']}, "
                                      f"directory says {step}")
            load_weights(model, path, read_weights(path))
        except CheckpointError as e:
            reasons.append(str(e))
            if log is not None:
                log(f"[pyopd] skipping checkpoint {path.name}: {e}")
            continue
        if reasons and log is not None:
            log(f"[pyopd] resuming from {path.name}, the newest checkpoint that loads "
                f"({len(reasons)} newer one(s) skipped)")
        return path, state
    raise CheckpointError(f"no checkpoint in {out_dir} can be loaded; refusing to start over them:\n  "
                          + "\n  ".join(reasons))
