"""The built-in FiRe-OPD demo: OPD vs FiRe-OPD vs the exact reverse KL on the synthetic tasks (CPU).

`pyopd fire-opd` with no model arguments calls `run_demo` with a config that
already holds the demo preset and the user's flags: it prepares (or loads
from the cache) the student and the teacher(s) of the chosen setting, trains
one copy of the student with each objective from the same start, seed and
budget, evaluates every model on the same held-out prompts, prints a table
with standard errors and paired differences, and writes a plot.

Settings (``cfg.setting``), after the FiRe-OPD paper:

* ``single``: the teacher has the student's architecture and was trained
  further (it continues the student's SFT);
* ``strong-to-weak``: a larger teacher (3.3x the parameters);
* ``multi``: two specialist teachers (arithmetic, strings); each prompt is
  routed to its own family's teacher.

Evaluation: the headline is avg@k (k samples at T=1 per prompt, the fraction
correct), next to greedy accuracy, on the scale's eval split.  The seed sets
both the training stream and the evaluation samples.  Every model is scored on
the same prompts, so differences between rows are paired per prompt.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from pyopd.trainers.opd import OPDConfig, OPDTrainer, PromptBatch, dist_info
from pyopd.trainers.records import plot_curves

K = 4  # samples per prompt of the headline avg@k
CURVE_N = 256  # prompts of the cheaper evaluation logged during training (curves only)
Z95 = 1.959964


@dataclass(frozen=True)
class Setting:
    teachers: tuple[str, ...]  # prepared model names
    routed: bool  # True: each prompt goes to its family's teacher (the names are the families)
    about: str


SETTINGS: dict[str, Setting] = {
    "single": Setting(("same",), False, "teacher = the student's architecture, trained further"),
    "strong-to-weak": Setting(("mixed",), False, "teacher = a 3.3x larger model"),
    "multi": Setting(("arith", "strings"), True, "two specialist teachers, each prompt routed to its own"),
}


def splits(scale: str = "demo"):
    """(task, eval examples, dev examples) of ``scale``: disjoint prompt sets, both held out of
    every model's SFT and of the distillation prompts."""
    from pyopd.tasks.prepare import SCALES
    from pyopd.tasks.registry import get_task

    sc = SCALES[scale]
    task = get_task("mixed")
    test = task.eval_set(sc.eval_n)
    dev = task.dev_set(sc.dev_n or sc.eval_n, exclude=[e.prompt for e in test])
    return task, test, dev


def default_max_new_tokens() -> int:
    """The demo's response budget: the longest eval or dev answer in tokens, plus 4."""
    from pyopd.tasks.tokenizer import build_tokenizer

    tok = build_tokenizer()
    _, test, dev = splits("demo")
    return max(len(tok(e.answer)["input_ids"]) for e in test + dev) + 4


def _mean_se(xs) -> float:
    """Standard error of the mean of ``xs`` (sample std / sqrt(n))."""
    n = len(xs)
    if n < 2:
        return float("nan")
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def _binomial_se(ok) -> float:
    return _mean_se([float(bool(x)) for x in ok])


def eval_seed(seed: int) -> int:
    """The seed of the evaluation samples of a run with training seed ``seed``."""
    return (seed * 1_000_033 + 4_321) % (2**31)


def make_evaluator(task, tokenizer, examples, max_new_tokens: int, k: int = K, seed: int = 0,
                   per_prompt: bool = False):
    """Greedy accuracy (overall and per family) and avg@k / pass@k of k samples at T=1, all on
    ``examples``, with standard errors (prompts are the unit).  Sampling is seeded from ``seed``
    and leaves the global RNG as it was, so evaluating never changes a training run.
    ``per_prompt``: also return "_greedy" and "_avg" lists (one value per prompt, for paired
    comparisons)."""
    from pyopd.tasks.recipe import generate

    prompts = [e.prompt for e in examples]

    def evaluate(model) -> dict:
        completions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
        ok = task.score(examples, completions)
        res = {"accuracy": sum(ok) / len(ok), "accuracy_se": _binomial_se(ok)}
        for fam in sorted({e.family for e in examples}):
            idx = [i for i, e in enumerate(examples) if e.family == fam]
            res[f"accuracy_{fam}"] = sum(ok[i] for i in idx) / len(idx)
        if k > 0:
            state = torch.get_rng_state()
            torch.manual_seed(seed)
            samples = generate(model, tokenizer, [p for p in prompts for _ in range(k)],
                               max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_k=0)
            torch.set_rng_state(state)
            hits = task.score([e for e in examples for _ in range(k)], samples)
            per = [sum(hits[i * k:(i + 1) * k]) / k for i in range(len(examples))]
            res[f"avg@{k}"] = sum(per) / len(per)
            res[f"avg@{k}_se"] = _mean_se(per)
            res[f"pass@{k}"] = sum(p > 0 for p in per) / len(per)
            res[f"pass@{k}_se"] = _binomial_se([p > 0 for p in per])
            if per_prompt:
                res["_avg"] = per
        if per_prompt:
            res["_greedy"] = list(ok)
        return res

    return evaluate


