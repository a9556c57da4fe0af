"""String manipulation: reverse, sort, count a letter.

Prompts ``Q:reverse dcab\\nA:``, ``Q:sort dcab\\nA:``, ``Q:count a in banana\\nA:``.
Answers ``#bacd``, ``#abcd`` and, for counting, a running trace that copies
the word and writes the count after each hit: ``ba1na2na3#3``.
"""
from __future__ import annotations

import random
import string

from pyopd.tasks.base import Example, Task, final_answer

OPS: tuple[str, ...] = ("reverse", "sort", "count")


def count_trace(word: str, letter: str) -> str:
    """``('banana', 'a') -> 'ba1na2na3'``."""
    out, k = [], 0
    for c in word:
        out.append(c)
        if c == letter:
            k += 1
            out.append(str(k))
    return "".join(out)


class StringTask(Task):
    """Words of ``min_len..max_len`` letters drawn from the first ``n_letters`` of a-z."""

    name = "strings"

    def __init__(self, min_len: int = 3, max_len: int = 6, n_letters: int = 10, ops: tuple[str, ...] = OPS) -> None:
        if not 1 <= min_len <= max_len <= 9:
            raise ValueError(f"need 1 <= min_len <= max_len <= 9, got {min_len}, {max_len}")
        if not 2 <= n_letters <= 26:
            raise ValueError(f"n_letters must be in 2..26, got {n_letters}")
        if not ops or set(ops) - set(OPS):
            raise ValueError(f"ops must be a non-empty subset of {OPS}, got {ops!r}")
        self.min_len, self.max_len, self.ops = min_len, max_len, tuple(ops)
        self.letters = string.ascii_lowercase[:n_letters]

    def make(self, rng: random.Random) -> Example:
        op = rng.choice(self.ops)
        word = "".join(rng.choice(self.letters) for _ in range(rng.randint(self.min_len, self.max_len)))
        if op == "reverse":
            work, target = "", word[::-1]
        elif op == "sort":
            work, target = "", "".join(sorted(word))
        else:
            # Ask about a letter of the word most of the time, so counts are rarely all zero.
            letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(self.letters)
            work, target = count_trace(word, letter), str(word.count(letter))
        question = f"count {letter} in {word}" if op == "count" else f"{op} {word}"
        return Example(f"Q:{question}\nA:", f"{work}#{target}", target, family=self.name, kind=op)

    def verify(self, example: Example, completion: str) -> bool:
        got = final_answer(completion)
        return got is not None and got == example.target
