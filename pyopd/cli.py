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
import os
import sys
import time
from dataclasses import fields, replace
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


def read_prompts(path: str, teacher_names: Sequence[str]) -> list[dict]:
    """JSONL: {"prompt": str, "teacher"?: name, "answer"?: str} per line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"--prompts: file {str(p)!r} does not exist")
    rows = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"--prompts: line {i} of {p} is not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
            raise UsageError(f"--prompts: line {i} of {p} has no non-empty \"prompt\" string")
        t = obj.get("teacher", teacher_names[0])
        if t not in teacher_names:
            raise UsageError(f"--prompts: line {i} names teacher {t!r}; known: {list(teacher_names)}")
        rows.append({"prompt": obj["prompt"], "teacher": t, "answer": obj.get("answer")})
    if not rows:
        raise UsageError(f"--prompts: {p} has no prompts")
    return rows


def _vocab_size(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def _run_fire_opd(args) -> int:
    if args.student or args.teacher or args.teacher2 or args.prompts:
        return _run_real(args)
    from pyopd.demo import run_demo

    cfg_overrides = dict(steps=args.steps, prompts_per_step=args.prompts_per_step, n=args.n,
                         max_new_tokens=args.max_new_tokens, lr=args.lr,
                         eval_every=args.eval_every, save_every=args.save_every)
    base = _config_from(args, **cfg_overrides)
    run_demo(base, explicit={k for k, v in cfg_overrides.items() if v is not None},
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
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pyopd.trainers.opd import OPDTrainer, PromptBatch

    tok = AutoTokenizer.from_pretrained(student_dir)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    teachers = {"teacher": AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)}
    if teacher2_dir:
        teachers["teacher2"] = AutoModelForCausalLM.from_pretrained(teacher2_dir, dtype=torch.float32)
    for name, t in teachers.items():
        if _vocab_size(t) < _vocab_size(student):
            raise UsageError(f"--{name}: vocabulary {_vocab_size(t)} is smaller than the student's "
                             f"{_vocab_size(student)}; teacher and student must share the tokenizer")
    reference = None
    if cfg.loss == "exopd":
        reference = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)

    def prompts(step: int, count: int, rng: random.Random) -> PromptBatch:
        pick = [rows[rng.randrange(len(rows))] for _ in range(count)]
        return PromptBatch([r["prompt"] for r in pick], [r["teacher"] for r in pick])

    trainer = OPDTrainer(cfg, student, teachers, tok, prompts, reference=reference,
                         progress=not args.no_progress)
    if not args.resume and any(Path(cfg.out_dir).glob("checkpoint-*")):
        raise UsageError(f"--out {cfg.out_dir!r} already has checkpoints: pass --resume or another --out")
    t0 = time.time()
    hist = trainer.train(resume=args.resume)
    print(f"[pyopd] {cfg.loss}: {len(hist)} steps in {time.time() - t0:.0f}s; "
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
    except UsageError as e:
        print(f"pyopd {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 1


if __name__ == "__main__":
    sys.exit(main())
