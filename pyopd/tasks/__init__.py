"""Built-in synthetic tasks, tokenizer and tiny models for the demo and the tests.

Everything is built in code and trained in-process; nothing is downloaded.

    >>> from pyopd.tasks import get_task, prepare_models
    >>> task = get_task("mixed")                  # arithmetic + string families
    >>> prepared = prepare_models("demo")         # trains once (~minutes), then cached
    >>> tok, student = prepared.load_tokenizer(), prepared.load_student()
    >>> teacher = prepared.load_teacher("same")   # or "mixed", or the specialists "arith" / "strings"

Demo scale (seed 0): a 0.34M-param student (vocab 100) given a short SFT; the
teachers: ``same`` (the student's SFT continued), specialists ``arith`` /
``strings`` (0.34M, vocab 112) and a 1.1M generalist ``mixed`` (vocab 112).
``prepared.describe()`` prints the measured accuracies of a cache entry.
"""
from __future__ import annotations

from pyopd.tasks.arithmetic import ArithmeticTask
from pyopd.tasks.base import DEV_SEED, EVAL_SEED, Example, Task, final_answer
from pyopd.tasks.models import ModelSpec, build_model
from pyopd.tasks.prepare import SCALES, Prepared, default_cache_dir, prepare_models
from pyopd.tasks.recipe import evaluate, generate, train_sft
from pyopd.tasks.registry import TASKS, MixedTask, get_task
from pyopd.tasks.safety import CONSTITUTION, REFUSAL, SafetyTask, is_refusal, safety_report, with_constitution
from pyopd.tasks.strings import StringTask
from pyopd.tasks.tokenizer import build_tokenizer

__all__ = [
    "CONSTITUTION", "DEV_SEED", "EVAL_SEED", "REFUSAL", "SCALES", "TASKS",
    "ArithmeticTask", "Example", "MixedTask", "ModelSpec", "Prepared", "SafetyTask", "StringTask", "Task",
    "build_model", "build_tokenizer", "default_cache_dir", "evaluate", "final_answer", "generate",
    "get_task", "is_refusal", "prepare_models", "safety_report", "train_sft", "with_constitution",
]
