"""Shared pieces of the synthetic tasks: the example record, the task interface
and the final-answer parser every verifier uses.

Response format (all families): ``<worked steps>#<final answer>`` followed by
``<eos>``.  Prompts never contain ``#``, so a verifier may be given either the
completion alone or prompt + completion.
"""
from __future__ import annotations

import abc
import random
from collections.abc import Collection
from dataclasses import dataclass
from typing import Union

from pyopd.tasks.tokenizer import EOS, PAD

EVAL_SEED = 1234  # seed of every family's fixed held-out eval set
DEV_SEED = 4321  # seed of the dev split (recipe choices are made on it, never on the eval set)
RngLike = Union[random.Random, int, None]


@dataclass(frozen=True)
class Example:
    """One task instance.

    ``prompt`` is what the model is given, ``answer`` the full worked response
    SFT trains on (without ``<eos>``), ``target`` the final value a verifier
    checks, ``family`` the name of the task family that made it (multi-teacher
    OPD routes each sample to that family's teacher) and ``kind`` a finer label
    for diagnostics (``ops2``, ``sort``, ``unsafe``, ...).
    """

    prompt: str
    answer: str
    target: str
    family: str = ""
    kind: str = ""


def as_rng(rng: RngLike) -> random.Random:
    """A ``random.Random`` from a seed (``None`` means seed 0) or an existing one."""
    if isinstance(rng, random.Random):
        return rng
    if rng is None:
        return random.Random(0)
    if isinstance(rng, bool) or not isinstance(rng, int):
        raise TypeError(f"rng must be a random.Random, an int seed or None, got {type(rng).__name__}")
    return random.Random(rng)


def final_answer(completion: object) -> str | None:
    """The text after the first ``#`` up to the end of the line or ``<eos>``.

    Returns ``None`` when there is no ``#`` (or the input is not a string).
    Never raises.
    """
    if not isinstance(completion, str):
        return None
    head, sep, tail = completion.partition("#")
    if not sep:
        return None
    for stop in (EOS, PAD, "\n"):
        tail = tail.split(stop, 1)[0]
    return tail.strip()


class Task(abc.ABC):
    """A verifiable task family: ``sample`` examples, ``verify`` completions."""

    name: str = ""

    @abc.abstractmethod
    def make(self, rng: random.Random) -> Example:
        """Draw one random example."""

    @abc.abstractmethod
    def verify(self, example: Example, completion: str) -> bool:
        """True when ``completion`` ends in the correct final answer. Never raises."""

    def config(self) -> dict:
        """The parameters that define this task (part of the model-cache key)."""
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def sample(self, n: int, rng: RngLike = 0, exclude: Collection[str] = ()) -> list[Example]:
        """``n`` examples drawn with ``rng`` (a seed or a ``random.Random``).

        Prompts in ``exclude`` (e.g. the eval set's) are skipped, so training
        data can be kept disjoint from the held-out set.
        """
        r = as_rng(rng)
        out: list[Example] = []
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 100 * n + 1000:
                raise ValueError(f"{self.name}: cannot draw {n} examples outside `exclude`")
            ex = self.make(r)
            if ex.prompt not in exclude:
                out.append(ex)
        return out

    def eval_set(self, n: int = 256, seed: int = EVAL_SEED) -> list[Example]:
        """A fixed held-out set: the same ``n`` examples for the same seed."""
        return self.sample(n, random.Random(f"{self.name}/eval/{seed}"))

    def dev_set(self, n: int = 256, exclude: Collection[str] = (), seed: int = DEV_SEED) -> list[Example]:
        """A fixed dev split: ``n`` examples drawn apart from the eval set's stream, none in ``exclude``
        (pass the eval prompts, so the two splits share no prompt)."""
        return self.sample(n, random.Random(f"{self.name}/dev/{seed}"), exclude=frozenset(exclude))

    def max_new_tokens(self, margin: int = 8) -> int:
        """A generation budget: the longest eval-set answer (+ ``<eos>``) plus ``margin`` tokens."""
        return max(len(e.answer) for e in self.eval_set()) + 1 + margin

    def score(self, examples: list[Example], completions: list[str]) -> list[float]:
        """1.0 / 0.0 per completion (a verifiable reward)."""
        if len(examples) != len(completions):
            raise ValueError(f"{len(examples)} examples but {len(completions)} completions")
        return [float(self.verify(e, c)) for e, c in zip(examples, completions)]
