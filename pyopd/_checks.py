"""Argument checks shared by the pyopd ops (and meant for the losses).

Every error names the argument and, for numbers, the range the kernels can
represent. The kernels compute in float32 for every input dtype except
float64, so a numeric argument must be finite AND keep the quantities the
kernels derive from it (1 / temperature, (1 + alpha)(1 + beta), ...) finite
in float32; otherwise every output would silently be NaN.

Under torch.compile a Python number may be traced symbolically (with
``dynamic=True`` a float argument becomes an unspecialised value, an int a
SymInt), and `math.isfinite` or a branch on it cannot be traced with
``fullgraph=True``. While tracing, the scalar checks therefore return the
value unchanged, and the custom op that receives it repeats the same check on
the concrete value every time the compiled code runs (see `pyopd.ops.vocab`
and `pyopd.ops.signals`), so nothing is skipped, only moved to run time.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence

import torch

__all__ = [
    "FLOAT32_MAX",
    "FLOAT32_TINY",
    "FLOAT_DTYPES",
    "choice",
    "fire_coefficients",
    "floating_2d",
    "integer",
    "inv_temperature",
    "is_symbolic",
    "leading",
    "like",
    "logits",
    "mask_like",
    "number",
    "optional_flag",
    "percentage",
    "per_row",
    "temperature",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # 3.4028e38
FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)  # 1.1755e-38, smallest normal
# Temperatures whose reciprocal is a normal float32: below the range 1/T
# overflows to inf, above it 1/T is subnormal or 0 and every row becomes uniform.
TEMPERATURE_MIN = 1.0 / FLOAT32_MAX  # ~2.94e-39
TEMPERATURE_MAX = 1.0 / FLOAT32_TINY  # ~8.51e37
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def is_symbolic(v: Any) -> bool:
    """True while torch.compile traces, or for a SymInt / SymFloat / SymBool: no Python check then."""
    return torch.compiler.is_compiling() or isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool))


def _range_text(lo: Optional[float], lo_open: bool, hi: Optional[float], hi_open: bool) -> str:
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    a = "-inf" if lo is None else f"{lo:g}"
    b = "inf" if hi is None else f"{hi:g}"
    if lo is None:
        left = "("
    if hi is None:
        right = ")"
    return f"{left}{a}, {b}{right}"


def number(name: str, v: Any, *, lo: Optional[float] = None, lo_open: bool = False,
           hi: Optional[float] = None, hi_open: bool = False) -> Any:
    """A finite real number within the given bounds, as float (passes through while tracing).

    Bools are rejected (``True`` is not a probability or a temperature).
    """
    if is_symbolic(v):
        return v
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"{name} must be finite, got {f}")
    if lo is not None and (f <= lo if lo_open else f < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo:g}, got {f:g} "
                         f"(allowed: {_range_text(lo, lo_open, hi, hi_open)})")
    if hi is not None and (f >= hi if hi_open else f > hi):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi:g}, got {f:g} "
                         f"(allowed: {_range_text(lo, lo_open, hi, hi_open)})")
    return f


def integer(name: str, v: Any, *, lo: Optional[int] = None, hi: Optional[int] = None) -> Any:
    """A Python int (not bool) within [lo, hi] (passes through while tracing)."""
    if is_symbolic(v):
        return v
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    i = int(v)
    if (lo is not None and i < lo) or (hi is not None and i > hi):
        lo_s = "-inf" if lo is None else str(lo)
        hi_s = "inf" if hi is None else str(hi)
        raise ValueError(f"{name} must be an int in [{lo_s}, {hi_s}], got {i}")
    return i


def temperature(v: Any, name: str = "temperature") -> Any:
    """A temperature whose reciprocal the kernels can represent (a normal float32)."""
    if is_symbolic(v):
        return v
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    t = float(v)
    if not (t > 0.0 and math.isfinite(t)):
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    if not TEMPERATURE_MIN <= t <= TEMPERATURE_MAX:
        raise ValueError(
            f"{name} must lie in [{TEMPERATURE_MIN:.3g}, {TEMPERATURE_MAX:.3g}] so that "
            f"1/{name} is a normal float32 (the kernels scale logits by it), got {t!r}")
    return t


def inv_temperature(v: Any) -> float:
    """Check a concrete 1/temperature as the kernels receive it (inside the custom ops)."""
    f = float(v)
    if not (math.isfinite(f) and FLOAT32_TINY <= f <= FLOAT32_MAX):
        # Name the user-facing argument: 1/temperature is derived from it.
        t = math.inf if f == 0.0 else 0.0 if f == math.inf else 1.0 / f  # nan stays nan
        raise ValueError(
            f"temperature must lie in [{TEMPERATURE_MIN:.3g}, {TEMPERATURE_MAX:.3g}] so that "
            f"1/temperature is a normal float32; got 1/temperature = {f!r} (temperature {t!r})")
    return f


def percentage(name: str, v: Any) -> Any:
    """A finite percentage in [0, 100]."""
    if is_symbolic(v):
        return v
    f = number(name, v)
    if not 0.0 <= f <= 100.0:
        raise ValueError(f"{name} must be a percentage in [0, 100], got {f:g}")
    return f


def fire_coefficients(alpha: Any, beta: Any) -> tuple[Any, Any]:
    """FiRe-OPD's alpha, beta >= 0 with the largest weight (1 + alpha)(1 + beta) finite in float32."""
    a = number("alpha", alpha, lo=0.0)
    b = number("beta", beta, lo=0.0)
    if is_symbolic(a) or is_symbolic(b):
        return a, b
    if (1.0 + a) * (1.0 + b) > FLOAT32_MAX:
        raise ValueError(
            f"alpha and beta are too large: the largest token weight (1 + alpha)(1 + beta) = "
            f"{(1.0 + a) * (1.0 + b):.3g} must be <= {FLOAT32_MAX:.4g} (float32 max), "
            f"got alpha={a:g}, beta={b:g}")
    return a, b


