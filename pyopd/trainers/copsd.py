"""COPSD: Cross-SFT cold start, then constitution-conditioned on-policy distillation.

Stage 1 (`cross_sft`): the teacher is a copy of the model fine-tuned for a few
epochs (default 2) on a mix of the student's OWN answers to benign and
benign-but-alarming prompts and constitution-following answers to unsafe
prompts (from a stronger model or a given dataset), always with the
constitution in its context. It learns to keep the student's helpful
behaviour where the constitution does not object.

Stage 2: the student samples on the bare prompt; the frozen teacher scores
the same tokens with the constitution wrapped around the prompt. The loss is
`pyopd.losses.copsd_loss` (dense group advantage, PPO with dual clip, k3 KL to
the initial student) through the shared `OPDTrainer` (loss="copsd"), or the
analytic full-vocabulary reverse KL to the conditioned teacher (loss="rkl").
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from collections import Counter
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from pyopd.trainers.sft import SFTRecord, sft_epochs  # noqa: F401  (re-exported)

SLOT = "{user_query}"
CATEGORIES = ("benign", "over_refusal", "unsafe")

# Shipped with pyopd for real models; our own words. The built-in toy task uses
# the short rule in `pyopd.tasks.safety.CONSTITUTION`, which its models can read.
DEFAULT_CONSTITUTION = """You are a helpful assistant that follows this constitution.
1. Help fully and accurately with every request that is safe, including requests that
   merely mention a sensitive word, quote it, or ask about it for learning or safety.
2. Decline requests whose main purpose is to cause serious harm to people, property or
   systems (weapons, intrusion, theft, fraud, abuse). Decline briefly, without lecturing,
   and offer a safe alternative when there is one.
3. Do not refuse because a request looks alarming; judge what is actually asked.

User request:
{user_query}"""


class ConstitutionError(ValueError):
    """A constitution template that cannot be used."""


def load_constitution(path: Optional[str]) -> str:
    """The template text from ``path`` (the shipped default for None); checks its slot."""
    if path is None:
        return DEFAULT_CONSTITUTION
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConstitutionError(f"constitution file {str(p)!r} does not exist")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConstitutionError(f"constitution file {str(p)!r} is not UTF-8 text (byte {e.start})") from None
    return check_template(text, str(p))


def check_template(text: str, where: str = "constitution") -> str:
    if not text.strip():
        raise ConstitutionError(f"{where} is empty")
    n = text.count(SLOT)
    if n != 1:
        raise ConstitutionError(f"{where} must contain the slot {SLOT} exactly once (found {n})")
    return text


def wrap(template: str, user_query: str) -> str:
    """The teacher's context: the template with the user prompt in its slot."""
    return template.replace(SLOT, user_query)


# ----------------------------------------------------------------------------- Cross-SFT data


def build_cross_sft_set(prompts: Sequence[tuple[str, str]], student_answer: Callable[[list[str]], list[str]],
                        frontier_answers: dict[str, str], template: str) -> list[SFTRecord]:
    """Cross-SFT records from (category, user prompt) pairs.

    benign and over-refusal prompts take the student's own answer to the BARE
    prompt; unsafe prompts take the frontier (constitution-following) answer.
    Every record's prompt is the constitution-wrapped one: the constitution is
    only ever in the teacher's context.
    """
    check_template(template)
    bad = sorted({c for c, _ in prompts} - set(CATEGORIES))
    if bad:
        raise ValueError(f"unknown prompt categories {bad}; expected {CATEGORIES}")
    own = [q for c, q in prompts if c != "unsafe"]
    answers = dict(zip(own, student_answer(own))) if own else {}
    records = []
    for cat, q in prompts:
        if cat == "unsafe":
            if q not in frontier_answers:
                raise ValueError(f"no frontier answer for unsafe prompt {q!r}")
            records.append(SFTRecord(wrap(template, q), frontier_answers[q], cat, "frontier"))
        else:
            records.append(SFTRecord(wrap(template, q), answers[q], cat, "student"))
    return records


