"""Multi-step integer arithmetic with a worked answer.

Prompt ``Q:3+4*2-5=?\\nA:``; answer ``3+8-5=11-5=6#6``: each step rewrites the
expression with one operation done (``*`` first, then ``+``/``-`` left to
right) and the final number follows ``#``.  Operands are digits; two ``*`` are
never adjacent, so every product is a one-digit times-table fact.  By default
no intermediate value is negative (``allow_negative=True`` lifts that).
"""
from __future__ import annotations

import random
import re

from pyopd.tasks.base import Example, Task, final_answer

_INT = re.compile(r"-?\d{1,12}")


def solve(nums: list[int], ops: list[str]) -> tuple[list[str], int]:
    """The expressions after each reduction step (the last is the value) and the smallest intermediate."""
    nums, ops = list(nums), list(ops)
    steps: list[str] = []
    lowest = min(nums)
    while ops:
        i = ops.index("*") if "*" in ops else 0
        a, b, op = nums[i], nums[i + 1], ops[i]
        nums[i : i + 2] = [a * b if op == "*" else a + b if op == "+" else a - b]
        del ops[i]
        lowest = min(lowest, nums[i])
        steps.append(render(nums, ops))
    return steps, lowest


def render(nums: list[int], ops: list[str]) -> str:
    """``[3, 4, 2], ['+', '*'] -> '3+4*2'``."""
    return "".join(f"{n}{o}" for n, o in zip(nums, ops + [""]))


class ArithmeticTask(Task):
    """Expressions of ``min_ops..max_ops`` operators over digits ``0..max_operand``.

    Difficulty grows with the number of operators (the number of worked steps)
    and with ``allow_negative``.  The default is two operators (about 5,600 distinct
    prompts): with one operator allowed, a held-out set of a few hundred prompts
    would hold most of the ~250 one-operator prompts, questions no model then trains on.
    """

    name = "arith"

    def __init__(self, min_ops: int = 2, max_ops: int = 2, max_operand: int = 9, ops: str = "+-*",
                 allow_negative: bool = False) -> None:
        if not 1 <= min_ops <= max_ops:
            raise ValueError(f"need 1 <= min_ops <= max_ops, got {min_ops}, {max_ops}")
        if not 1 <= max_operand <= 9:
            raise ValueError(f"max_operand must be a digit 1..9, got {max_operand}")
        if not ops or set(ops) - set("+-*"):
            raise ValueError(f"ops must be a non-empty subset of '+-*', got {ops!r}")
        self.min_ops, self.max_ops, self.max_operand, self.ops = min_ops, max_ops, max_operand, ops
        self.allow_negative = allow_negative

    def make(self, rng: random.Random) -> Example:
        while True:  # rejection-sample until no intermediate is negative (if required)
            k = rng.randint(self.min_ops, self.max_ops)
            ops: list[str] = []
            for _ in range(k):
                choices = [o for o in self.ops if not (o == "*" and ops and ops[-1] == "*")] or ["+"]
                ops.append(rng.choice(choices))
            nums = [rng.randint(0, self.max_operand) for _ in range(k + 1)]
            steps, lowest = solve(nums, ops)
            if self.allow_negative or lowest >= 0:
                break
        return Example(
            prompt=f"Q:{render(nums, ops)}=?\nA:",
            answer="=".join(steps) + "#" + steps[-1],
            target=steps[-1],
            family=self.name,
            kind=f"ops{k}",
        )

    def verify(self, example: Example, completion: str) -> bool:
        got = final_answer(completion)
        if got is None or not _INT.fullmatch(got):
            return False
        return int(got) == int(example.target)