def choice(name: str, v: Any, options: Sequence[str]) -> str:
    if not isinstance(v, str) or v not in options:
        opts = " or ".join(repr(o) for o in options)
        raise ValueError(f"{name} must be {opts}, got {v!r}")
    return v


def optional_flag(name: str, v: Any) -> Optional[bool]:
    """None, True or False (no truthy stand-ins such as 1 or 'yes')."""
    if v is not None and not isinstance(v, bool):
        raise TypeError(f"{name} must be None, True or False, got {v!r}")
    return v


# ---- tensors ------------------------------------------------------------------------


def _tensor(name: str, x: Any, optional: bool = False) -> None:
    if not isinstance(x, torch.Tensor):
        what = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name} must be {what}, got {type(x).__name__}")


def floating_2d(name: str, x: Any) -> torch.Tensor:
    """A floating-point [batch, seqlen] tensor."""
    _tensor(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), "
                        f"got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, seqlen), got {tuple(x.shape)}")
    return x


def like(name: str, x: Any, ref: torch.Tensor, ref_name: str, *, floating: bool = True) -> torch.Tensor:
    """A tensor with the shape and device of `ref` (floating point unless told otherwise)."""
    _tensor(name, x)
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), "
                        f"got {x.dtype}")
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")
    return x


def mask_like(x: Any, ref: torch.Tensor, ref_name: str, name: str = "mask") -> Optional[torch.Tensor]:
    """None, or a bool / integer / floating mask shaped like `ref` (nonzero = valid)."""
    if x is None:
        return None
    _tensor(name, x, optional=True)
    if x.is_complex():
        raise TypeError(f"{name} must be bool, integer or floating (nonzero = valid), got {x.dtype}")
    return like(name, x, ref, ref_name, floating=False)


def per_row(name: str, x: Any, rows: int, device: torch.device, *, kind: str,
            what: str = "the per-token tensors") -> torch.Tensor:
    """A [rows] tensor, one entry per rollout: kind 'int' (integer ids) or 'bool'."""
    _tensor(name, x)
    if kind == "int" and x.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if kind == "bool" and x.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {x.dtype}")
    if x.dim() != 1 or x.shape[0] != rows:
        raise ValueError(f"{name} must have shape ({rows},) (one entry per rollout), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but {what} are on {device}")
    return x


# ---- logits and per-token tensors of the vocabulary ops -----------------------------


def logits(name: str, x: Any) -> torch.Tensor:
    """[N, V] or [B, T, V] float logits on the CPU or a CUDA device, with V > 0 and N > 0."""
    _tensor(name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape [N, V] or [B, T, V], got {tuple(x.shape)}")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be on the CPU or a CUDA device, got {x.device}")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension (V = 0)")
    if x.numel() == 0:
        raise ValueError(f"{name} has no rows (shape {tuple(x.shape)}); pass at least one token")
    return x


def leading(name: str, x: Any, lead: Sequence[int], device: torch.device, kind: str) -> Optional[torch.Tensor]:
    """None, or a tensor shaped like the logits' leading dims: kind 'tokens' (integer ids),
    'mask' (bool) or 'grad' (floating upstream gradient)."""
    if x is None:
        return None
    _tensor(name, x, optional=True)
    if tuple(x.shape) != tuple(lead):
        raise ValueError(f"{name} must have shape {tuple(lead)} (the logits' leading dims), "
                         f"got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the logits are on {device}")
    if kind == "mask" and x.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True where the token counts), got {x.dtype}")
    if kind == "tokens" and x.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor of token ids, got {x.dtype}")
    if kind == "grad" and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (an upstream gradient), got {x.dtype}")
    return x
