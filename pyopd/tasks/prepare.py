"""Prepare (train once, then cache on disk) the tokenizer, student and teachers.

``prepare_models()`` returns a :class:`Prepared` whose directories hold
``save_pretrained`` checkpoints (safetensors) plus the tokenizer.  An entry is
built in a temporary sibling directory, its ``manifest.json`` (sha256 and size
of every file) is written last, and the directory is ``os.replace``-d into
place, so readers see either nothing or a complete entry.  On load the
manifest is checked; a missing, partial or corrupt entry is logged and rebuilt.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Optional
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from pyopd._hf import no_progress_bars

from pyopd.tasks.models import ModelSpec, build_model, num_params, padded_vocab
from pyopd.tasks.recipe import evaluate, train_sft
from pyopd.tasks.base import Task
from pyopd.tasks.registry import get_task
from pyopd.tasks.tokenizer import VOCAB, VOCAB_SIZE, build_tokenizer

RECIPE_VERSION = 1  # bump whenever training code changes what a recipe produces
MANIFEST = "manifest.json"
TEACHER_VOCAB = padded_vocab(VOCAB_SIZE)  # 112 > 100: teachers have ids the tokenizer never makes

Log = Callable[[str], None]


@dataclass(frozen=True)
class ModelRecipe:
    """How one model is made: shape, SFT task (registry name + arguments) and length."""

    name: str  # "student" or a teacher name
    task: str
    spec: ModelSpec
    steps: int
    batch_size: int = 64
    lr: float = 1e-3
    task_args: tuple[tuple[str, object], ...] = ()
    init_from: Optional[str] = None  # start from this (earlier) model's trained weights: "trained further"

    def make_task(self) -> Task:
        return get_task(self.task, **dict(self.task_args))


@dataclass(frozen=True)
class Scale:
    """A full preparation recipe: the models and the eval-set size used to report accuracy."""

    models: tuple[ModelRecipe, ...]
    eval_n: int = 256
    eval_tasks: tuple[str, ...] = ("arith", "strings")  # reported accuracies (held out of SFT)
    dev_n: int = 0  # a dev split (seed DEV_SEED, disjoint from the eval split), also held out of SFT

    def __post_init__(self) -> None:
        seen: dict[str, ModelRecipe] = {}
        for m in self.models:
            if m.init_from is not None:
                base = seen.get(m.init_from)
                if base is None:
                    raise ValueError(f"{m.name}: init_from={m.init_from!r} must name a model listed before it")
                if base.spec != m.spec:
                    raise ValueError(f"{m.name}: init_from={m.init_from!r} needs the same ModelSpec")
            seen[m.name] = m


def _scales() -> dict[str, Scale]:
    student = ModelSpec(hidden_size=128, num_layers=2, num_heads=4)  # vocab = tokenizer size (100)
    specialist = ModelSpec(hidden_size=128, num_layers=2, num_heads=4, vocab_size=TEACHER_VOCAB)
    big = ModelSpec(hidden_size=192, num_layers=3, num_heads=6, vocab_size=TEACHER_VOCAB)
    tiny_s = ModelSpec(hidden_size=32, num_layers=1, num_heads=2, max_positions=128)
    tiny_t = ModelSpec(hidden_size=48, num_layers=1, num_heads=2, max_positions=128, vocab_size=TEACHER_VOCAB)
    return {
        # A 0.34M-param student trained briefly (500 steps); teachers for the three FiRe-OPD
        # settings: "same" continues the student's SFT for 1000 more steps (single teacher),
        # "mixed" is a 1.1M-param generalist (strong-to-weak), "arith"/"strings" are specialists
        # of the student's shape (multi-teacher).  The mixed-task models see arithmetic twice as
        # often.  eval_n / dev_n: the demo's eval and dev splits, both held out of every SFT.
        "demo": Scale(
            models=(
                ModelRecipe("student", "mixed", student, steps=500, task_args=(("weights", (2.0, 1.0)),)),
                ModelRecipe("same", "mixed", student, steps=1000, lr=5e-4, task_args=(("weights", (2.0, 1.0)),),
                            init_from="student"),
                ModelRecipe("arith", "arith", specialist, steps=600),
                ModelRecipe("strings", "strings", specialist, steps=600),
                ModelRecipe("mixed", "mixed", big, steps=1000, task_args=(("weights", (2.0, 1.0)),)),
            ),
            eval_n=1024,
            dev_n=512,
        ),
        # Seconds, for tests: the models are untrained and their accuracy is meaningless.
        "tiny": Scale(
            models=(
                ModelRecipe("student", "mixed", tiny_s, steps=2, batch_size=8),
                ModelRecipe("same", "mixed", tiny_s, steps=2, batch_size=8, init_from="student"),
                ModelRecipe("arith", "arith", tiny_t, steps=2, batch_size=8),
                ModelRecipe("strings", "strings", tiny_t, steps=2, batch_size=8),
                ModelRecipe("mixed", "mixed", tiny_t, steps=2, batch_size=8),
            ),
            eval_n=8,
            dev_n=8,
        ),
        # COPSD: one rule-following base model (it is the initial student, and with the
        # constitution in context the OPSD teacher). Its accuracy on the bare-prompt safety
        # task is low by design: without a rule it complies with every request. Its data
        # over-applies rules (`pyopd.tasks.rules`); 1500 steps so that it learns which
        # words derive from a rule's verbs (at 800 it over-refused only a quarter of them).
        "safety": Scale(
            models=(ModelRecipe("student", "rules", ModelSpec(hidden_size=128, num_layers=2, num_heads=4,
                                                              max_positions=320), steps=1500, batch_size=32),),
            eval_n=128,
            eval_tasks=("safety", "rules"),
        ),
        "safety-tiny": Scale(
            models=(ModelRecipe("student", "rules", ModelSpec(hidden_size=32, num_layers=1, num_heads=2,
                                                              max_positions=320), steps=2, batch_size=8),),
            eval_n=8,
            eval_tasks=("safety",),
        ),
    }


SCALES: dict[str, Scale] = _scales()


def default_cache_dir() -> Path:
    """``$PYOPD_CACHE_DIR``, else ``$XDG_CACHE_HOME/pyopd``, else ``~/.cache/pyopd``."""
    if os.environ.get("PYOPD_CACHE_DIR"):
        return Path(os.environ["PYOPD_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "pyopd"


def _selected(scale: str, models: Optional[Sequence[str]]) -> tuple:
    """The recipes of ``scale`` named in ``models`` (None: all); the student always."""
    every = SCALES[scale].models
    if models is None:
        return every
    unknown = sorted(set(models) - {m.name for m in every})
    if unknown:
        raise KeyError(f"scale {scale!r} has no models {unknown}; it has {[m.name for m in every]}")
    wanted = {"student", *models}
    for m in reversed(every):  # a model trained further from another needs that one too
        if m.name in wanted and m.init_from is not None:
            wanted.add(m.init_from)
    return tuple(m for m in every if m.name in wanted)


def recipe_key(scale: str, seed: int, models: Optional[Sequence[str]] = None) -> str:
    """sha256 of everything that determines the prepared models (of the subset ``models``)."""
    chosen = _selected(scale, models)
    recipe = {
        "version": RECIPE_VERSION,
        "scale": scale,
        "seed": seed,
        # (init_from only when set: the keys of recipes without it are unchanged)
        "models": [{k: v for k, v in asdict(m).items() if not (k == "init_from" and v is None)}
                   for m in chosen],
        "eval_n": SCALES[scale].eval_n,
        "eval_tasks": list(SCALES[scale].eval_tasks),
        "tasks": {m.name: m.make_task().config() for m in chosen},
        "vocab": sorted(VOCAB.items(), key=lambda kv: kv[1]),
    }
    if SCALES[scale].dev_n:
        recipe["dev_n"] = SCALES[scale].dev_n
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=list).encode()).hexdigest()


@dataclass(frozen=True)
class Prepared:
    """A cache entry: where the checkpoints are, how they scored, and loaders."""

    root: Path
    scale: str
    seed: int
    built: bool  # True when this call trained the models, False when it loaded them
    student_dir: Path
    teacher_dirs: dict[str, Path]
    tokenizer_dir: Path
    metrics: dict[str, dict] = field(default_factory=dict)

    def describe(self) -> str:
        """One line per model: parameters, vocabulary size and greedy accuracy per family."""
        lines = []
        for name, m in self.metrics.items():
            acc = ", ".join(f"{k} {v:.1%}" for k, v in m.get("accuracy", {}).items())
            lines.append(f"{name:>8}: {m.get('params', 0) / 1e6:.2f}M params, vocab {m.get('vocab_size')}, {acc}")
        return "\n".join(lines)

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """The shared character tokenizer (left padding)."""
        return AutoTokenizer.from_pretrained(self.tokenizer_dir)

    def load_model(self, name: str = "student", dtype: torch.dtype = torch.float32) -> PreTrainedModel:
        """``"student"`` or a teacher name (``arith``, ``strings``, ``mixed``), in eval mode."""
        path = self.student_dir if name == "student" else self.teacher_dirs.get(name)
        if path is None:
            raise KeyError(f"unknown model {name!r}; have 'student' and teachers {sorted(self.teacher_dirs)}")
        with no_progress_bars():
            return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

    def load_student(self, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
        """The weak student."""
        return self.load_model("student", dtype)

    def load_teacher(self, name: str = "mixed", dtype: torch.dtype = torch.float32) -> PreTrainedModel:
        """A teacher: ``same`` (the student's SFT continued), ``mixed`` (bigger, both families) or a
        specialist ``arith`` / ``strings`` (the scale decides which exist)."""
        return self.load_model(name, dtype)


def prepare_models(
    scale: str = "demo",
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    rebuild: bool = False,
    log: Log | None = print,
    num_threads: int | None = None,
    models: Optional[Sequence[str]] = None,
    progress: bool = False,
) -> Prepared:
    """Return the cached student/teachers for (``scale``, ``seed``), training them first if needed.

    A valid entry loads at once; a missing, partial or corrupt one is rebuilt
    (``rebuild=True`` forces it).  Safe to call from several processes at once.
    ``num_threads`` sets torch's intra-op threads while building (restored
    after); on a busy machine 1 thread can be much faster than oversubscribing.
    ``models``: prepare only these teachers (and the student), e.g. ``("mixed",)``
    for the single-teacher demo: a model training never done that a run does not use.
    Each model's training depends only on (scale, seed, its recipe), so a model
    is the same whichever subset it was prepared with.  ``progress``: a progress bar
    over the training steps of the models being built (instead of log lines).
    """
    if scale not in SCALES:
        raise KeyError(f"unknown scale {scale!r}; known: {sorted(SCALES)}")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # Under torchrun rank 0 builds (or verifies) the entry while the others wait,
        # then they load it: two ranks building one entry at once replaced it under a
        # rank that was already loading from it.
        if dist.get_rank() != 0:
            dist.barrier()
        try:
            return _prepare_models(scale, cache_dir, seed, rebuild and dist.get_rank() == 0, log,
                                   num_threads, models, progress)
        finally:
            if dist.get_rank() == 0:
                dist.barrier()
    return _prepare_models(scale, cache_dir, seed, rebuild, log, num_threads, models, progress)


def _prepare_models(scale, cache_dir, seed, rebuild, log, num_threads, models, progress) -> Prepared:
    say: Log = log or (lambda _msg: None)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    key = recipe_key(scale, seed, models)
    final = root / f"tasks-{scale}-seed{seed}-{key[:16]}"
    with _lock(root / f".{final.name}.lock"):
        reason = "rebuild requested" if rebuild else verify_entry(final, key)
        if reason is None:
            say(f"[pyopd.tasks] using cached models in {final}")
            return _prepared(final, scale, seed, built=False)
        say(f"[pyopd.tasks] cache entry {final}: {reason}; building")
        _remove_stale_tmp(root, final.name)
        tmp = root / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        threads = torch.get_num_threads()
        try:
            if num_threads is not None:
                torch.set_num_threads(num_threads)
            _build(tmp, scale, seed, key, say, _selected(scale, models), progress=progress)
            _install(tmp, final, key, replace_valid=rebuild)
        finally:
            torch.set_num_threads(threads)
            _rmtree(tmp)
    return _prepared(final, scale, seed, built=True)


# ---------------------------------------------------------------- building


def held_out_prompts(scale: str) -> list[str]:
    """Prompts no model of ``scale`` is trained on: each eval family's eval split and dev split."""
    sc = SCALES[scale]
    out: list[str] = []
    for name in sc.eval_tasks:
        task = get_task(name)
        ev = [e.prompt for e in task.eval_set(sc.eval_n // len(sc.eval_tasks))]
        out += ev
        if sc.dev_n:
            out += [e.prompt for e in task.dev_set(sc.dev_n // len(sc.eval_tasks), exclude=ev)]
    return out


def _build(out: Path, scale: str, seed: int, key: str, say: Log, recipes: Optional[tuple] = None,
           progress: bool = False) -> None:
    """Train the models of ``scale`` (``recipes``: a subset) and write the entry (manifest last) into ``out``."""
    recipes = SCALES[scale].models if recipes is None else recipes
    t_start = time.perf_counter()
    out.mkdir(parents=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(out / "tokenizer")
    families = {name: get_task(name) for name in SCALES[scale].eval_tasks}
    evals = {name: task.eval_set(SCALES[scale].eval_n // len(families)) for name, task in families.items()}
    held_out = held_out_prompts(scale)
    metrics: dict[str, dict] = {}
    trained: dict[str, PreTrainedModel] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(r.steps for r in recipes), desc="preparing models", unit="step",
                   dynamic_ncols=True, leave=True)
    for recipe in recipes:
        t0 = time.perf_counter()
        model_seed = zlib.crc32(f"{seed}/{recipe.name}".encode())
        model = build_model(recipe.spec, tokenizer, seed=model_seed)
        start = ""
        if recipe.init_from is not None:
            model.load_state_dict(trained[recipe.init_from].state_dict())
            start = f", from the trained {recipe.init_from}"
        say(f"[pyopd.tasks] training {recipe.name} ({num_params(model) / 1e6:.2f}M params, "
            f"vocab {model.config.vocab_size}{start}) on {recipe.task} for {recipe.steps} steps")
        if bar is not None:
            bar.set_postfix_str(recipe.name)
        losses = train_sft(
            model, tokenizer, recipe.make_task(), recipe.steps, batch_size=recipe.batch_size,
            lr=recipe.lr, seed=model_seed, exclude=held_out, log=None if bar is not None else say,
            log_every=max(1, recipe.steps // 4), tick=None if bar is None else (lambda: bar.update(1)),
        )
        train_s = time.perf_counter() - t0
        acc = {name: evaluate(model, tokenizer, families[name], evals[name]) for name in families}
        metrics[recipe.name] = {
            "accuracy": acc, "params": num_params(model), "vocab_size": model.config.vocab_size,
            "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
            "train_s": round(train_s, 2), "eval_s": round(time.perf_counter() - t0 - train_s, 2),
        }
        line = (f"[pyopd.tasks]   {recipe.name}: greedy accuracy "
                + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()) + f" ({train_s:.1f}s)")
        if bar is not None:
            bar.write(line)
        else:
            say(line)
        model_dir = out / _model_dirname(recipe.name)
        with no_progress_bars():
            model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        trained[recipe.name] = model
    if bar is not None:
        bar.close()
    files = {str(p.relative_to(out).as_posix()): _file_info(p) for p in sorted(out.rglob("*")) if p.is_file()}
    manifest = {
        "version": RECIPE_VERSION, "key": key, "scale": scale, "seed": seed,
        "models": [r.name for r in recipes], "metrics": metrics,
        "build_s": round(time.perf_counter() - t_start, 2), "torch": torch.__version__,
        "transformers": transformers.__version__, "files": files,
    }
    with open(out / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    say(f"[pyopd.tasks] built all models in {manifest['build_s']:.1f}s")


def _model_dirname(name: str) -> str:
    return "student" if name == "student" else f"teacher-{name}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_info(path: Path) -> dict:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _install(tmp: Path, final: Path, key: str, replace_valid: bool) -> None:
    """Move ``tmp`` to ``final``; an invalid (or, if asked, any) existing entry is discarded first."""
    for _ in range(3):
        try:
            os.replace(tmp, final)
            return
        except OSError:
            if not final.exists() and not final.is_symlink():
                raise
        if not replace_valid and verify_entry(final, key) is None:
            return  # another process installed a good entry first; keep it
        _discard(final)
        replace_valid = False
    raise OSError(f"could not install {tmp} as {final}")


# ---------------------------------------------------------------- loading


def verify_entry(path: Path, key: str | None = None) -> str | None:
    """``None`` when ``path`` is a complete, intact cache entry, else the reason it is not."""
    if not path.is_dir():
        return "missing"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return "no manifest (partial entry)"
    except (OSError, ValueError) as e:
        return f"unreadable manifest ({e.__class__.__name__})"
    if not isinstance(manifest, dict) or manifest.get("version") != RECIPE_VERSION:
        return "manifest from another recipe version"
    if key is not None and manifest.get("key") != key:
        return "manifest key does not match the recipe"
    files = manifest.get("files")
    names = manifest.get("models")
    if not isinstance(files, dict) or not isinstance(names, list) or "student" not in names:
        return "malformed manifest"
    needed = ["tokenizer/tokenizer.json"] + [f"{_model_dirname(n)}/model.safetensors" for n in names]
    if any(n not in files for n in needed):
        return "manifest does not list every model"
    root = path.resolve()
    for rel, info in files.items():
        f = (path / rel).resolve()
        if root not in f.parents:
            return f"manifest entry {rel!r} points outside the entry"
        if not f.is_file():
            return f"missing file {rel}"
        try:
            size, digest = int(info["size"]), str(info["sha256"])
        except (KeyError, TypeError, ValueError):
            return "malformed manifest"
        if f.stat().st_size != size:
            return f"size mismatch for {rel} (truncated?)"
        if _sha256(f) != digest:
            return f"checksum mismatch for {rel}"
    return None


def _prepared(path: Path, scale: str, seed: int, built: bool) -> Prepared:
    manifest = json.loads((path / MANIFEST).read_text())
    return Prepared(
        root=path, scale=scale, seed=seed, built=built,
        student_dir=path / "student",
        teacher_dirs={n: path / _model_dirname(n) for n in manifest["models"] if n != "student"},
        tokenizer_dir=path / "tokenizer",
        metrics={n: manifest["metrics"][n] for n in manifest["models"] if n in manifest.get("metrics", {})},
    )


# ---------------------------------------------------------------- filesystem helpers


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX ``flock``) so concurrent callers build once.

    Correctness does not depend on it (installs are atomic renames); where
    ``fcntl`` is unavailable it is a no-op.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _discard(path: Path) -> None:
    """Atomically move ``path`` aside, then delete it (tolerates concurrent removal)."""
    trash = path.parent / f".{path.name}.bad-{uuid.uuid4().hex[:8]}"
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return
    _rmtree(trash)


def _rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _remove_stale_tmp(root: Path, name: str, max_age_s: float = 3600.0) -> None:
    """Delete temporary/bad siblings of ``name`` left by crashed builds (older than ``max_age_s``)."""
    now = time.time()
    for p in root.glob(f".{name}.*-*"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > max_age_s:
                _rmtree(p)
