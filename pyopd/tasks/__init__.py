"""Built-in synthetic tasks, tokenizer and tiny models for the demo and the tests.

Everything is built in code and trained in-process; nothing is downloaded.

    >>> from pyopd.tasks import get_task, prepare_models
    >>> task = get_task("mixed")                  # arithmetic + string families
    >>> prepared = prepare_models("demo")         # trains once (~minutes), then cached
    >>> tok, student = prepared.load_tokenizer(), prepared.load_student()
    >>> teacher = prepared.load_teacher("mixed")  # or the specialists "arith" / "strings"
"""
from __future__ import annotations

from pyopd.tasks.arithmetic import ArithmeticTask
from pyopd.tasks.base import EVAL_SEED, Example, Task, final_answer
from pyopd.tasks.models import ModelSpec, build_model
from pyopd.tasks.prepare import SCALES, Prepared, default_cache_dir, prepare_models
from pyopd.tasks.recipe import evaluate, generate, train_sft
from pyopd.tasks.registry import TASKS, MixedTask, get_task
from pyopd.tasks.strings import StringTask
from pyopd.tasks.tokenizer import build_tokenizer

__all__ = [
    "EVAL_SEED", "SCALES", "TASKS",
    "ArithmeticTask", "Example", "MixedTask", "ModelSpec", "Prepared", "StringTask", "Task",
    "build_model", "build_tokenizer", "default_cache_dir", "evaluate", "final_answer", "generate",
    "get_task", "prepare_models", "train_sft",
]
