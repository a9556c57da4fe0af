"""The built-in COPSD demo: OPSD vs COPSD vs SFT on the synthetic safety task (CPU).

`pyopd copsd` with no model arguments calls `run_copsd_demo` with a config that
already holds the demo preset and the user's flags.
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


def demo_cross_sft_teacher(prepared, tok, task, template: str, out: Path, epochs: int, seed: int,
                           max_new: int, n_prompts: int = CROSS_SFT_PROMPTS, log=print):
    """Stage 1 on the built-in task: its prompts, the initial model's own answers, the task's
    constitution-following answers to unsafe prompts (standing in for a frontier model)."""
    from pyopd.trainers.copsd import cross_sft_teacher

    base = prepared.load_student()
    examples = task.sample(n_prompts, random.Random(f"cross-sft/{seed}"))
    cat = {"benign": "benign", "alarming": "over_refusal", "unsafe": "unsafe"}
    prompts = [(cat[e.kind], e.prompt) for e in examples]
    frontier = {e.prompt: e.answer for e in examples if e.kind == "unsafe"}
    return cross_sft_teacher(prepared.load_student, tok, prompts, lambda qs: _greedy(base, tok, qs, max_new),
                             frontier, template, out=out, epochs=epochs, seed=seed,
                             key={"base": str(prepared.student_dir), "max_new_tokens": max_new}, log=log)


def sft_baseline(prepared, tok, task, teacher, template: str, steps_examples: int, epochs: int,
                 seed: int, max_new: int):
    """Baseline: SFT of the student on the teacher's answers (teacher sees the constitution)."""
    from pyopd.trainers.copsd import wrap
    from pyopd.trainers.sft import SFTRecord, sft_epochs

    examples = task.sample(steps_examples, random.Random(f"sft-baseline/{seed}"))
    answers = _greedy(teacher, tok, [wrap(template, e.prompt) for e in examples], max_new)
    records = [SFTRecord(e.prompt, a, e.kind, "teacher") for e, a in zip(examples, answers)]
    torch.manual_seed(seed)
    student = prepared.load_student()
    sft_epochs(student, tok, records, epochs=epochs, seed=seed)
    return student


def default_max_new_tokens() -> int:
    """The demo's response budget: the longest eval answer (characters) plus 6."""
    from pyopd.tasks.safety import SafetyTask

    return max(len(e.answer) for e in SafetyTask().eval_set(SAFETY_EVAL_N)) + 6


def run_copsd_demo(cfg: OPDConfig, scale: str = "safety", out: Path = Path("runs/copsd-demo"),
                   cache_dir: Optional[str] = None, objective: str = "sampled", cross_sft_epochs: int = 3,
                   progress: bool = True, resume: bool = False, log=print, n_eval: int = SAFETY_EVAL_N,
                   n_cross_sft: int = CROSS_SFT_PROMPTS, split: str = "eval") -> dict:
    """OPSD and COPSD students (and the SFT baseline) trained with ``cfg`` (used as given).

    ``split``: evaluate on the task's fixed eval split, or on its dev split ("dev", for
    recipe sweeps). The toy's prompt space is small (16 alarming prompts in all), so the
    dev split is a different draw of the same prompts, not a disjoint set.
    """
    from pyopd.tasks.prepare import prepare_models
    from pyopd.tasks.safety import CONSTITUTION, SafetyTask
    from pyopd.trainers.copsd import SLOT, wrap

    if split not in ("eval", "dev"):
        raise ValueError(f"split must be 'eval' or 'dev', got {split!r}")
    t_start = time.time()
    prepared = prepare_models(scale=scale, cache_dir=cache_dir, seed=0, log=log, num_threads=1)
    tok = prepared.load_tokenizer()
    task = SafetyTask()
    template = f"C:{CONSTITUTION}\n{SLOT}"
    examples = task.eval_set(n_eval) if split == "eval" else task.dev_set(n_eval)
    max_new = default_max_new_tokens()  # evaluation and Cross-SFT: fixed by the task
    evaluate = make_safety_evaluator(tok, examples, max_new)
    base = cfg

    out.mkdir(parents=True, exist_ok=True)
    cross = demo_cross_sft_teacher(prepared, tok, task, template, out, cross_sft_epochs,
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
        trainer = OPDTrainer(cfg, prepared.load_student(), {"teacher": teacher}, tok, prompts, label=name,
                             evaluate=evaluate, reference=initial, log=log, progress=progress,
                             rollout_metrics=safety_rollout_metrics)
        hist = trainer.train(resume=resume, initial_eval=results["initial"])
        runs[name] = hist
        results[name] = {k[len("eval/"):]: v for k, v in hist[-1].items() if k.startswith("eval/")}
    h0 = results["initial"]["helpfulness"]
    for r in results.values():
        if "helpfulness" in r:
            r["safety_tax"] = h0 - r["helpfulness"]
    summary = {"scale": scale, "seed": base.seed, "objective": objective, "split": split,
               "cross_sft_epochs": cross_sft_epochs, "results": results,
               "total_s": time.time() - t_start, "machine": machine_info(), "config": vars(base)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    plot_curves(runs, ["eval/safe_rate", "eval/helpfulness", "eval/over_refusal", "eval/safety_tax",
                       "eval/length", "eval/length_benign",
                       "eval/entropy", "eval/diversity", "rollout/safe_rate", "response_length",
                       "student_entropy"], out / "curves.png", title=f"COPSD demo (seed {base.seed})")
    plot_safety_plane(results, out / "safety_plane.png")
    log(format_copsd_table(summary))
    log(f"[pyopd] summary: {out / 'summary.json'}, plots: {out / 'curves.png'}, "
        f"{out / 'safety_plane.png'} (total {summary['total_s']:.0f}s)")
    return summary


def machine_info() -> dict:
    """Where the numbers were measured: they depend on the CPU (and torch) at the last digits."""
    import os
    import platform

    from pyopd._machine import cpu_model

    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def _greedy_safety(model, tok, examples, prompts, max_new) -> dict:
    """Safe rate, helpfulness, over-refusal and mean length (characters) of greedy answers to
    ``prompts``: ``length`` over all of them, ``length_benign`` over the benign and alarming
    ones, which deserve a full answer (refusing unsafe prompts shortens ``length`` by design)."""
    from pyopd.tasks.safety import safety_report

    comps = _greedy(model, tok, prompts, max_new)
    res = safety_report(examples, comps)
    res["length"] = sum(len(c) for c in comps) / len(comps)
    helpful = [len(c) for e, c in zip(examples, comps) if e.kind != "unsafe"]
    res["length_benign"] = sum(helpful) / len(helpful) if helpful else float("nan")
    return res


def _teacher_eval(model, tok, examples, template, max_new) -> dict:
    from pyopd.trainers.copsd import wrap

    return _greedy_safety(model, tok, examples, [wrap(template, e.prompt) for e in examples], max_new)


def format_copsd_table(summary: dict) -> str:
    cols = ("safe_rate", "helpfulness", "over_refusal", "safety_tax", "length", "length_benign",
            "entropy", "diversity")
    lines = [f"{'model':<36}" + "".join(f"{c:>14}" for c in cols)]
    for name, r in summary["results"].items():
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{'-' if v is None else f'{v:.3f}':>14}")
        lines.append(f"{name:<36}" + "".join(cells))
    return "\n".join(lines)
