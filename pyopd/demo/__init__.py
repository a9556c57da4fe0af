"""The built-in demos, one module per method: `fire_opd` (pyopd fire-opd) and `copsd` (pyopd copsd)."""
from __future__ import annotations

from pyopd.demo.fire_opd import make_evaluator, make_prompt_source, run_demo

__all__ = ["make_evaluator", "make_prompt_source", "run_demo"]
