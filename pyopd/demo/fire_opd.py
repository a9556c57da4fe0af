"""The built-in FiRe-OPD demo: OPD vs FiRe-OPD vs the exact reverse KL on the synthetic tasks (CPU).

`pyopd fire-opd` with no model arguments calls `run_demo` with a config that
already holds the demo preset and the user's flags: it prepares (or loads
from the cache) a weak student and the teacher(s), trains one copy of the
student with each objective from the same start, seed and budget, evaluates
with the task's verifier, prints a table and writes a plot.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from pyopd.trainers.opd import OPDConfig, OPDTrainer, PromptBatch, dist_info
from pyopd.trainers.records import plot_curves

EVAL_N = 192


def eval_examples():
    from pyopd.tasks.registry import get_task

    task = get_task("mixed")
    return task, task.eval_set(EVAL_N)


def default_max_new_tokens() -> int:
    """The demo's response budget: the longest eval answer in tokens, plus 4."""
    from pyopd.tasks.tokenizer import build_tokenizer

    tok = build_tokenizer()
    return max(len(tok(e.answer)["input_ids"]) for e in eval_examples()[1]) + 4


def _mean_se(xs) -> float:
    """Standard error of the mean of ``xs`` (sample std / sqrt(n))."""
    n = len(xs)
    if n < 2:
        return float("nan")
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def _binomial_se(ok) -> float:
    return _mean_se([float(bool(x)) for x in ok])


def make_evaluator(task, tokenizer, examples, max_new_tokens: int, k: int = 4, n_sampled: int = 64):
    """Greedy accuracy (overall and per family), plus avg@k and pass@k of k samples (T=1)
    on the first ``n_sampled`` prompts. Sampling uses its own seed and leaves the global RNG
    as it was, so evaluating never changes a training run."""
    from pyopd.tasks.recipe import generate

    prompts = [e.prompt for e in examples]
    sub = examples[:n_sampled]

    def evaluate(model) -> dict:
        completions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
        ok = task.score(examples, completions)
        res = {"accuracy": sum(ok) / len(ok), "accuracy_se": _binomial_se(ok)}
        for fam in sorted({e.family for e in examples}):
            idx = [i for i, e in enumerate(examples) if e.family == fam]
            res[f"accuracy_{fam}"] = sum(ok[i] for i in idx) / len(idx)
        if k > 0 and sub:
            state = torch.get_rng_state()
            torch.manual_seed(4321)
            samples = generate(model, tokenizer, [e.prompt for e in sub for _ in range(k)],
                               max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_k=0)
            torch.set_rng_state(state)
            hits = task.score([e for e in sub for _ in range(k)], samples)
            per = [hits[i * k:(i + 1) * k] for i in range(len(sub))]
            res[f"avg@{k}"] = sum(map(sum, per)) / (k * len(sub))
            res[f"avg@{k}_se"] = _mean_se([sum(h) / k for h in per])  # prompts are the unit
            res[f"pass@{k}"] = sum(any(h) for h in per) / len(sub)
            res[f"pass@{k}_se"] = _binomial_se([any(h) for h in per])
        return res

    return evaluate


def make_prompt_source(task, teacher_for, exclude=()):
    """Training prompts drawn fresh each step; ``exclude`` keeps the eval prompts out."""
    excluded = frozenset(exclude)

    def prompts(step: int, count: int, rng: random.Random) -> PromptBatch:
        examples = task.sample(count, rng, exclude=excluded)
        return PromptBatch([e.prompt for e in examples], [teacher_for(e) for e in examples],
                           meta=examples)

    return prompts