def cross_sft_teacher(load_base: Callable[[], object], tokenizer, prompts: Sequence[tuple[str, str]],
                      student_answer: Callable[[list[str]], list[str]], frontier_answers: dict[str, str],
                      template: str, *, out: Path, epochs: int = 2, seed: int = 0,
                      key: Optional[dict] = None, log: Callable[[str], None] = print):
    """Stage 1, used by the CLI and the demo: the Cross-SFT teacher, built once per recipe.

    The teacher is cached under ``out/teacher-cross-sft-<hash>``, the hash covering
    everything it is built from (constitution, prompts, frontier answers, epochs,
    seed and ``key``: the base model and generation settings), so another
    constitution or prompt set never reuses it. It is written into a temporary
    sibling and renamed into place, so a killed run leaves no half-written
    teacher; stale temporaries are removed.
    """
    recipe = {"template": template, "prompts": list(map(list, prompts)),
              "frontier": sorted(frontier_answers.items()), "epochs": epochs, "seed": seed,
              "key": key or {}}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    final = out / f"teacher-cross-sft-{digest}"
    if (final / "config.json").is_file() and (final / "recipe.json").is_file():
        from transformers import AutoModelForCausalLM

        log(f"[pyopd] Cross-SFT teacher: reusing {final}")
        return AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".teacher-cross-sft-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    records = build_cross_sft_set(prompts, student_answer, frontier_answers, template)
    torch.manual_seed(seed)
    teacher = load_base()
    losses = sft_epochs(teacher, tokenizer, records, epochs=epochs, seed=seed)
    tmp = out / f".teacher-cross-sft-{digest}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        teacher.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "recipe.json").write_text(json.dumps({"sha256_16": digest, **recipe}, indent=1))
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    counts = {c: sum(r.category == c for r in records) for c in CATEGORIES}
    log(f"[pyopd] Cross-SFT teacher: {len(records)} records {counts}, {epochs} epochs, "
        f"final loss {sum(losses[-5:]) / min(5, len(losses)):.3f} -> {final}")
    return teacher


# ----------------------------------------------------------------------------- diagnostics


def _ngrams(tokens: Sequence, n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(hyp: Sequence, refs: Sequence[Sequence], max_n: int = 4) -> float:
    """Sentence BLEU with add-one smoothing for n > 1 (Lin & Och 2004) and the brevity penalty."""
    if not hyp or not refs:
        return 0.0
    logs = []
    for n in range(1, max_n + 1):
        h = _ngrams(hyp, n)
        total = sum(h.values())
        if total == 0:
            break
        best = Counter()
        for r in refs:
            for g, c in _ngrams(r, n).items():
                best[g] = max(best[g], c)
        match = sum(min(c, best[g]) for g, c in h.items())
        if n == 1:
            if match == 0:
                return 0.0
            logs.append(math.log(match / total))
        else:
            logs.append(math.log((match + 1) / (total + 1)))
    ref_len = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    bp = 1.0 if len(hyp) > ref_len else math.exp(1 - ref_len / len(hyp))
    return bp * math.exp(sum(logs) / len(logs))


def self_bleu(group: Sequence[Sequence]) -> float:
    """Mean BLEU of each response against the others of its group (1.0 = all identical)."""
    if len(group) < 2 or all(list(g) == list(group[0]) for g in group):
        return 1.0  # identical (also all-empty) responses have no diversity
    return sum(bleu(g, group[:i] + group[i + 1:]) for i, g in enumerate(group)) / len(group)


def diversity(groups: Sequence[Sequence[Sequence]]) -> float:
    """1 - self-BLEU, averaged over groups of responses to one prompt."""
    groups = [g for g in groups if len(g) >= 2]
    if not groups:
        return float("nan")
    return 1.0 - sum(self_bleu(list(g)) for g in groups) / len(groups)
