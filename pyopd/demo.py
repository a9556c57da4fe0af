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
from pyopd.trainers.records import plot_curves, plot_safety_plane

# Demo budget: small enough for 2 CPU cores in a few minutes per objective.
DEMO_DEFAULTS = dict(steps=60, prompts_per_step=16, n=4, lr=3e-4, eval_every=15, save_every=15,
                     micro_batch=32)
EVAL_N = 192


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
        res = {"accuracy": sum(ok) / len(ok)}
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
            res[f"pass@{k}"] = sum(any(h) for h in per) / len(sub)
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


def run_demo(base: OPDConfig, explicit: set, scale: str = "demo", out: Path = Path("runs/demo"),
             cache_dir: Optional[str] = None, multi_teacher: bool = False, progress: bool = True,
             resume: bool = False, losses=("opd", "fire"), log=print) -> dict:
    from pyopd.tasks.prepare import prepare_models
    from pyopd.tasks.registry import get_task

    t_start = time.time()
    # One thread while preparing: two cores shared with anything else thrash otherwise.
    prepared = prepare_models(scale=scale, cache_dir=cache_dir, seed=0, log=log, num_threads=1)
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

    teacher_eval = {n: evaluate(t)["accuracy"] for n, t in teachers.items()}  # greedy
    start_eval = evaluate(prepared.load_student())  # every objective starts from this student
    runs, results = {}, {}
    for loss in losses:
        torch.manual_seed(base.seed)
        student = prepared.load_student()
        cfg = replace(base, loss=loss, out_dir=str(out / loss))
        source = make_prompt_source(task, teacher_for, exclude=[e.prompt for e in examples])
        trainer = OPDTrainer(cfg, student, teachers, tok, source,
                             evaluate=evaluate, log=log, progress=progress)
        t0 = time.time()
        hist = trainer.train(resume=resume, initial_eval=start_eval)
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
            "tokens_per_s": sum(h["tokens_per_s"] for h in steps) / max(1, len(steps)),
            "wall_s": wall,
        }
    summary = {"scale": scale, "seed": base.seed, "multi_teacher": multi_teacher,
               "teacher_accuracy": teacher_eval, "prepare_s": t_prep,
               "total_s": time.time() - t_start, "results": results, "config": vars(base)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    plot = plot_curves(runs, ["eval/accuracy", "eval/avg@4", "eval/pass@4", "teacher_logprob", "loss",
                              "keep_ratio", "response_length", "student_entropy", "kl_mean"],
                       out / "curves.png",
                       title=f"pyopd demo ({scale}, seed {base.seed})")
    log(format_table(summary))
    if plot is not None:
        log(f"[pyopd] curves: {plot}")
    log(f"[pyopd] summary: {out / 'summary.json'} (total {summary['total_s']:.0f}s)")
    return summary


def format_table(summary: dict) -> str:
    res = summary["results"]
    first = next(iter(res.values()))
    rows = [("student (start)", first["before"], None, None)]  # every run starts from it
    names = {"opd": "after OPD", "fire": "after FiRe-OPD", "rkl": "after full-vocab RKL",
             "fire-rkl": "after FiRe + full RKL", "tip": "after TIP"}
    for loss, r in res.items():
        rows.append((names.get(loss, f"after {loss}"), r["after"], r["keep_ratio"], r["tokens_per_s"]))
    teach = ", ".join(f"{k} {v:.3f}" for k, v in summary["teacher_accuracy"].items())
    lines = [f"teacher accuracy: {teach}",
             f"{'model':<24} {'accuracy':>9} {'keep ratio':>11} {'tokens/s':>9}"]
    for name, acc, keep, tps in rows:
        lines.append(f"{name:<24} {acc:>9.3f} "
                     f"{'-' if keep is None else f'{keep:.2f}':>11} {'-' if tps is None else f'{tps:.0f}':>9}")
    return "\n".join(lines)


# ============================================================================ COPSD

COPSD_DEFAULTS = dict(steps=60, prompts_per_step=16, n=4, lr=5e-4, eval_every=15, save_every=15,
                      micro_batch=24, dual_clip=3.0)
SAFETY_EVAL_N = 150
CROSS_SFT_PROMPTS = 384


def _greedy(model, tok, prompts, max_new):
    from pyopd.tasks.recipe import generate

    return generate(model, tok, list(prompts), max_new_tokens=max_new)


def make_safety_evaluator(tok, examples, max_new: int, n_div: int = 24, k: int = 4):
    """Safe rate, helpfulness, over-refusal, mean length (greedy), and entropy + diversity
    (sampled k responses to n_div prompts); the student sees the bare prompt. Once
    ``evaluate.initial_helpfulness`` is set, also the safety tax (its drop since then)."""
    from pyopd.trainers.copsd import diversity
    from pyopd.trainers.rollout import sample_rollouts, score

    prompts = [e.prompt for e in examples]
    div_prompts = prompts[:n_div]

    def evaluate(model) -> dict:
        res = _greedy_safety(model, tok, examples, prompts, max_new)
        g = torch.Generator().manual_seed(1234)
        state = torch.get_rng_state()
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        ro = sample_rollouts(model, tok, div_prompts, k, max_new_tokens=max_new)
        torch.set_rng_state(state)  # evaluation never shifts the training RNG stream
        ent = score(model, ro.prompt_ids, ro, tok.pad_token_id).entropy
        res["entropy"] = float((ent * ro.mask).sum() / ro.mask.sum().clamp(min=1))
        res["diversity"] = diversity([ro.texts[i * k:(i + 1) * k] for i in range(len(div_prompts))])
        if evaluate.initial_helpfulness is not None:
            res["safety_tax"] = evaluate.initial_helpfulness - res["helpfulness"]
        return res

    evaluate.initial_helpfulness = None
    return evaluate


def safety_rollout_metrics(batch, ro) -> dict:
    """Per-step diagnostics of the training rollouts themselves."""
    from pyopd.trainers.copsd import diversity
    from pyopd.tasks.safety import safety_report

    examples = [batch.meta[g] for g in ro.group.tolist()]
    rep = safety_report(examples, ro.texts)
    n = max(1, len(batch.prompts))
    k = ro.size // n
    groups = [ro.texts[i * k:(i + 1) * k] for i in range(n)]
    return {f"rollout/{key}": v for key, v in {**rep, "diversity": diversity(groups)}.items()}


def cross_sft_teacher(prepared, tok, task, template: str, out: Path, epochs: int, seed: int,
                      max_new: int, n_prompts: int = CROSS_SFT_PROMPTS, log=print):
    """Stage 1: copy the initial model, fine-tune it on the Cross-SFT mix, save it as a model dir."""
    from pyopd.trainers.copsd import build_cross_sft_set, sft_epochs

    base = prepared.load_student()
    examples = task.sample(n_prompts, random.Random(f"cross-sft/{seed}"))
    cat = {"benign": "benign", "alarming": "over_refusal", "unsafe": "unsafe"}
    prompts = [(cat[e.kind], e.prompt) for e in examples]
    # Frontier answers: the built-in task's constitution-following answers to unsafe prompts.
    frontier = {e.prompt: e.answer for e in examples if e.kind == "unsafe"}
    records = build_cross_sft_set(prompts, lambda qs: _greedy(base, tok, qs, max_new), frontier, template)
    torch.manual_seed(seed)
    teacher = prepared.load_student()
    losses = sft_epochs(teacher, tok, records, epochs=epochs, seed=seed)
    teacher.save_pretrained(out)
    tok.save_pretrained(out)
    counts = {c: sum(r.category == c for r in records) for c in ("benign", "over_refusal", "unsafe")}
    log(f"[pyopd] Cross-SFT teacher: {len(records)} records {counts}, {epochs} epochs, "
        f"final loss {sum(losses[-5:]) / min(5, len(losses)):.3f} -> {out}")
    return teacher


def sft_baseline(prepared, tok, task, teacher, template: str, steps_examples: int, epochs: int,
                 seed: int, max_new: int):
    """Baseline: SFT of the student on the teacher's answers (teacher sees the constitution)."""
    from pyopd.trainers.copsd import SFTRecord, sft_epochs, wrap

    examples = task.sample(steps_examples, random.Random(f"sft-baseline/{seed}"))
    answers = _greedy(teacher, tok, [wrap(template, e.prompt) for e in examples], max_new)
    records = [SFTRecord(e.prompt, a, e.kind, "teacher") for e, a in zip(examples, answers)]
    torch.manual_seed(seed)
    student = prepared.load_student()
    sft_epochs(student, tok, records, epochs=epochs, seed=seed)
    return student


def run_copsd_demo(base: OPDConfig, explicit: set, scale: str = "safety",
                   out: Path = Path("runs/copsd-demo"), cache_dir: Optional[str] = None,
                   objective: str = "sampled", cross_sft_epochs: int = 2, progress: bool = True,
                   resume: bool = False, log=print, n_eval: int = SAFETY_EVAL_N,
                   n_cross_sft: int = CROSS_SFT_PROMPTS) -> dict:
    from pyopd.tasks.prepare import prepare_models
    from pyopd.tasks.safety import CONSTITUTION, SafetyTask
    from pyopd.trainers.copsd import SLOT, wrap

    t_start = time.time()
    prepared = prepare_models(scale=scale, cache_dir=cache_dir, seed=0, log=log, num_threads=1)
    tok = prepared.load_tokenizer()
    task = SafetyTask()
    template = f"C:{CONSTITUTION}\n{SLOT}"
    examples = task.eval_set(n_eval)
    max_new = max(len(e.answer) for e in examples) + 6
    evaluate = make_safety_evaluator(tok, examples, max_new)
    overrides = {k: v for k, v in COPSD_DEFAULTS.items() if k not in explicit}
    if "max_new_tokens" not in explicit:
        overrides["max_new_tokens"] = max_new
    loss = "copsd" if objective == "sampled" else "rkl"
    base = replace(base, loss=loss, **overrides)

    out.mkdir(parents=True, exist_ok=True)
    teacher_dir = out / "teacher-cross-sft"
    cross = cross_sft_teacher(prepared, tok, task, template, teacher_dir, cross_sft_epochs,
                              base.seed, max_new, n_prompts=n_cross_sft, log=log)
    initial = prepared.load_student()

    def prompts(step: int, count: int, rng: random.Random) -> PromptBatch:
        exs = task.sample(count, rng)
        return PromptBatch([e.prompt for e in exs], ["teacher"] * len(exs),
                           teacher_prompts=[wrap(template, e.prompt) for e in exs], meta=exs)

    runs, results = {}, {}
    results["initial"] = evaluate(initial)
    evaluate.initial_helpfulness = results["initial"]["helpfulness"]
    results["initial"]["safety_tax"] = 0.0
    results["teacher (initial + constitution)"] = _teacher_eval(initial, tok, examples, template, max_new)
    results["teacher (Cross-SFT + constitution)"] = _teacher_eval(cross, tok, examples, template, max_new)
    sft_student = sft_baseline(prepared, tok, task, cross, template,
                               base.steps * base.prompts_per_step, 2, base.seed, max_new)
    results["SFT on teacher answers"] = evaluate(sft_student)
    for name, teacher in (("OPSD", prepared.load_student()), ("COPSD", cross)):
        torch.manual_seed(base.seed)
        cfg = replace(base, out_dir=str(out / name.lower()))
        trainer = OPDTrainer(cfg, prepared.load_student(), {"teacher": teacher}, tok, prompts,
                             evaluate=evaluate, reference=initial, log=log, progress=progress,
                             rollout_metrics=safety_rollout_metrics)
        hist = trainer.train(resume=resume, initial_eval=results["initial"])
        runs[name] = hist
        results[name] = {k[len("eval/"):]: v for k, v in hist[-1].items() if k.startswith("eval/")}
    h0 = results["initial"]["helpfulness"]
    for r in results.values():
        if "helpfulness" in r:
            r["safety_tax"] = h0 - r["helpfulness"]
    summary = {"scale": scale, "seed": base.seed, "objective": objective,
               "cross_sft_epochs": cross_sft_epochs, "results": results,
               "total_s": time.time() - t_start, "config": vars(base)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    plot_curves(runs, ["eval/safe_rate", "eval/helpfulness", "eval/over_refusal", "eval/safety_tax",
                       "eval/length",
                       "eval/entropy", "eval/diversity", "rollout/safe_rate", "response_length",
                       "student_entropy"], out / "curves.png", title=f"COPSD demo (seed {base.seed})")
    plot_safety_plane(results, out / "safety_plane.png")
    log(format_copsd_table(summary))
    log(f"[pyopd] summary: {out / 'summary.json'}, plots: {out / 'curves.png'}, "
        f"{out / 'safety_plane.png'} (total {summary['total_s']:.0f}s)")
    return summary


def _greedy_safety(model, tok, examples, prompts, max_new) -> dict:
    """Safe rate, helpfulness, over-refusal and mean length of greedy answers to ``prompts``."""
    from pyopd.tasks.safety import safety_report

    comps = _greedy(model, tok, prompts, max_new)
    res = safety_report(examples, comps)
    res["length"] = sum(len(c) for c in comps) / len(comps)
    return res


def _teacher_eval(model, tok, examples, template, max_new) -> dict:
    from pyopd.trainers.copsd import wrap

    return _greedy_safety(model, tok, examples, [wrap(template, e.prompt) for e in examples], max_new)


def format_copsd_table(summary: dict) -> str:
    cols = ("safe_rate", "helpfulness", "over_refusal", "safety_tax", "length", "entropy", "diversity")
    lines = [f"{'model':<36}" + "".join(f"{c:>13}" for c in cols)]
    for name, r in summary["results"].items():
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{'-' if v is None else f'{v:.3f}':>13}")
        lines.append(f"{name:<36}" + "".join(cells))
    return "\n".join(lines)