def run_demo(cfg: OPDConfig, losses=("opd", "fire"), scale: str = "demo", out: Path = Path("runs/demo"),
             cache_dir: Optional[str] = None, multi_teacher: bool = False, progress: bool = True,
             resume: bool = False, log=print) -> dict:
    """Train one copy of the student per objective in ``losses`` with ``cfg`` (used as given)."""
    from pyopd.objectives import get_objective
    from pyopd.tasks.prepare import prepare_models

    t_start = time.time()
    task, examples = eval_examples()
    if multi_teacher:
        teacher_names = task.families
        teacher_for = lambda e: e.family  # noqa: E731
    else:
        teacher_names = ["mixed"]
        teacher_for = lambda e: "mixed"  # noqa: E731
    # Only the models this setting uses; one thread while preparing (two shared cores thrash).
    prepared = prepare_models(scale=scale, cache_dir=cache_dir, seed=0, log=log, num_threads=1,
                              models=tuple(teacher_names))
    t_prep = time.time() - t_start
    tok = prepared.load_tokenizer()
    evaluate = make_evaluator(task, tok, examples, default_max_new_tokens())  # fixed by the task
    teachers = {n: prepared.load_teacher(n) for n in teacher_names}
    base = cfg
    log(f"[pyopd] demo: {scale} models ({'multi-teacher ' + '+'.join(teacher_names) if multi_teacher else 'teacher mixed'}), "
        f"{base.steps} steps x {base.prompts_per_step} prompts x {base.n} samples, seed {base.seed}")

    # Several processes (torchrun): every rank trains, rank 0 alone evaluates and writes.
    main_rank = dist_info()[0] == 0
    teacher_eval = {n: evaluate(t) for n, t in teachers.items()} if main_rank else {}
    start_eval = evaluate(prepared.load_student()) if main_rank else None  # every objective starts here
    runs, results = {}, {}
    for loss in losses:
        torch.manual_seed(base.seed)
        student = prepared.load_student()
        cfg = replace(base, loss=loss, out_dir=str(out / loss))
        source = make_prompt_source(task, teacher_for, exclude=[e.prompt for e in examples])
        reference = prepared.load_student() if get_objective(loss).needs_reference else None
        trainer = OPDTrainer(cfg, student, teachers, tok, source, reference=reference,
                             evaluate=evaluate, log=log, progress=progress, label=NAMES.get(loss, loss))
        t0 = time.time()
        hist = trainer.train(resume=resume, initial_eval=start_eval)
        if not main_rank:
            continue
        wall = time.time() - t0
        steps = [h for h in hist if "loss" in h]
        runs[loss] = hist
        results[loss] = {
            "before": hist[0].get("eval/accuracy"),
            "after": hist[-1].get("eval/accuracy"),
            "before_avg@4": hist[0].get("eval/avg@4"), "after_avg@4": hist[-1].get("eval/avg@4"),
            "before_pass@4": hist[0].get("eval/pass@4"), "after_pass@4": hist[-1].get("eval/pass@4"),
            "after_by_family": {k[len("eval/accuracy_"):]: v for k, v in hist[-1].items()
                                if k.startswith("eval/accuracy_")},
            "keep_ratio": sum(h.get("keep_ratio", 1.0) for h in steps) / max(1, len(steps)),
            # total tokens over total step time (a mean of per-step rates swings with load)
            "tokens_per_s": sum(h["tokens"] for h in steps) / max(1e-9, sum(h["step_s"] for h in steps)),
            "wall_s": wall,
            "final_eval": {k[len("eval/"):]: v for k, v in hist[-1].items() if k.startswith("eval/")},
        }
    if not main_rank:
        return {}
    rows = {"student (start)": _row(start_eval)}
    rows.update({f"teacher {n}": _row(ev) for n, ev in teacher_eval.items()})
    rows.update({NAMES.get(loss, loss): _row(r["final_eval"], keep_ratio=r["keep_ratio"],
                                             tokens_per_s=r["tokens_per_s"]) for loss, r in results.items()})
    summary = {"scale": scale, "seed": base.seed, "multi_teacher": multi_teacher,
               "teacher_accuracy": {n: ev["accuracy"] for n, ev in teacher_eval.items()},
               "headline": "avg@4", "rows": rows, "prepare_s": t_prep,
               "total_s": time.time() - t_start, "results": results, "config": vars(base)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    # "loss" is a PPO surrogate for the sampled-token objectives and the KL itself for the
    # exact ones: never on one axis.
    exact = [x for x in runs if get_objective(x).needs_teacher_logits]
    sampled = [x for x in runs if x not in exact]
    panels = {"avg@4 (T=1, eval)": "eval/avg@4", "greedy accuracy (eval)": "eval/accuracy",
              "pass@4 (eval)": "eval/pass@4", "teacher log-prob of samples": "teacher_logprob",
              "loss: PPO surrogate": ("loss", sampled), "loss: exact reverse KL": ("loss", exact),
              "keep ratio": "keep_ratio", "response length": "response_length",
              "student entropy": "student_entropy"}
    plot = plot_curves(runs, {k: v for k, v in panels.items() if not (isinstance(v, tuple) and not v[1])},
                       out / "curves.png", title=f"pyopd demo ({scale}, seed {base.seed})")
    log(format_table(summary))
    if plot is not None:
        log(f"[pyopd] curves: {plot}")
    log(f"[pyopd] summary: {out / 'summary.json'} (total {summary['total_s']:.0f}s)")
    return summary


NAMES = {"opd": "OPD", "fire": "FiRe-OPD", "rkl": "full-vocab RKL", "fire-rkl": "FiRe + full RKL",
         "tip": "TIP", "exopd": "ExOPD"}


def _row(ev: dict, **extra) -> dict:
    """One model row of summary.json: the headline (avg@4 of T=1 samples) and greedy accuracy, with SEs."""
    return {"headline": ev.get("avg@4"), "headline_se": ev.get("avg@4_se"),
            "greedy": ev.get("accuracy"), "greedy_se": ev.get("accuracy_se"),
            "pass@4": ev.get("pass@4"), "pass@4_se": ev.get("pass@4_se"), **extra}


def format_table(summary: dict) -> str:
    """The end-of-run table: every metric with its standard error, the teacher(s) included."""
    def cell(v, se):
        return f"{'-':>15}" if v is None else f"{v:>7.3f} ± {se:.3f}"

    lines = [f"{'model':<22} {'avg@4 (T=1)':>15} {'greedy acc.':>15} {'pass@4':>15} "
             f"{'keep ratio':>10} {'tokens/s':>9}"]
    for name, r in summary["rows"].items():
        keep, tps = r.get("keep_ratio"), r.get("tokens_per_s")
        lines.append(f"{name:<22} {cell(r['headline'], r['headline_se'])} {cell(r['greedy'], r['greedy_se'])} "
                     f"{cell(r['pass@4'], r['pass@4_se'])} {'-' if keep is None else f'{keep:.2f}':>10} "
                     f"{'-' if tps is None else f'{tps:.0f}':>9}")
    n = EVAL_N
    lines.append(f"(± one standard error; greedy over {n} held-out prompts, avg@4/pass@4 over 64 of them x 4 "
                 f"samples at T=1; tokens/s = trained response tokens / step time)")
    return "\n".join(lines)
