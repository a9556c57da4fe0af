"""Every option of an OPD run, defined once: default, help, allowed range, commands.

`OPDConfig` is the single home of defaults. The command line (`pyopd.cli`) is
derived from its fields, and the few places that want other defaults (a
command, the built-in demo) declare them as *presets* that are applied
before the user's flags, so a flag the user gives always wins:

    dataclass default  <  COMMAND_DEFAULTS[command]  <  demo preset  <  user flags

`OPDConfig.validate()` checks every field against its declared range (finite
numbers only, integers where counts are meant), so a bad value stops a run
before anything is written, with a message that names the option.

This module imports nothing heavy (no torch): `pyopd -h` stays fast.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Optional

BOTH = ("fire-opd", "copsd")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
PRESETS = ("paper", "released")
FIRE_OPD_SETTINGS = ("single", "strong-to-weak", "multi")  # pyopd.demo.fire_opd.SETTINGS


def option(default: Any, help: str, *, lo: Optional[float] = None, hi: Optional[float] = None,
           lo_open: bool = False, hi_open: bool = False, choices: Optional[tuple] = None,
           commands: tuple = BOTH, group: str = "method", optional: bool = False,
           flag: bool = True, nargs: Optional[int] = None):
    """A config field with what the CLI and the validator need to know about it.

    ``lo``/``hi``: the allowed range (``*_open``: bound excluded); ``optional``:
    None is allowed (and means "off"); ``commands``: the subcommands that show
    the flag; ``flag=False``: not on the command line (set by code only).
    """
    meta = dict(help=help, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, choices=choices,
                commands=commands, group=group, optional=optional, flag=flag, nargs=nargs)
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


# --fused-linear (see OPDConfig.fused_linear and pyopd.trainers.rollout.grad_in_forward)
FUSED_LINEAR_MODES: tuple[str, ...] = ("auto", "on", "recompute", "grad-in-forward", "off")


@dataclass
class OPDConfig:
    """Hyperparameters of one OPD run; defaults follow the FiRe-OPD paper where it gives one."""

    # ---- method
    loss: str = option("fire", "objective of a run with real models", commands=("fire-opd",))
    preset: str = option("paper", "'paper': the papers' equations with pyopd's fixes; 'released': "
                         "reproduce the authors' released code numerically", choices=PRESETS)
    percentile: float = option(20.0, "FiRe-OPD: drop rollouts below this percentile of the "
                               "length-normalised teacher log-prob", lo=0.0, hi=100.0,
                               commands=("fire-opd",))
    alpha: float = option(1.0, "FiRe-OPD: teacher-confidence weight", lo=0.0, hi=1e6,
                          commands=("fire-opd",))
    beta: float = option(1.0, "FiRe-OPD: student-confusion weight", lo=0.0, hi=1e6,
                         commands=("fire-opd",))
    weight_norm: str = option("trajectory", "FiRe-OPD: normalise token weights to mean 1 per "
                              "trajectory (paper Eq. 8) or over the batch (released code)",
                              choices=("trajectory", "batch"), commands=("fire-opd",))
    clip: float = option(0.2, "PPO clip ratio eps: ratio clipped to [1-eps, 1+eps]", lo=0.0, hi=1.0,
                         lo_open=True)
    dual_clip: Optional[float] = option(None, "PPO dual clip c > 1 (bounds the loss of negative "
                                        "advantages at -c A); off when not given", lo=1.0,
                                        lo_open=True, hi=1e6, optional=True)
    agg: str = option("token-mean", "loss aggregation over tokens", choices=AGG_MODES)
    exopd_lambda: float = option(1.25, "ExOPD: reward scale lambda (1 = OPD, > 1 extrapolates past "
                                 "the teacher)", lo=0.0, hi=100.0, commands=("fire-opd",))
    tip_rho: float = option(0.5, "TIP: fraction of tokens kept", lo=0.0, lo_open=True, hi=1.0,
                            commands=("fire-opd",))
    kl_coef: float = option(0.005, "COPSD: coefficient of the k3 KL to the initial student",
                            lo=0.0, hi=100.0, commands=("copsd",))
    reward_clip: tuple = option((-3.0, 5.0), "COPSD: per-token reward clip LOW HIGH", lo=-1e4,
                                hi=1e4, commands=("copsd",), nargs=2)
    reward_bonus: float = option(0.02, "COPSD: per-token reward bonus", lo=-10.0, hi=10.0,
                                 commands=("copsd",))
    setting: str = option("single", "built-in demo: 'single' (the teacher is the student's architecture "
                          "trained further), 'strong-to-weak' (a 3.3x larger teacher) or 'multi' (two "
                          "specialist teachers, each prompt routed to its own); not for real models",
                          choices=FIRE_OPD_SETTINGS, commands=("fire-opd",), group="demo")
    # ---- optimisation
    lr: float = option(1e-4, "AdamW learning rate", lo=0.0, lo_open=True, hi=1.0,
                       group="optimisation")
    weight_decay: float = option(0.0, "AdamW weight decay", lo=0.0, hi=1.0, group="optimisation")
    warmup_steps: int = option(0, "linear learning-rate warmup (optimizer steps)", lo=0,
                               group="optimisation")
    lr_schedule: str = option("constant", "learning-rate schedule after warmup",
                              choices=("constant", "cosine"), group="optimisation")
    max_grad_norm: float = option(1.0, "gradient-norm clip", lo=0.0, lo_open=True, hi=1e6,
                                  group="optimisation")
    steps: int = option(40, "rollout batches (training steps)", lo=1, group="optimisation")
    prompts_per_step: int = option(16, "prompts sampled per step", lo=1, group="optimisation")
    n: int = option(4, "responses sampled per prompt", lo=1, group="optimisation")
    micro_batch: int = option(16, "rows per forward/backward (memory only: never changes the "
                              "result)", lo=1, group="optimisation")
    mini_batches: int = option(1, "optimizer steps per rollout batch", lo=1, group="optimisation")
    max_new_tokens: int = option(48, "longest sampled response (tokens)", lo=1, group="optimisation")
    temperature: float = option(1.0, "sampling temperature; the same T scores the old, teacher and "
                                "reference log-probs and enters the losses", lo=1e-3, hi=100.0,
                                group="optimisation")
    top_p: float = option(1.0, "nucleus sampling", lo=0.0, lo_open=True, hi=1.0,
                          group="optimisation")
    fused_linear: str = option("auto", "score and differentiate from the hidden states and the lm_head "
                               "weight (pyopd.fused_linear_*) instead of [tokens, vocab] logits: 'auto' (when "
                               "one micro-batch's logits would exceed 256 MiB), 'on' (always), 'off'. For the "
                               "rkl objectives 'auto' and 'on' take the gradient in the forward pass "
                               "(pyopd.fused_linear_reverse_kl_loss: 4 matmuls, as many as the materialised "
                               "logits) when the lm_head is float32, and recompute the logits in backward "
                               "(6 matmuls, float32 sums bounded to 64 MiB blocks) when it is bf16/fp16, "
                               "where the former's float32 [V, H] running sum would outweigh the logits; "
                               "'grad-in-forward' and 'recompute' force one of the two. Models whose head "
                               "is not a plain linear map always use logits",
                               choices=FUSED_LINEAR_MODES, group="optimisation")
    fsdp: bool = option(False, "under torchrun: shard the student's parameters, gradients and optimizer "
                        "state across the processes with FSDP2 (and the teacher and reference when "
                        "every rank scores all rows with them); checkpoints stay full, so a run "
                        "resumes with any number of processes, sharded or not",
                        group="optimisation")
    # ---- run
    eval_every: int = option(10, "evaluate every N steps (0: only at the start and the end)",
                             lo=0, group="run")
    save_every: int = option(10, "checkpoint every N steps (0: never)", lo=0, group="run")
    keep_last: int = option(2, "checkpoints kept", lo=1, group="run")
    seed: int = option(0, "seed of the training stream", lo=0, hi=2**63 - 1, group="run")
    out_dir: str = option("runs/opd", "output directory", group="run", flag=False)

    def validate(self) -> None:
        """Raise ValueError naming the first field outside its declared range."""
        from pyopd.objectives import objective_names

        for f in fields(self):
            check_field(f, getattr(self, f.name))
        if self.loss not in objective_names():
            raise ValueError(f"loss must be one of {objective_names()}, got {self.loss!r}")
        lo, hi = self.reward_clip
        if not lo < hi:
            raise ValueError(f"reward_clip must be (low, high) with low < high, got {self.reward_clip}")
        if self.prompts_per_step * self.n < self.mini_batches:
            raise ValueError("mini_batches must not exceed prompts_per_step * n")

    def to_dict(self) -> dict:
        return asdict(self)


def check_field(f, value) -> None:
    """Check one config value against its field's declared type and range."""
    meta, name = f.metadata, f.name
    if value is None:
        if meta.get("optional"):
            return
        raise ValueError(f"{name} must be given")
    if meta.get("choices") is not None:
        if value not in meta["choices"]:
            raise ValueError(f"{name} must be one of {list(meta['choices'])}, got {value!r}")
        return
    if meta.get("nargs"):
        if not isinstance(value, (tuple, list)) or len(value) != meta["nargs"]:
            raise ValueError(f"{name} must be {meta['nargs']} numbers, got {value!r}")
        for v in value:
            check_number(name, v, meta)
        return
    default = f.default if f.default is not MISSING else None
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
        return
    if isinstance(default, int):
        if not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        check_number(name, value, meta)
    elif isinstance(default, float) or (default is None and meta.get("lo") is not None):
        check_number(name, value, meta)


