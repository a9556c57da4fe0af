"""Shared test helpers: devices, tolerances and verbose comparisons."""
from __future__ import annotations

import pytest
import torch

import pyopd

CUDA = pyopd.cuda_available()

# CPU always; CUDA when this build has the kernels and a device is visible.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not CUDA, reason="no CUDA device / CUDA build")]),
]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0,
                 what: str = "") -> None:
    """torch.testing-style check that prints max/mean error and where it occurs."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    same_nonfinite = (a.isnan() & e.isnan()) | ((a == e) & ~a.isfinite())
    err = (a - e).abs().masked_fill(same_nonfinite, 0.0)
    err = torch.where(err.isnan(), torch.full_like(err, float("inf")), err)
    bound = atol + rtol * e.abs().masked_fill(~e.isfinite(), 0.0)
    bad = err > bound
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements out of tolerance "
            f"(atol={atol}, rtol={rtol}); max err {err.max().item():.3e}, "
            f"mean err {err[err.isfinite()].mean().item():.3e}; first at {idx}: "
            f"got {a[idx].item()!r}, expected {e[idx].item()!r}")


def subprocess_env(**extra: str) -> dict:
    """Environment for a child `python -c ...` that imports the same pyopd as this process.

    Run the child with cwd outside the checkout: its `pyopd/` would shadow an
    installed build (it holds no compiled module in a fresh clone).
    """
    import os
    from pathlib import Path

    import pyopd

    where = str(Path(pyopd.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": where + (os.pathsep + path if path else ""), **extra}
