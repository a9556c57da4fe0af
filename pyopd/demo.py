"""The built-in FiRe-OPD demo: vanilla OPD vs FiRe-OPD on the synthetic tasks, on the CPU.

`pyopd fire-opd` with no model arguments calls `run_demo`: it prepares (or
loads from the cache) a weak student and the teacher(s), trains one copy of
the student with each objective from the same start, seed and budget,
evaluates with the task's verifier, prints a table and writes a plot.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from pyopd.trainers.opd import OPDConfig, OPDTrainer, PromptBatch
from pyopd.trainers.records import plot_curves

# Demo budget: small enough for 2 CPU cores in a few minutes per objective.
DEMO_DEFAULTS = dict(steps=24, prompts_per_step=16, n=4, lr=3e-4, eval_every=6, save_every=6,
                     micro_batch=32)
EVAL_N = 192


def make_evaluator(task, tokenizer, examples, max_new_tokens: int):
    from pyopd.tasks.recipe import generate

    prompts = [e.prompt for e in examples]

    def evaluate(model) -> dict:
        completions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
        ok = task.score(examples, completions)
        res = {"accuracy": sum(ok) / len(ok)}
        for fam in sorted({e.family for e in examples}):
            idx = [i for i, e in enumerate(examples) if e.family == fam]
            res[f"accuracy_{fam}"] = sum(ok[i] for i in idx) / len(idx)
        return res

    return evaluate


def make_prompt_source(task, teacher_for):
    def prompts(step: int, count: int, rng: random.Random) -> PromptBatch:
        examples = task.sample(count, rng)
        return PromptBatch([e.prompt for e in examples], [teacher_for(e) for e in examples],
                           meta=examples)

    return prompts


def run_demo(base: OPDConfig, explicit: set, scale: str = "demo", out: Path = Path("runs/demo"),
             cache_dir: Optional[str] = None, multi_teacher: bool = False, progress: bool = True,
             resume: bool = False, losses=("opd", "fire"), log=print) -> dict:
    from pyopd.tasks.prepare import prepare_models
    from pyopd.tasks.registry import get_task

    t_start = time.time()
    prepared = prepare_models(scale=scale, cache_dir=cache_dir, seed=0, log=log)
    t_prep = time.time() - t_start
    tok = prepared.load_tokenizer()
    task = get_task("mixed")
    examples = task.eval_set(EVAL_N)
    max_new = max(len(tok(e.answer)["input_ids"]) for e in examples) + 4
    evaluate = make_evaluator(task, tok, examples, max_new)
    if multi_teacher:
        teacher_names = task.families
        teacher_for = lambda e: e.family  # noqa: E731
    else:
        teacher_names = ["mixed"]
        teacher_for = lambda e: "mixed"  # noqa: E731
    teachers = {n: prepared.load_teacher(n) for n in teacher_names}

    overrides = {k: v for k, v in DEMO_DEFAULTS.items() if k not in explicit}
    if "max_new_tokens" not in explicit:
        overrides["max_new_tokens"] = max_new
    base = replace(base, **overrides)
    log(f"[pyopd] demo: {scale} models ({'multi-teacher ' + '+'.join(teacher_names) if multi_teacher else 'teacher mixed'}), "
        f"{base.steps} steps x {base.prompts_per_step} prompts x {base.n} samples, seed {base.seed}")

    teacher_eval = {n: evaluate(t)["accuracy"] for n, t in teachers.items()}
    runs, results = {}, {}
    for loss in losses:
        torch.manual_seed(base.seed)
        student = prepared.load_student()
        cfg = replace(base, loss=loss, out_dir=str(out / loss))
        trainer = OPDTrainer(cfg, student, teachers, tok, make_prompt_source(task, teacher_for),
                             evaluate=evaluate, log=log, progress=progress)
        t0 = time.time()
        hist = trainer.train(resume=resume)
        wall = time.time() - t0
        steps = [h for h in hist if "loss" in h]
        runs[loss] = hist
        results[loss] = {
            "before": hist[0].get("eval/accuracy"),
            "after": hist[-1].get("eval/accuracy"),
            "after_by_family": {k[len("eval/accuracy_"):]: v for k, v in hist[-1].items()
                                if k.startswith("eval/accuracy_")},
            "keep_ratio": sum(h.get("keep_ratio", 1.0) for h in steps) / max(1, len(steps)),
            "tokens_per_s": sum(h["tokens_per_s"] for h in steps) / max(1, len(steps)),
            "wall_s": wall,
        }
    summary = {"scale": scale, "seed": base.seed, "multi_teacher": multi_teacher,
               "teacher_accuracy": teacher_eval, "prepare_s": t_prep,
               "total_s": time.time() - t_start, "results": results, "config": vars(base)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    plot = plot_curves(runs, ["eval/accuracy", "teacher_logprob", "loss", "keep_ratio",
                              "response_length", "student_entropy"], out / "curves.png",
                       title=f"pyopd demo ({scale}, seed {base.seed})")
    log(format_table(summary))
    if plot is not None:
        log(f"[pyopd] curves: {plot}")
    log(f"[pyopd] summary: {out / 'summary.json'} (total {summary['total_s']:.0f}s)")
    return summary


def format_table(summary: dict) -> str:
    res = summary["results"]
    first = next(iter(res.values()))
    rows = [("student (start)", first["before"], None, None)]
    names = {"opd": "after OPD", "fire": "after FiRe-OPD"}
    for loss, r in res.items():
        rows.append((names.get(loss, f"after {loss}"), r["after"], r["keep_ratio"], r["tokens_per_s"]))
    teach = ", ".join(f"{k} {v:.3f}" for k, v in summary["teacher_accuracy"].items())
    lines = [f"teacher accuracy: {teach}",
             f"{'model':<18} {'accuracy':>9} {'keep ratio':>11} {'tokens/s':>9}"]
    for name, acc, keep, tps in rows:
        lines.append(f"{name:<18} {acc:>9.3f} "
                     f"{'-' if keep is None else f'{keep:.2f}':>11} {'-' if tps is None else f'{tps:.0f}':>9}")
    return "\n".join(lines)