def paired(a: Sequence[float], b: Sequence[float]) -> dict:
    """Mean of the per-prompt differences a - b, its standard error and 95% interval."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired comparison needs equal, non-empty lists, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    m, se = sum(d) / len(d), _mean_se(d)
    return {"diff": m, "se": se, "ci95": [m - Z95 * se, m + Z95 * se]}


def comparisons(names: Sequence[str]) -> list[tuple[str, str]]:
    """The pairs the table reports: every objective vs the start, and vs OPD when it ran."""
    pairs = [(n, "student (start)") for n in names]
    if "OPD" in names:
        pairs += [(n, "OPD") for n in names if n != "OPD"]
    return pairs


def paired_table(per_prompt: dict, names: Sequence[str]) -> dict:
    """{"A - B": {"headline": paired(...), "greedy": paired(...)}} for `comparisons(names)`."""
    out = {}
    for a, b in comparisons(names):
        out[f"{a} - {b}"] = {"headline": paired(per_prompt[a]["avg"], per_prompt[b]["avg"]),
                             "greedy": paired(per_prompt[a]["greedy"], per_prompt[b]["greedy"])}
    return out


def make_prompt_source(task, teacher_for, exclude=()):
    """Training prompts drawn fresh each step; ``exclude`` keeps the eval and dev prompts out."""
    excluded = frozenset(exclude)

    def prompts(step: int, count: int, rng: random.Random) -> PromptBatch:
        examples = task.sample(count, rng, exclude=excluded)
        return PromptBatch([e.prompt for e in examples], [teacher_for(e) for e in examples],
                           meta=examples)

    return prompts


def run_demo(cfg: OPDConfig, losses=("opd", "fire"), scale: str = "demo", out: Path = Path("runs/demo"),
             cache_dir: Optional[str] = None, setting: Optional[str] = None, progress: bool = True,
             resume: bool = False, split: str = "test", num_threads: Optional[int] = 1, log=print) -> dict:
    """Train one copy of the student per objective in ``losses`` with ``cfg`` (used as given).

    ``setting``: one of `SETTINGS` (default ``cfg.setting``).  ``split``: "test" (the eval
    split, what the demo reports) or "dev" (for choosing a recipe; never choose on "test").
    ``num_threads``: torch threads for the whole run (restored after; None: leave as is). The
    models are tiny: on the shared 2-core machine a training step took 0.5-1 s with one thread
    and 7-20 s with two while another process was busy.
    """
    threads = torch.get_num_threads()
    try:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        return _run_demo(cfg, losses, scale, out, cache_dir, setting, progress, resume, split, log)
    finally:
        torch.set_num_threads(threads)


def _run_demo(cfg, losses, scale, out, cache_dir, setting, progress, resume, split, log) -> dict:
    from pyopd.objectives import get_objective
    from pyopd.tasks.prepare import prepare_models

    setting = setting or cfg.setting
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {list(SETTINGS)}, got {setting!r}")
    if split not in ("test", "dev"):
        raise ValueError(f"split must be 'test' or 'dev', got {split!r}")
    t_start = time.time()
    task, test, dev = splits(scale)
    examples = test if split == "test" else dev
    spec = SETTINGS[setting]
    teacher_names = list(spec.teachers)
    if spec.routed:
        teacher_for = lambda e: e.family  # noqa: E731
    else:
        teacher_for = lambda e, _t=teacher_names[0]: _t  # noqa: E731
    main_rank = dist_info()[0] == 0
    # Only the models this setting uses; one thread while preparing (two shared cores thrash).
    prepared = prepare_models(scale=scale, cache_dir=cache_dir, seed=0, log=log, num_threads=1,
                              models=tuple(teacher_names), progress=progress and main_rank)
    t_prep = time.time() - t_start
    tok = prepared.load_tokenizer()
    max_new = default_max_new_tokens()  # fixed by the task
    evaluate = make_evaluator(task, tok, examples, max_new, k=K, seed=eval_seed(cfg.seed), per_prompt=True)
    curve_eval = make_evaluator(task, tok, examples[:: max(1, len(examples) // CURVE_N)], max_new, k=K,
                                seed=eval_seed(cfg.seed))
    teachers = {n: prepared.load_teacher(n) for n in teacher_names}
    base = cfg
    log(f"[pyopd] demo, setting {setting} ({spec.about}): teachers {'+'.join(teacher_names)}; "
        f"{base.steps} steps x {base.prompts_per_step} prompts x {base.n} samples, lr {base.lr:g}, "
        f"warmup {base.warmup_steps}, {base.lr_schedule}; seed {base.seed}; {split} split of {len(examples)} prompts")

    # Several processes (torchrun): every rank trains, rank 0 alone evaluates and writes.
    full, curve_start = {}, None
    if main_rank:
        for n, t in teachers.items():
            full[f"teacher {n}"] = evaluate(t)
        start_model = prepared.load_student()
        full["student (start)"] = evaluate(start_model)
        curve_start = curve_eval(start_model)
    runs, results = {}, {}
    for loss in losses:
        torch.manual_seed(base.seed)
        student = prepared.load_student()
        cfg = replace(base, loss=loss, out_dir=str(out / loss))
        source = make_prompt_source(task, teacher_for, exclude=[e.prompt for e in test + dev])
        reference = prepared.load_student() if get_objective(loss).needs_reference else None
        final: dict = {}
        trainer = None

        def evaluate_in_run(model, _final=final):
            """The curve evaluation (logged), and after the last step also the full one (kept
            here). Under FSDP every rank calls it in lockstep; rank 0 keeps the results."""
            if trainer is not None and trainer.step >= cfg.steps:  # noqa: B023 (called in this iteration)
                _final.update(evaluate(model))
            return curve_eval(model)

        trainer = OPDTrainer(cfg, student, teachers, tok, source, reference=reference,
                             evaluate=evaluate_in_run, log=log, progress=progress, label=NAMES.get(loss, loss))
        t0 = time.time()
        hist = trainer.train(resume=resume, initial_eval=curve_start)
        if not main_rank:
            continue
        wall = time.time() - t0
        name = NAMES.get(loss, loss)
        full[name] = dict(final) if final else evaluate(student)  # (resumed past the end: evaluate now)
        steps = [h for h in hist if "loss" in h]
        runs[loss] = hist
        results[loss] = {
            "keep_ratio": sum(h.get("keep_ratio", 1.0) for h in steps) / max(1, len(steps)),
            # total tokens over total step time (a mean of per-step rates swings with load)
            "tokens_per_s": sum(h["tokens"] for h in steps) / max(1e-9, sum(h["step_s"] for h in steps)),
            "wall_s": wall,
            "final_eval": {k: v for k, v in full[name].items() if not k.startswith("_")},
            # (the keys tools/summarize_runs.py reads)
            **{f"{when}{suffix}": ev.get(key) for when, ev in (("before", full["student (start)"]),
                                                                ("after", full[name]))
               for suffix, key in (("", "accuracy"), (f"_avg@{K}", f"avg@{K}"), (f"_pass@{K}", f"pass@{K}"))},
        }
    if not main_rank:
        return {}
    teacher_rows = [f"teacher {t}" for t in teacher_names]
    if spec.routed:  # each specialist row covers every prompt; the routed row is the teacher the student has
        fam = [e.family for e in examples]
        full[ROUTED] = _evaluation(*routed([full[f"teacher {f}"]["_avg"] for f in teacher_names],
                                           [full[f"teacher {f}"]["_greedy"] for f in teacher_names],
                                           teacher_names, fam), fam)
        teacher_rows.append(ROUTED)
    rows = {n: _row(full[n]) for n in ["student (start)"] + teacher_rows}
    rows.update({NAMES.get(loss, loss): _row(full[NAMES.get(loss, loss)], keep_ratio=r["keep_ratio"],
                                             tokens_per_s=r["tokens_per_s"]) for loss, r in results.items()})
    per_prompt = {n: {"avg": ev["_avg"], "greedy": ev["_greedy"]} for n, ev in full.items()}
    trained = [NAMES.get(x, x) for x in results]
    summary = {"scale": scale, "setting": setting, "split": split, "seed": base.seed,
               "eval_seed": eval_seed(base.seed), "eval_prompts": len(examples), "k": K,
               "teachers": teacher_names, "headline": f"avg@{K}", "rows": rows,
               "teacher_accuracy": {t: full[f"teacher {t}"]["accuracy"] for t in teacher_names},
               "families": sorted({e.family for e in examples}),
               "paired": paired_table(per_prompt, trained),
               "prepare_s": t_prep, "total_s": time.time() - t_start, "results": results,
               "config": vars(base)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "per_prompt.json").write_text(json.dumps(
        {"prompts": [e.prompt for e in examples], "families": [e.family for e in examples],
         "rows": per_prompt}))
    # "loss" is a PPO surrogate for the sampled-token objectives and the KL itself for the
    # exact ones: never on one axis.
    exact = [x for x in runs if get_objective(x).needs_teacher_logits]
    sampled = [x for x in runs if x not in exact]
    panels = {f"avg@{K} (T=1, {CURVE_N} eval prompts)": f"eval/avg@{K}",
              f"greedy accuracy ({CURVE_N} eval prompts)": "eval/accuracy",
              "teacher log-prob of samples": "teacher_logprob",
              "loss: PPO surrogate": ("loss", sampled), "loss: exact reverse KL": ("loss", exact),
              "keep ratio": "keep_ratio", "response length": "response_length",
              "student entropy": "student_entropy"}
    plot = plot_curves(runs, {k: v for k, v in panels.items() if not (isinstance(v, tuple) and not v[1])},
                       out / "curves.png", title=f"pyopd demo ({setting}, seed {base.seed})")
    log(format_table(summary))
    if plot is not None:
        log(f"[pyopd] curves: {plot}")
    log(f"[pyopd] summary: {out / 'summary.json'} (total {summary['total_s']:.0f}s)")
    return summary


ROUTED = "teachers (routed)"


def routed(avgs, greedys, teacher_names, families):
    """Per-prompt (avg, greedy) of the routed teacher: each prompt takes its family's teacher's values."""
    pick = {t: i for i, t in enumerate(teacher_names)}
    avg = [avgs[pick[f]][i] for i, f in enumerate(families)]
    greedy = [greedys[pick[f]][i] for i, f in enumerate(families)]
    return avg, greedy


def _evaluation(avg, greedy, families) -> dict:
    """An evaluation dict (as `make_evaluator` returns) from per-prompt avg@k and greedy results."""
    n = len(avg)
    res = {"accuracy": sum(greedy) / n, "accuracy_se": _binomial_se(greedy),
           f"avg@{K}": sum(avg) / n, f"avg@{K}_se": _mean_se(avg),
           f"pass@{K}": sum(a > 0 for a in avg) / n, f"pass@{K}_se": _binomial_se([a > 0 for a in avg]),
           "_avg": list(avg), "_greedy": list(greedy)}
    for fam in sorted(set(families)):
        idx = [i for i, f in enumerate(families) if f == fam]
        res[f"accuracy_{fam}"] = sum(greedy[i] for i in idx) / len(idx)
    return res


NAMES = {"opd": "OPD", "fire": "FiRe-OPD", "rkl": "full-vocab RKL", "fire-rkl": "FiRe + full RKL",
         "tip": "TIP", "exopd": "ExOPD"}


def _row(ev: dict, **extra) -> dict:
    """One model row of summary.json: the headline (avg@k of T=1 samples) and greedy accuracy, with SEs."""
    return {"headline": ev.get(f"avg@{K}"), "headline_se": ev.get(f"avg@{K}_se"),
            "greedy": ev.get("accuracy"), "greedy_se": ev.get("accuracy_se"),
            f"pass@{K}": ev.get(f"pass@{K}"), f"pass@{K}_se": ev.get(f"pass@{K}_se"),
            **{k: v for k, v in ev.items() if k.startswith("accuracy_") and k != "accuracy_se"}, **extra}


def _cell(v, se) -> str:
    return f"{'-':>15}" if v is None else f"{v:>7.3f} ± {se:.3f}"


def _interval(p: dict) -> str:
    lo, hi = p["ci95"]
    return f"{p['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def format_table(summary: dict) -> str:
    """The end-of-run table: every metric with its standard error, then the paired differences."""
    k = summary.get("k", K)
    lines = [f"{'model':<22} {f'avg@{k} (T=1)':>15} {'greedy acc.':>15} {f'pass@{k}':>15} "
             f"{'keep ratio':>10} {'tokens/s':>9}"]
    for name, r in summary["rows"].items():
        keep, tps = r.get("keep_ratio"), r.get("tokens_per_s")
        lines.append(f"{name:<22} {_cell(r['headline'], r['headline_se'])} {_cell(r['greedy'], r['greedy_se'])} "
                     f"{_cell(r[f'pass@{k}'], r[f'pass@{k}_se'])} {'-' if keep is None else f'{keep:.2f}':>10} "
                     f"{'-' if tps is None else f'{tps:.0f}':>9}")
    lines.append(f"(± one standard error over the {summary.get('eval_prompts')} {summary.get('split', 'test')} "
                 f"prompts; avg@{k}/pass@{k}: {k} samples per prompt at T=1; tokens/s = trained response "
                 f"tokens / step time)")
    if summary.get("paired"):
        lines.append("")
        lines.append(f"{'paired difference (same prompts)':<36} {f'avg@{k}, 95% interval':>26} "
                     f"{'greedy, 95% interval':>26}")
        for name, p in summary["paired"].items():
            lines.append(f"{name:<36} {_interval(p['headline']):>26} {_interval(p['greedy']):>26}")
    return "\n".join(lines)


# ---------------------------------------------------------------- several seeds


def combine_seeds(dirs: Sequence[Path]) -> dict:
    """Pool runs of one setting over seeds (each dir holds summary.json + per_prompt.json).

    Each row's per-prompt value is averaged over the seeds, then rows and paired
    differences are taken over prompts as in one run; ``per_seed`` keeps every
    seed's own paired differences, so the spread between training seeds is visible.
    """
    runs = []
    for d in dirs:
        d = Path(d)
        s = json.loads((d / "summary.json").read_text())
        pp = json.loads((d / "per_prompt.json").read_text())
        runs.append((s, pp))
    if not runs:
        raise ValueError("combine_seeds needs at least one run directory")
    first = runs[0]
    for s, pp in runs[1:]:
        if pp["prompts"] != first[1]["prompts"] or s["setting"] != first[0]["setting"]:
            raise ValueError("runs to combine must share the setting and the eval prompts")
    if SETTINGS[first[0]["setting"]].routed:  # runs made before the routed row existed: compose it
        for s, pp in runs:
            t = s["teachers"]
            if ROUTED not in pp["rows"]:
                a, g = routed([pp["rows"][f"teacher {x}"]["avg"] for x in t],
                              [pp["rows"][f"teacher {x}"]["greedy"] for x in t], t, pp["families"])
                pp["rows"][ROUTED] = {"avg": a, "greedy": g}
            if ROUTED not in s["rows"]:
                s["rows"][ROUTED] = {}
    names = [n for n in first[0]["rows"] if all(n in pp["rows"] for _, pp in runs)]
    names.sort(key=lambda n: 0 if n == "student (start)" else 1 if n.startswith("teacher") else 2)  # stable
    pooled = {n: {m: [sum(vals) / len(runs) for vals in zip(*(pp["rows"][n][m] for _, pp in runs))]
                  for m in ("avg", "greedy")} for n in names}
    rows = {n: {"headline": sum(v["avg"]) / len(v["avg"]), "headline_se": _mean_se(v["avg"]),
                "greedy": sum(v["greedy"]) / len(v["greedy"]), "greedy_se": _mean_se(v["greedy"])}
            for n, v in pooled.items()}
    trained = [n for n in names if n != "student (start)" and not n.startswith("teacher")]
    return {"setting": first[0]["setting"], "seeds": [s["seed"] for s, _ in runs],
            "eval_prompts": len(first[1]["prompts"]), "k": first[0].get("k", K), "rows": rows,
            "paired": paired_table(pooled, trained),
            "per_seed": {s["seed"]: {name: {m: p[m]["diff"] for m in p} for name, p in s["paired"].items()}
                         for s, _ in runs}}


def format_combined(c: dict) -> str:
    """Markdown tables of `combine_seeds`."""
    k = c["k"]
    lines = [f"setting **{c['setting']}**, seeds {c['seeds']}, {c['eval_prompts']} eval prompts "
             f"(per-prompt values averaged over the seeds; ± one standard error over prompts)", "",
             f"| model | avg@{k} (T=1) | greedy |", "|---|---|---|"]
    for n, r in c["rows"].items():
        lines.append(f"| {n} | {r['headline']:.3f} ± {r['headline_se']:.3f} | {r['greedy']:.3f} ± {r['greedy_se']:.3f} |")
    seeds = list(c["per_seed"])
    lines += ["", f"| paired difference | avg@{k} [95% interval] | greedy [95% interval] | "
              f"avg@{k} per seed ({', '.join(map(str, seeds))}) |", "|---|---|---|---|"]
    for name, p in c["paired"].items():
        per = ", ".join(f"{c['per_seed'][s][name]['headline']:+.3f}" for s in seeds if name in c["per_seed"][s])
        lines.append(f"| {name} | {_interval(p['headline'])} | {_interval(p['greedy'])} | {per} |")
    return "\n".join(lines)
