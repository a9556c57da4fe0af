"""OPD methods behind one interface, looked up by name.

Every module in this package defines one objective (a subclass of
`Objective` decorated with `@register`) and is imported here automatically:
adding a method means adding one file (plus its test); the trainer, the CLI
and the engine integrations find it by name. See `base.py` for the interface
and `forward_kl.py` for a minimal worked example.
"""
from __future__ import annotations

import importlib
import pkgutil

from pyopd.objectives.base import (
    MicroBatch,
    Objective,
    ScoredBatch,
    Scores,
    Signals,
    micro_ids,
    micro_partition,
    register,
    shared_denominators,
    slice_rows,
)
from pyopd.objectives.base import _REGISTRY

for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _m.name != "base" and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")


def objective_names() -> tuple[str, ...]:
    """Every registered objective, in a stable order."""
    return tuple(sorted(_REGISTRY))


def get_objective(name: str) -> type[Objective]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; known: {list(objective_names())}") from None


def make_objective(cfg) -> Objective:
    """The objective named by ``cfg.loss``, configured by ``cfg``."""
    return get_objective(cfg.loss)(cfg)


__all__ = [
    "MicroBatch",
    "Objective",
    "ScoredBatch",
    "Scores",
    "Signals",
    "get_objective",
    "make_objective",
    "micro_ids",
    "micro_partition",
    "objective_names",
    "register",
    "shared_denominators",
    "slice_rows",
]
