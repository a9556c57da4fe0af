"""The `pyopd` command.

    pyopd fire-opd                 # the demo: built-in task, OPD vs FiRe-OPD, on the CPU
    pyopd fire-opd --student DIR --teacher DIR [--teacher2 DIR] --prompts FILE.jsonl
    pyopd info                     # what the extension was built with

Bad input (a missing model directory, a JSONL line without a prompt,
vocabularies that do not match, a percentile of 120...) is reported in one
line and exits with status 2 before anything is written.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Optional, Sequence

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad user input: printed without a traceback, exit status 2."""


# ---------------------------------------------------------------------------- arguments


def _add_opd_args(p: argparse.ArgumentParser) -> None:
    from pyopd.trainers.opd import LOSSES, OPDConfig

    d = OPDConfig()
    g = p.add_argument_group("method")
    g.add_argument("--loss", choices=LOSSES, default=None,
                   help="objective for a single run with real models (demo runs 'opd' and 'fire')")
    g.add_argument("--percentile", type=float, default=d.percentile,
                   help="FiRe-OPD: drop rollouts below this percentile of the length-normalised "
                        "teacher log-prob (0-100, default %(default)s)")
    g.add_argument("--alpha", type=float, default=d.alpha, help="teacher-confidence weight")
    g.add_argument("--beta", type=float, default=d.beta, help="student-confusion weight")
    g.add_argument("--weight-norm", choices=("trajectory", "batch"), default=d.weight_norm)
    g.add_argument("--clip", type=float, default=d.clip, help="PPO clip ratio")
    g.add_argument("--dual-clip", type=float, default=None)
    g.add_argument("--exopd-lambda", type=float, default=d.exopd_lambda)
    g.add_argument("--tip-rho", type=float, default=d.tip_rho)
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default=d.lr_schedule)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--prompts-per-step", type=int, default=None)
    g.add_argument("--n", type=int, default=None, help="responses sampled per prompt")
    g.add_argument("--micro-batch", type=int, default=d.micro_batch)
    g.add_argument("--mini-batches", type=int, default=d.mini_batches)
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=d.temperature)
    g.add_argument("--top-p", type=float, default=d.top_p)
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default=None, help="output directory")
    g.add_argument("--eval-every", type=int, default=None)
    g.add_argument("--save-every", type=int, default=None)
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    g.add_argument("--no-progress", action="store_true")