def check_number(name: str, v, meta: dict) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} must be a number, got {v!r}")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (v <= lo if meta.get("lo_open") else v < lo):
        raise ValueError(f"{name} must be {'>' if meta.get('lo_open') else '>='} {lo} "
                         f"(allowed: {describe_range(meta)}), got {v}")
    if hi is not None and (v >= hi if meta.get("hi_open") else v > hi):
        raise ValueError(f"{name} must be {'<' if meta.get('hi_open') else '<='} {hi} "
                         f"(allowed: {describe_range(meta)}), got {v}")


def describe_range(meta: dict) -> str:
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is None and hi is None:
        return "any finite number"
    if hi is None:
        return f"{'>' if meta.get('lo_open') else '>='} {_g(lo)}"
    left = "(" if meta.get("lo_open") else "["
    right = ")" if meta.get("hi_open") else "]"
    return f"{left}{'-inf' if lo is None else _g(lo)}, {'inf' if hi is None else _g(hi)}{right}"


def _g(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


# ---- presets: defaults that differ per command / for the built-in demo ---------------

COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {
    "fire-opd": {"loss": "fire", "out_dir": "runs/fire-opd"},
    # COPSD's paper: dual clip 3 on the PPO surrogate.
    "copsd": {"loss": "copsd", "dual_clip": 3.0, "out_dir": "runs/copsd"},
}

# The built-in demos: small budgets for 2 CPU cores (max_new_tokens comes from the task).
DEMO_DEFAULTS: dict[str, dict[str, Any]] = {
    # Chosen on the dev split (bench/results/demo/sweep-2026-11-28.md): plain OPD has no group
    # baseline, so one sample from each of many prompts; the largest budget that stays under
    # 5 minutes on 2 cores once the models are cached.
    "fire-opd": dict(steps=60, prompts_per_step=256, n=1, lr=3e-4, warmup_steps=6, lr_schedule="cosine",
                     eval_every=20, save_every=20, micro_batch=64, out_dir="runs/fire-opd-demo"),
    "copsd": dict(steps=60, prompts_per_step=16, n=4, lr=5e-4, eval_every=15, save_every=15,
                  micro_batch=24, dual_clip=3.0, out_dir="runs/copsd-demo"),
}


def resolve(command: str, user: dict[str, Any], demo: bool = False,
            demo_extra: Optional[dict[str, Any]] = None) -> OPDConfig:
    """The config of one run: presets in order, then the user's values (which always win)."""
    names = {f.name for f in fields(OPDConfig)}
    unknown = sorted(set(user) - names)
    if unknown:
        raise ValueError(f"unknown config fields {unknown}")
    kw: dict[str, Any] = dict(COMMAND_DEFAULTS.get(command, {}))
    if demo:
        kw.update(DEMO_DEFAULTS.get(command, {}))
        kw.update(demo_extra or {})
    kw.update(user)
    if isinstance(kw.get("reward_clip"), list):
        kw["reward_clip"] = tuple(kw["reward_clip"])
    return OPDConfig(**kw)


def objective_catalog() -> dict[str, str]:
    """name -> one-line summary of every objective module in `pyopd.objectives`, read without
    importing them (their classes import torch; help must not).

    A test checks that this agrees with the imported registry.
    """
    import ast
    from pathlib import Path

    found: dict[str, str] = {}
    for path in sorted((Path(__file__).parent / "objectives").glob("*.py")):
        if path.name.startswith("_") or path.name == "base.py":
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if not isinstance(node, ast.ClassDef):
                continue
            if not any(getattr(d, "id", None) == "register" for d in node.decorator_list):
                continue
            attrs = {t.id: stmt.value.value for stmt in node.body if isinstance(stmt, ast.Assign)
                     for t in stmt.targets if isinstance(t, ast.Name) and isinstance(stmt.value, ast.Constant)}
            if "name" in attrs:
                found[attrs["name"]] = attrs.get("summary", "")
    return dict(sorted(found.items()))


def default_for(name: str, command: str, demo: bool) -> Any:
    """The value a field takes when the user does not set it."""
    if demo and name in DEMO_DEFAULTS.get(command, {}):
        return DEMO_DEFAULTS[command][name]
    if name in COMMAND_DEFAULTS.get(command, {}):
        return COMMAND_DEFAULTS[command][name]
    f = next(f for f in fields(OPDConfig) if f.name == name)
    return f.default if f.default is not MISSING else f.default_factory()
