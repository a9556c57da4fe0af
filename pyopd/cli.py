"""The `pyopd` command: FiRe-OPD and COPSD runs, on the built-in demo task or on real models.

    pyopd fire-opd                 # demo: built-in task, OPD vs FiRe-OPD vs the exact reverse KL (CPU)
    pyopd fire-opd --student DIR --teacher DIR [--teacher2 DIR] --prompts FILE.jsonl
    pyopd copsd                    # demo: built-in safety task, OPSD vs COPSD vs SFT
    pyopd copsd --student DIR --prompts FILE.jsonl --frontier-answers FILE.jsonl
    pyopd info                     # what the extension was built with

Every option is defined once, in `pyopd.config.OPDConfig`; a command or the demo
may change a default (help shows both), and a flag you give always wins. Bad
input (an option outside its range, a missing directory or file, a file that
is not UTF-8, a JSONL line without a prompt, vocabularies that do not match)
is reported in one line and exits with status 2 before anything is written.
Help returns without importing torch.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Optional, Sequence

from pyopd import config as C

EXIT_USAGE = 2
EXIT_DIVERGED = 3


class UsageError(Exception):
    """Bad user input: printed without a traceback, exit status 2."""


# ---------------------------------------------------------------------------- arguments


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _fmt(v: Any) -> str:
    if v is None:
        return "off"
    if isinstance(v, (tuple, list)):
        return " ".join(_fmt(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def _help_for(f, command: str) -> str:
    meta = f.metadata
    real, demo = C.default_for(f.name, command, False), C.default_for(f.name, command, True)
    text = meta["help"]
    if f.name == "loss":
        text += f"; one of: {', '.join(C.objective_catalog())}; the demo compares --losses instead"
    if f.name == "max_new_tokens":
        demo = "from the task"
    allowed = ""
    if meta.get("choices") is None and (meta.get("lo") is not None or meta.get("hi") is not None):
        allowed = f"; allowed {C.describe_range(meta)}"
    dflt = f"default {_fmt(real)}" + (f", demo {_fmt(demo)}" if demo != real else "")
    return f"{text} ({dflt}{allowed})".replace("%", "%%")


def _add_config_args(p: argparse.ArgumentParser, command: str, groups: Optional[dict] = None) -> dict:
    """One flag per config field the command uses; unset flags stay out of the namespace.
    ``groups``: argument groups that already exist (by name), so their fields join them."""
    groups = dict(groups or {})
    for f in fields(C.OPDConfig):
        meta = f.metadata
        if not meta.get("flag", True) or command not in meta["commands"]:
            continue
        g = groups.setdefault(meta["group"], p.add_argument_group(meta["group"]))
        default = f.default if f.default is not MISSING else f.default_factory()
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=_help_for(f, command))
        if meta.get("choices") is not None:
            kw["choices"] = meta["choices"]
        elif meta.get("nargs"):
            kw.update(type=float, nargs=meta["nargs"], metavar=("LOW", "HIGH"))
        elif isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, int) and not isinstance(default, bool):
            kw["type"] = int
        elif isinstance(default, float) or default is None:
            kw["type"] = float
        g.add_argument(*_flags(f.name), **kw)
    return groups


# Flags with another (first) spelling: torchrun's parser takes `--n` for a prefix of its own options.
_ALIASES = {"n": ("--samples-per-prompt", "--n")}


def _flags(name: str) -> tuple[str, ...]:
    return _ALIASES.get(name, (_flag(name),))


def _add_run_args(p: argparse.ArgumentParser, groups: dict) -> None:
    g = groups.get("run") or p.add_argument_group("run")
    g.add_argument("--out", default=None,
                   help="output directory (default runs/<command> for real models, "
                        "runs/<command>-demo for the demo)")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    g.add_argument("--overwrite", action="store_true",
                   help="delete an existing --out and start over (otherwise an existing run is refused)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--device", default="auto",
                   help="real models: 'cpu', 'cuda', 'cuda:N' or 'auto' (CUDA when available; under torchrun "
                        "each process takes cuda:LOCAL_RANK) (default %(default)s); the demo runs on the CPU")
    g.add_argument("--cache-dir", default=None,
                   help="demo: where the built-in models are cached (default $PYOPD_CACHE_DIR or "
                        "~/.cache/pyopd)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyopd", description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:3]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{fire-opd,copsd,info}")
    p = sub.add_parser("fire-opd", help="FiRe-OPD: the demo, or a run with real models",
                       description="FiRe-OPD (filter, then reweight). Without --student/--teacher: "
                                   "the built-in demo compares several objectives from one start.")
    g = p.add_argument_group("models and data")
    g.add_argument("--student", help="student model directory (save_pretrained)")
    g.add_argument("--teacher", help="teacher model directory")
    g.add_argument("--teacher2", help="second teacher (multi-teacher: prompts name their teacher)")
    g.add_argument("--prompts", help="JSONL file: {\"prompt\": ..., \"teacher\"?: \"teacher2\"} per line")
    g = p.add_argument_group("demo")
    g.add_argument("--scale", default="demo", choices=("tiny", "demo"),
                   help="size of the built-in task models (default %(default)s)")
    g.add_argument("--multi-teacher", action="store_true",
                   help="the same as --setting multi")
    g.add_argument("--losses", default="opd,fire,rkl,fire-rkl",
                   help="objectives to compare, each from the same start (default %(default)s)")
    _add_run_args(p, _add_config_args(p, "fire-opd", {"demo": g}))

    p = sub.add_parser("copsd", help="COPSD: the demo, or a run with real models",
                       description="COPSD: Cross-SFT cold start of the teacher, then on-policy distillation "
                                   "from the constitution-conditioned teacher. Without --student: the "
                                   "built-in safety demo (OPSD vs COPSD vs SFT).")
    g = p.add_argument_group("models and data")
    g.add_argument("--student", help="student model directory (save_pretrained)")
    g.add_argument("--teacher", help="model the teacher is made from (default: the student)")
    g.add_argument("--constitution", help="template file with a {user_query} slot (default: the shipped one)")
    g.add_argument("--prompts", help="JSONL: {\"prompt\": ..., \"category\": benign|over_refusal|unsafe}")
    g.add_argument("--frontier-answers", help="JSONL: {\"prompt\": ..., \"answer\": ...} for the unsafe prompts")
    g = p.add_argument_group("COPSD")
    g.add_argument("--objective", choices=("sampled", "full"), default="sampled",
                   help="sampled-token COPSD loss or the analytic full-vocabulary reverse KL "
                        "(default %(default)s)")
    g.add_argument("--baseline", choices=("copsd", "opsd", "sft"), default="copsd",
                   help="opsd: skip Cross-SFT (the teacher is the initial model with the constitution); "
                        "sft: fine-tune the student on the Cross-SFT teacher's answers instead of OPD "
                        "(default %(default)s)")
    g.add_argument("--cross-sft-epochs", type=int, default=3,
                   help="Cross-SFT epochs of the teacher (default %(default)s, chosen on the built-in "
                        "task's dev split; the paper's best was 2; allowed >= 1)")
    g.add_argument("--scale", default="safety", choices=("safety",),
                   help="demo: the built-in safety model (default %(default)s)")
    _add_run_args(p, _add_config_args(p, "copsd"))
    sub.add_parser("info", help="print what the extension was built with")
    return parser


# ---------------------------------------------------------------------------- input checks


def _config(command: str, args, demo: bool, **fixed) -> "C.OPDConfig":
    """Presets, then the user's flags (they always win), then ``fixed`` (set by the command itself).

    The demo preset's response budget comes from its task (the longest answer).
    """
    names = {f.name for f in fields(C.OPDConfig)}
    user = {k: v for k, v in vars(args).items() if k in names}
    clash = sorted(set(user) & set(fixed))
    if clash:
        raise UsageError(f"{', '.join(_flag(k) for k in clash)} cannot be set here "
                         f"(this command sets {', '.join(f'{k}={fixed[k]}' for k in clash)})")
    user.update(fixed)
    if args.out is not None:
        user["out_dir"] = args.out
    try:
        extra = None
        if demo:
            if command == "fire-opd":
                from pyopd.demo.fire_opd import default_max_new_tokens
            else:
                from pyopd.demo.copsd import default_max_new_tokens
            extra = {"max_new_tokens": default_max_new_tokens()}
        cfg = C.resolve(command, user, demo=demo, demo_extra=extra)
        cfg.validate()
    except ValueError as e:
        msg = str(e)
        for f in names:  # name the flag, not the field
            msg = re.sub(rf"(?<![\w-]){f} must", f"{_flag(f)} must", msg)
        raise UsageError(msg) from None
    return cfg


def _check_model_dir(flag: str, path: Optional[str]) -> Optional[Path]:
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UsageError(f"{flag}: model directory {str(p)!r} does not exist")
    if not (p / "config.json").is_file():
        raise UsageError(f"{flag}: {str(p)!r} has no config.json (expected a save_pretrained directory)")
    return p


def read_text(flag: str, path: str) -> str:
    """A UTF-8 text file, or a UsageError naming the flag."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"{flag}: file {str(p)!r} does not exist")
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{flag}: {str(p)!r} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def _read_jsonl(flag: str, path: str, required: Sequence[str]) -> list[dict]:
    rows = []
    for i, line in enumerate(read_text(flag, path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{flag}: line {i} of {path} is not JSON ({e.msg})") from None
        for key in required:
            if not isinstance(obj, dict) or not isinstance(obj.get(key), str) or not obj[key]:
                raise UsageError(f"{flag}: line {i} of {path} has no non-empty \"{key}\" string")
        rows.append(obj)
    if not rows:
        raise UsageError(f"{flag}: {path} is empty")
    return rows


def read_prompts(path: str, teacher_names: Sequence[str]) -> list[dict]:
    """JSONL: {"prompt": str, "teacher"?: name, "answer"?: str} per line."""
    rows = []
    for i, obj in enumerate(_read_jsonl("--prompts", path, ["prompt"]), 1):
        t = obj.get("teacher", teacher_names[0])
        if t not in teacher_names:
            raise UsageError(f"--prompts: entry {i} names teacher {t!r}; known: {list(teacher_names)}")
        rows.append({"prompt": obj["prompt"], "teacher": t, "answer": obj.get("answer")})
    return rows


def _prepare_out(out_dir: str, args) -> None:
    """Refuse to run over an existing run unless --resume or --overwrite (checked before any write)."""
    out = Path(out_dir)
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if not out.exists() or args.resume:
        return
    if not out.is_dir():
        raise UsageError(f"--out {out_dir!r} exists and is not a directory")
    if any(out.iterdir()):
        if not args.overwrite:
            raise UsageError(f"--out {out_dir!r} already holds a run: pass --resume to continue it, "
                             f"--overwrite to delete it and start over, or another --out")


def _start_out(out_dir: str, args) -> None:
    if args.overwrite and Path(out_dir).exists() and _rank() == 0:
        shutil.rmtree(out_dir)
    _barrier()


# ---------------------------------------------------------------------------- processes and devices


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _init_distributed() -> bool:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL for CUDA tensors and gloo
    for CPU ones on a GPU machine, gloo alone on CPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # NCCL for CUDA tensors, gloo for the few CPU ones (metrics, flags): NCCL alone
        # rejects a collective on a CPU tensor.
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    return True


def _device(spec: str):
    import torch

    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and "LOCAL_RANK" in os.environ:
        spec = f"cuda:{os.environ['LOCAL_RANK']}"
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device: {spec!r} is not a device (use cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device: CUDA was asked for but torch sees no CUDA device")
    return dev


def _say(*a, **k) -> None:
    if _rank() == 0:
        print(*a, **k)


def _vocab_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def _load_tokenizer(model_dir: Path):
    """The student's tokenizer, left-padded for generation, with a pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _check_teacher(flag: str, teacher, teacher_dir: Path, student, student_tok) -> None:
    """The teacher covers every student id (Vt >= V) and numbers the tokens the same way."""
    if _vocab_size(teacher) < _vocab_size(student):
        raise UsageError(f"{flag}: vocabulary {_vocab_size(teacher)} is smaller than the student's "
                         f"{_vocab_size(student)}; teacher and student must share the tokenizer")
    check_shared_vocab(flag, student_tok, teacher_dir)


def check_shared_vocab(flag: str, student_tok, model_dir: Path) -> None:
    """When ``model_dir`` ships a tokenizer, every student token must have the same id there.

    The fused KL compares logits id by id: a teacher whose tokenizer numbers
    tokens differently would be compared against the wrong rows.
    """
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(model_dir).get_vocab()
    for token, idx in sorted(student_tok.get_vocab().items(), key=lambda kv: kv[1]):
        if theirs.get(token) != idx:
            raise UsageError(f"{flag}: its tokenizer gives token {token!r} id {theirs.get(token)}, the "
                             f"student's gives {idx}; teacher and student must share the vocabulary")


def _load_model(d: Path, device=None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    return model if device is None else model.to(device)


# ---------------------------------------------------------------------------- fire-opd


def _run_fire_opd(args) -> int:
    if args.student or args.teacher or args.teacher2 or args.prompts:
        return _run_fire_opd_real(args)
    from pyopd.objectives import get_objective

    losses = tuple(x.strip() for x in args.losses.split(",") if x.strip())
    known = C.objective_catalog()
    bad = [x for x in losses if x not in known]
    if not losses or bad:
        raise UsageError(f"--losses: unknown objectives {bad}; pick from {list(known)}")
    if "loss" in vars(args):
        raise UsageError("--loss names the objective of a real-model run; the demo compares --losses")
    if args.multi_teacher:
        if vars(args).get("setting", "multi") != "multi":
            raise UsageError(f"--multi-teacher is --setting multi; it contradicts --setting {args.setting}")
        args.setting = "multi"
    cfg = _config("fire-opd", args, demo=True)
    for name in losses:
        get_objective(name)  # imports the registry (torch) only now
    _prepare_out(cfg.out_dir, args)
    _start_out(cfg.out_dir, args)
    from pyopd.demo.fire_opd import run_demo

    run_demo(cfg, losses=losses, scale=args.scale, out=Path(cfg.out_dir), cache_dir=args.cache_dir,
             progress=not args.no_progress and _rank() == 0,
             resume=args.resume, log=_say)
    return 0


def _run_fire_opd_real(args) -> int:
    if "setting" in vars(args) or args.multi_teacher:
        raise UsageError("--setting/--multi-teacher choose the built-in demo's teachers; with real models "
                         "give --teacher (and --teacher2)")
    cfg = _config("fire-opd", args, demo=False)
    student_dir = _check_model_dir("--student", args.student)
    teacher_dir = _check_model_dir("--teacher", args.teacher)
    teacher2_dir = _check_model_dir("--teacher2", args.teacher2)
    if student_dir is None or teacher_dir is None:
        raise UsageError("real models need --student DIR and --teacher DIR (and --prompts FILE)")
    if not args.prompts:
        raise UsageError("--prompts FILE.jsonl is required with --student/--teacher")
    names = ["teacher"] + (["teacher2"] if teacher2_dir else [])
    rows = read_prompts(args.prompts, names)
    _prepare_out(cfg.out_dir, args)
    import random

    from pyopd.trainers.opd import OPDTrainer, PromptBatch

    dev = _device(args.device)
    tok = _load_tokenizer(student_dir)
    student = _load_model(student_dir, dev)
    teacher_dirs = {"teacher": teacher_dir, **({"teacher2": teacher2_dir} if teacher2_dir else {})}
    teachers = {}
    for name, d in teacher_dirs.items():
        teachers[name] = _load_model(d, dev)
        _check_teacher(f"--{name}", teachers[name], d, student, tok)
    from pyopd.objectives import get_objective

    reference = _load_model(student_dir, dev) if get_objective(cfg.loss).needs_reference else None

    def prompts(step: int, count: int, rng: random.Random) -> PromptBatch:
        pick = [rows[rng.randrange(len(rows))] for _ in range(count)]
        return PromptBatch([r["prompt"] for r in pick], [r["teacher"] for r in pick])

    _start_out(cfg.out_dir, args)
    trainer = OPDTrainer(cfg, student, teachers, tok, prompts, reference=reference,
                         progress=not args.no_progress, log=_say)
    t0 = time.time()
    hist = trainer.train(resume=args.resume)
    _say(f"[pyopd] {cfg.loss}: {len(hist)} steps in {time.time() - t0:.0f}s; "
         f"checkpoints and metrics.jsonl in {cfg.out_dir}")
    return 0


# ---------------------------------------------------------------------------- copsd


def _run_copsd(args) -> int:
    from pyopd.trainers.copsd import CATEGORIES, ConstitutionError, load_constitution

    try:
        template = load_constitution(args.constitution)  # the shipped one when not given
    except ConstitutionError as e:
        raise UsageError(f"--constitution: {e}") from None
    if args.cross_sft_epochs < 1:
        raise UsageError(f"--cross-sft-epochs must be >= 1, got {args.cross_sft_epochs}")
    loss = "copsd" if args.objective == "sampled" else "rkl"
    demo = not (args.student or args.teacher or args.prompts)
    cfg = _config("copsd", args, demo=demo, loss=loss)
    if demo:
        _prepare_out(cfg.out_dir, args)
        _start_out(cfg.out_dir, args)
        from pyopd.demo.copsd import run_copsd_demo

        run_copsd_demo(cfg, scale=args.scale, out=Path(cfg.out_dir), cache_dir=args.cache_dir,
                       objective=args.objective, cross_sft_epochs=args.cross_sft_epochs,
                       progress=not args.no_progress, resume=args.resume)
        return 0
    student_dir = _check_model_dir("--student", args.student)
    teacher_dir = _check_model_dir("--teacher", args.teacher) or student_dir
    if student_dir is None or not args.prompts:
        raise UsageError("real models need --student DIR and --prompts FILE (and --frontier-answers FILE)")
    prompts = _read_jsonl("--prompts", args.prompts, ["prompt"])
    for i, r in enumerate(prompts, 1):
        r.setdefault("category", "benign")
        if r["category"] not in CATEGORIES:
            raise UsageError(f"--prompts: entry {i} has category {r['category']!r}; use one of {CATEGORIES}")
    unsafe = [r["prompt"] for r in prompts if r["category"] == "unsafe"]
    frontier: dict = {}
    if args.baseline != "opsd":
        if not args.frontier_answers:
            raise UsageError("--frontier-answers FILE is required for the Cross-SFT stage "
                             "(constitution-following answers to the unsafe prompts)")
        frontier = {r["prompt"]: r["answer"] for r in
                    _read_jsonl("--frontier-answers", args.frontier_answers, ["prompt", "answer"])}
        missing = [q for q in unsafe if q not in frontier]
        if missing:
            raise UsageError(f"--frontier-answers has no answer for {len(missing)} unsafe prompt(s), "
                             f"e.g. {missing[0]!r}")
    _prepare_out(cfg.out_dir, args)
    import random

    from pyopd.tasks.recipe import generate
    from pyopd.trainers.copsd import cross_sft_teacher, wrap
    from pyopd.trainers.opd import OPDTrainer, PromptBatch
    from pyopd.trainers.sft import SFTRecord, sft_epochs

    out = Path(cfg.out_dir)
    dev = _device(args.device)
    tok = _load_tokenizer(student_dir)
    student, initial, teacher = (_load_model(student_dir, dev), _load_model(student_dir, dev),
                                 _load_model(teacher_dir, dev))
    _check_teacher("--teacher", teacher, teacher_dir, student, tok)
    _start_out(cfg.out_dir, args)
    if args.baseline != "opsd":
        def build():
            return cross_sft_teacher(
                lambda: _load_model(teacher_dir, dev), tok, [(r["category"], r["prompt"]) for r in prompts],
                lambda qs: generate(initial, tok, qs, max_new_tokens=cfg.max_new_tokens), frontier, template,
                out=out, epochs=args.cross_sft_epochs, seed=cfg.seed, log=_say,
                key={"base": str(teacher_dir.resolve()), "max_new_tokens": cfg.max_new_tokens})

        # several processes: rank 0 builds the teacher, the others load what it wrote
        teacher = build() if _rank() == 0 else None
        _barrier()
        if teacher is None:
            teacher = build()

    if args.baseline == "sft":
        if _rank() != 0:  # one process fine-tunes and saves the baseline
            return 0
        qs = [r["prompt"] for r in prompts]
        answers = generate(teacher, tok, [wrap(template, q) for q in qs], max_new_tokens=cfg.max_new_tokens)
        sft_epochs(student, tok, [SFTRecord(q, a, r["category"], "teacher")
                                  for q, a, r in zip(qs, answers, prompts)],
                   epochs=args.cross_sft_epochs, seed=cfg.seed)
        student.save_pretrained(out / "sft-student")
        tok.save_pretrained(out / "sft-student")
        _say(f"[pyopd] SFT baseline on {len(qs)} teacher answers -> {out / 'sft-student'}")
        return 0

    def source(step: int, count: int, rng: random.Random) -> PromptBatch:
        pick = [prompts[rng.randrange(len(prompts))]["prompt"] for _ in range(count)]
        return PromptBatch(pick, ["teacher"] * count, teacher_prompts=[wrap(template, q) for q in pick])

    trainer = OPDTrainer(cfg, student, {"teacher": teacher}, tok, source, reference=initial,
                         progress=not args.no_progress, log=_say)
    hist = trainer.train(resume=args.resume)
    _say(f"[pyopd] copsd ({args.baseline}, objective {args.objective}): {len(hist)} steps; "
          f"checkpoints and metrics.jsonl in {cfg.out_dir}")
    return 0


# ---------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            import pyopd

            print(json.dumps({**pyopd.build_info(), "cuda_available": pyopd.cuda_available()}, indent=2))
            return 0
        distributed = _init_distributed()
        try:
            if args.command == "fire-opd":
                return _run_fire_opd(args)
            if args.command == "copsd":
                return _run_copsd(args)
        finally:
            if distributed:
                import torch.distributed as dist

                dist.destroy_process_group()
    except UsageError as e:
        print(f"pyopd {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # a diverged run or unreadable checkpoints: one clear line, no traceback
        from pyopd.trainers.checkpoint import CheckpointError
        from pyopd.trainers.opd import NonFiniteError

        if isinstance(e, NonFiniteError):
            print(f"pyopd {args.command}: stopped: {e}", file=sys.stderr)
            return EXIT_DIVERGED
        if isinstance(e, CheckpointError):
            print(f"pyopd {args.command}: error: --resume: {e}", file=sys.stderr)
            return EXIT_USAGE
        raise
    return 1


if __name__ == "__main__":
    sys.exit(main())