def _config_from(args, **overrides):
    from pyopd.trainers.opd import OPDConfig

    names = {f.name for f in fields(OPDConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
    kw.update({k: v for k, v in overrides.items() if v is not None})
    cfg = OPDConfig(**kw)
    try:
        cfg.validate()
    except ValueError as e:
        raise UsageError(str(e).replace("_", "-")) from None
    return cfg


# ---------------------------------------------------------------------------- fire-opd


def _check_model_dir(flag: str, path: Optional[str]) -> Optional[Path]:
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UsageError(f"{flag}: model directory {str(p)!r} does not exist")
    if not (p / "config.json").is_file():
        raise UsageError(f"{flag}: {str(p)!r} has no config.json (expected a save_pretrained directory)")
    return p


def _read_jsonl(flag: str, path: str, required: Sequence[str]) -> list[dict]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"{flag}: file {str(p)!r} does not exist")
    rows = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{flag}: line {i} of {p} is not JSON ({e.msg})") from None
        for key in required:
            if not isinstance(obj, dict) or not isinstance(obj.get(key), str) or not obj[key]:
                raise UsageError(f"{flag}: line {i} of {p} has no non-empty \"{key}\" string")
        rows.append(obj)
    if not rows:
        raise UsageError(f"{flag}: {p} is empty")
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


def _vocab_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def _refuse_existing_run(out_dir: str, resume: bool) -> None:
    if not resume and any(Path(out_dir).glob("checkpoint-*")):
        raise UsageError(f"--out {out_dir!r} already has checkpoints: pass --resume or another --out")


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

    The fused KL compares logits id by id (DESIGN.md section 2): a teacher whose
    tokenizer numbers tokens differently would be compared against the wrong rows.
    """
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(model_dir).get_vocab()
    for token, idx in sorted(student_tok.get_vocab().items(), key=lambda kv: kv[1]):
        if theirs.get(token) != idx:
            raise UsageError(f"{flag}: its tokenizer gives token {token!r} id {theirs.get(token)}, the "
                             f"student's gives {idx}; teacher and student must share the vocabulary")


def _run_fire_opd(args) -> int:
    if args.student or args.teacher or args.teacher2 or args.prompts:
        return _run_real(args)
    from pyopd.demo import run_demo

    cfg_overrides = dict(steps=args.steps, prompts_per_step=args.prompts_per_step, n=args.n,
                         max_new_tokens=args.max_new_tokens, lr=args.lr,
                         eval_every=args.eval_every, save_every=args.save_every)
    base = _config_from(args, **cfg_overrides)
    from pyopd.trainers.opd import LOSSES

    losses = tuple(x.strip() for x in args.losses.split(",") if x.strip())
    bad = [x for x in losses if x not in LOSSES or x in ("exopd", "copsd")]
    if not losses or bad:
        raise UsageError(f"--losses: unknown or unsupported in the demo: {bad}; pick from "
                         f"{[x for x in LOSSES if x not in ('exopd', 'copsd')]}")
    run_demo(base, losses=losses, explicit={k for k, v in cfg_overrides.items() if v is not None},
             scale=args.scale, out=Path(args.out or "runs/fire-opd-demo"),
             cache_dir=args.cache_dir, multi_teacher=args.multi_teacher,
             progress=not args.no_progress, resume=args.resume)
    return 0


def _run_real(args) -> int:
    student_dir = _check_model_dir("--student", args.student)
    teacher_dir = _check_model_dir("--teacher", args.teacher)
    teacher2_dir = _check_model_dir("--teacher2", args.teacher2)
    if student_dir is None or teacher_dir is None:
        raise UsageError("real models need --student DIR and --teacher DIR (and --prompts FILE)")
    if not args.prompts:
        raise UsageError("--prompts FILE.jsonl is required with --student/--teacher")
    names = ["teacher"] + (["teacher2"] if teacher2_dir else [])
    rows = read_prompts(args.prompts, names)
    cfg = _config_from(args, loss=args.loss or "fire", out_dir=args.out or "runs/fire-opd",
                       steps=args.steps, prompts_per_step=args.prompts_per_step, n=args.n,
                       max_new_tokens=args.max_new_tokens, lr=args.lr,
                       eval_every=args.eval_every, save_every=args.save_every)
    _refuse_existing_run(cfg.out_dir, args.resume)
    import random

    import torch
    from transformers import AutoModelForCausalLM

    from pyopd.trainers.opd import OPDTrainer, PromptBatch

    tok = _load_tokenizer(student_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    teacher_dirs = {"teacher": teacher_dir, **({"teacher2": teacher2_dir} if teacher2_dir else {})}
    teachers = {}
    for name, d in teacher_dirs.items():
        teachers[name] = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        _check_teacher(f"--{name}", teachers[name], d, student, tok)
    reference = None
    if cfg.loss == "exopd":
        reference = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)

    def prompts(step: int, count: int, rng: random.Random) -> PromptBatch:
        pick = [rows[rng.randrange(len(rows))] for _ in range(count)]
        return PromptBatch([r["prompt"] for r in pick], [r["teacher"] for r in pick])

    trainer = OPDTrainer(cfg, student, teachers, tok, prompts, reference=reference,
                         progress=not args.no_progress)
    t0 = time.time()
    hist = trainer.train(resume=args.resume)
    print(f"[pyopd] {cfg.loss}: {len(hist)} steps in {time.time() - t0:.0f}s; "
          f"checkpoints and metrics.jsonl in {cfg.out_dir}")
    return 0


# ---------------------------------------------------------------------------- copsd


def _run_copsd(args) -> int:
    from pyopd.trainers.copsd import CATEGORIES, ConstitutionError, load_constitution

    try:
        template = load_constitution(args.constitution)
    except ConstitutionError as e:
        raise UsageError(f"--constitution: {e}") from None
    if args.cross_sft_epochs < 1:
        raise UsageError(f"--cross-sft-epochs must be >= 1, got {args.cross_sft_epochs}")
    if not (args.student or args.teacher or args.prompts):
        from pyopd.demo import run_copsd_demo

        overrides = dict(steps=args.steps, prompts_per_step=args.prompts_per_step, n=args.n,
                         max_new_tokens=args.max_new_tokens, lr=args.lr, eval_every=args.eval_every,
                         save_every=args.save_every)
        base = _config_from(args, loss="copsd", **overrides)
        run_copsd_demo(base, explicit={k for k, v in overrides.items() if v is not None},
                       scale=args.scale, out=Path(args.out or "runs/copsd-demo"),
                       cache_dir=args.cache_dir, objective=args.objective,
                       cross_sft_epochs=args.cross_sft_epochs, progress=not args.no_progress,
                       resume=args.resume)
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
    frontier = {}
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
    cfg = _config_from(args, loss="copsd" if args.objective == "sampled" else "rkl",
                       out_dir=args.out or "runs/copsd", steps=args.steps,
                       prompts_per_step=args.prompts_per_step, n=args.n,
                       max_new_tokens=args.max_new_tokens, lr=args.lr, eval_every=args.eval_every,
                       save_every=args.save_every, dual_clip=args.dual_clip if args.dual_clip else 3.0)
    out = Path(cfg.out_dir)
    _refuse_existing_run(cfg.out_dir, args.resume)
    import random

    import torch
    from transformers import AutoModelForCausalLM

    from pyopd.tasks.recipe import generate
    from pyopd.trainers.copsd import build_cross_sft_set, sft_epochs, wrap
    from pyopd.trainers.opd import OPDTrainer, PromptBatch

    tok = _load_tokenizer(student_dir)
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)  # noqa: E731
    student, initial, teacher = load(student_dir), load(student_dir), load(teacher_dir)
    _check_teacher("--teacher", teacher, teacher_dir, student, tok)
    if args.baseline != "opsd" and not (out / "teacher-cross-sft" / "config.json").is_file():
        records = build_cross_sft_set(
            [(r["category"], r["prompt"]) for r in prompts],
            lambda qs: generate(initial, tok, qs, max_new_tokens=cfg.max_new_tokens), frontier, template)
        sft_epochs(teacher, tok, records, epochs=args.cross_sft_epochs, seed=cfg.seed)
        teacher.save_pretrained(out / "teacher-cross-sft")
        tok.save_pretrained(out / "teacher-cross-sft")
        print(f"[pyopd] Cross-SFT teacher ({len(records)} records) -> {out / 'teacher-cross-sft'}")
    elif args.baseline != "opsd":
        teacher = load(out / "teacher-cross-sft")

    if args.baseline == "sft":
        from pyopd.trainers.copsd import SFTRecord

        qs = [r["prompt"] for r in prompts]
        answers = generate(teacher, tok, [wrap(template, q) for q in qs], max_new_tokens=cfg.max_new_tokens)
        sft_epochs(student, tok, [SFTRecord(q, a, r["category"], "teacher")
                                  for q, a, r in zip(qs, answers, prompts)],
                   epochs=args.cross_sft_epochs, seed=cfg.seed)
        student.save_pretrained(out / "sft-student")
        tok.save_pretrained(out / "sft-student")
        print(f"[pyopd] SFT baseline on {len(qs)} teacher answers -> {out / 'sft-student'}")
        return 0

    def source(step: int, count: int, rng: random.Random) -> PromptBatch:
        pick = [prompts[rng.randrange(len(prompts))]["prompt"] for _ in range(count)]
        return PromptBatch(pick, ["teacher"] * count, teacher_prompts=[wrap(template, q) for q in pick])

    trainer = OPDTrainer(cfg, student, {"teacher": teacher}, tok, source, reference=initial,
                         progress=not args.no_progress)
    hist = trainer.train(resume=args.resume)
    print(f"[pyopd] copsd ({args.baseline}, objective {args.objective}): {len(hist)} steps; "
          f"checkpoints and metrics.jsonl in {cfg.out_dir}")
    return 0


# ---------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyopd", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fire-opd", help="FiRe-OPD: the demo, or a run with real models")
    p.add_argument("--student", help="student model directory (save_pretrained)")
    p.add_argument("--teacher", help="teacher model directory")
    p.add_argument("--teacher2", help="second teacher (multi-teacher: prompts name their teacher)")
    p.add_argument("--prompts", help="JSONL file: {\"prompt\": ..., \"teacher\"?: \"teacher2\"}")
    p.add_argument("--scale", default="demo", help="demo: size of the built-in task models")
    p.add_argument("--cache-dir", default=None, help="where the built-in models are cached")
    p.add_argument("--multi-teacher", action="store_true",
                   help="demo: route each sample to its family's specialist teacher")
    p.add_argument("--losses", default="opd,fire,rkl,fire-rkl",
                   help="demo: objectives to compare, each from the same start (default %(default)s)")
    _add_opd_args(p)
    p = sub.add_parser("copsd", help="COPSD: the demo, or a run with real models")
    p.add_argument("--student", help="student model directory (save_pretrained)")
    p.add_argument("--teacher", help="model the teacher is made from (default: the student)")
    p.add_argument("--constitution", help="template file with a {user_query} slot (default: shipped)")
    p.add_argument("--prompts", help="JSONL: {\"prompt\": ..., \"category\": benign|over_refusal|unsafe}")
    p.add_argument("--frontier-answers", help="JSONL: {\"prompt\": ..., \"answer\": ...} for unsafe prompts")
    p.add_argument("--objective", choices=("sampled", "full"), default="sampled",
                   help="sampled-token COPSD loss or the analytic full-vocabulary reverse KL")
    p.add_argument("--baseline", choices=("copsd", "opsd", "sft"), default="copsd",
                   help="opsd: skip Cross-SFT (the teacher is the initial model with the constitution); "
                        "sft: fine-tune the student on the Cross-SFT teacher's answers instead of OPD")
    p.add_argument("--cross-sft-epochs", type=int, default=2)
    p.add_argument("--kl-coef", type=float, default=0.005)
    p.add_argument("--reward-bonus", type=float, default=0.02)
    p.add_argument("--scale", default="safety", help="demo: size of the built-in safety model")
    p.add_argument("--cache-dir", default=None)
    _add_opd_args(p)
    sub.add_parser("info", help="print pyopd.build_info()")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            import pyopd

            print(json.dumps({**pyopd.build_info(), "cuda_available": pyopd.cuda_available()}, indent=2))
            return 0
        if args.command == "fire-opd":
            return _run_fire_opd(args)
        if args.command == "copsd":
            return _run_copsd(args)
    except UsageError as e:
        print(f"pyopd {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 1


if __name__ == "__main__":
    sys.exit(main())
