"""Task registry and the mixed task (every family at once, for multi-teacher OPD)."""
from __future__ import annotations

import random
from collections.abc import Callable, Collection, Mapping, Sequence

from pyopd.tasks.arithmetic import ArithmeticTask
from pyopd.tasks.base import DEV_SEED, EVAL_SEED, Example, Task
from pyopd.tasks.rules import RuleFollowingTask
from pyopd.tasks.safety import SafetyTask
from pyopd.tasks.strings import StringTask


class MixedTask(Task):
    """Samples each example from a family chosen by ``weights`` (default uniform); ``example.family`` names it.

    ``verify`` dispatches on ``example.family``, so each sample can also be
    routed to that family's specialist teacher.
    """

    name = "mixed"

    def __init__(self, tasks: Mapping[str, Task] | None = None, weights: Sequence[float] | None = None) -> None:
        tasks = dict(tasks) if tasks is not None else {"arith": ArithmeticTask(), "strings": StringTask()}
        if not tasks:
            raise ValueError("MixedTask needs at least one family")
        for key, task in tasks.items():
            if key != task.name:
                raise ValueError(f"family key {key!r} must equal the task's name {task.name!r}")
        weights = tuple(float(w) for w in weights) if weights is not None else (1.0,) * len(tasks)
        if len(weights) != len(tasks) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"need one non-negative weight per family, got {weights!r}")
        self.tasks = tasks
        self.weights = weights

    @property
    def families(self) -> list[str]:
        """Names of the families, in sampling order."""
        return list(self.tasks)

    def config(self) -> dict:
        return {"name": self.name, "weights": self.weights, "tasks": {k: t.config() for k, t in self.tasks.items()}}

    def make(self, rng: random.Random) -> Example:
        return self.tasks[rng.choices(self.families, weights=self.weights)[0]].make(rng)

    def verify(self, example: Example, completion: str) -> bool:
        task = self.tasks.get(example.family)
        return task is not None and task.verify(example, completion)

    def max_new_tokens(self, margin: int = 8) -> int:
        return max(t.max_new_tokens(margin) for t in self.tasks.values())

    def eval_set(self, n: int = 256, seed: int = EVAL_SEED) -> list[Example]:
        """The families' own eval sets, ``n`` split evenly, concatenated in family order."""
        k = len(self.tasks)
        sizes = [n // k + (i < n % k) for i in range(k)]
        return [e for task, m in zip(self.tasks.values(), sizes) for e in task.eval_set(m, seed)]

    def dev_set(self, n: int = 256, exclude: Collection[str] = (), seed: int = DEV_SEED) -> list[Example]:
        """The families' own dev splits, ``n`` split evenly, concatenated in family order."""
        k = len(self.tasks)
        sizes = [n // k + (i < n % k) for i in range(k)]
        return [e for task, m in zip(self.tasks.values(), sizes) for e in task.dev_set(m, exclude, seed)]


TASKS: dict[str, Callable[..., Task]] = {
    "arith": ArithmeticTask,
    "strings": StringTask,
    "mixed": MixedTask,
    "safety": SafetyTask,
    "rules": RuleFollowingTask,
}


def get_task(name: str, **kwargs: object) -> Task:
    """A task by name (``arith``, ``strings``, ``mixed``, ``safety``) with optional constructor arguments."""
    try:
        factory = TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}") from None
    return factory(**kwargs)
