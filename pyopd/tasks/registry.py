"""Task registry and the mixed task (every family at once, for multi-teacher OPD)."""
from __future__ import annotations

import random
from collections.abc import Callable, Mapping

from pyopd.tasks.arithmetic import ArithmeticTask
from pyopd.tasks.base import EVAL_SEED, Example, Task
from pyopd.tasks.safety import SafetyTask
from pyopd.tasks.strings import StringTask


class MixedTask(Task):
    """Samples each example from a uniformly chosen family; ``example.family`` names it.

    ``verify`` dispatches on ``example.family``, so each sample can also be
    routed to that family's specialist teacher.
    """

    name = "mixed"

    def __init__(self, tasks: Mapping[str, Task] | None = None) -> None:
        tasks = dict(tasks) if tasks is not None else {"arith": ArithmeticTask(), "strings": StringTask()}
        if not tasks:
            raise ValueError("MixedTask needs at least one family")
        for key, task in tasks.items():
            if key != task.name:
                raise ValueError(f"family key {key!r} must equal the task's name {task.name!r}")
        self.tasks = tasks

    @property
    def families(self) -> list[str]:
        """Names of the families, in sampling order."""
        return list(self.tasks)

    def config(self) -> dict:
        return {"name": self.name, "tasks": {k: t.config() for k, t in self.tasks.items()}}

    def make(self, rng: random.Random) -> Example:
        return self.tasks[rng.choice(self.families)].make(rng)

    def verify(self, example: Example, completion: str) -> bool:
        task = self.tasks.get(example.family)
        return task is not None and task.verify(example, completion)

    def eval_set(self, n: int = 256, seed: int = EVAL_SEED) -> list[Example]:
        """The families' own eval sets, ``n`` split evenly, concatenated in family order."""
        k = len(self.tasks)
        sizes = [n // k + (i < n % k) for i in range(k)]
        return [e for task, m in zip(self.tasks.values(), sizes) for e in task.eval_set(m, seed)]


TASKS: dict[str, Callable[..., Task]] = {
    "arith": ArithmeticTask,
    "strings": StringTask,
    "mixed": MixedTask,
    "safety": SafetyTask,
}


def get_task(name: str, **kwargs: object) -> Task:
    """A task by name (``arith``, ``strings``, ``mixed``, ``safety``) with optional constructor arguments."""
    try:
        factory = TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}") from None
    return factory(**kwargs)
