"""FSDP2 for the trainer: shard a model's parameters across the ranks of torch.distributed.

`shard(model)` applies ``torch.distributed.fsdp.fully_shard`` to every
transformer block and then to the whole model, so each rank holds 1/world of
the parameters, gradients and optimizer state, and a block's parameters are
gathered only while it runs. What changes for the trainer (pyopd/trainers/opd.py):

- Gradients are **summed** over ranks, not averaged: every rank's loss is
  already divided by the global denominator (as in the replicated case).
- Every forward is a collective, so every rank runs the same number of them:
  generation keeps stepping until all ranks are done (transformers' own
  ``synced_gpus``, switched on by marking the model), evaluation runs on every
  rank (rank 0 alone reports), and a teacher is sharded only when every rank
  scores all its rows with it (one teacher; several routed teachers stay whole).
- The fused-linear path is off: it calls the model body and reads the
  ``lm_head`` weight outside the model's forward, where they are sharded.
- Checkpoints hold full (unsharded) tensors: the weights as safetensors and the
  optimizer state keyed by parameter name, so a run resumes with another
  number of processes, with or without sharding.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["block_modules", "full_model_state", "full_optimizer_state", "full_tensor", "is_sharded",
           "load_full_model_state", "load_optimizer_state", "shard"]


def is_sharded(model: torch.nn.Module) -> bool:
    """True when ``model`` was passed to `shard` (its parameters are DTensors)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def block_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the classes transformers names in ``_no_split_modules``
    (e.g. ``Qwen3DecoderLayer``), else every module of an ``nn.ModuleList`` of identical
    classes with parameters."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    if names:
        found = [m for m in model.modules() if type(m).__name__ in names]
        if found:
            return found
    out = []
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 1 and len({type(x) for x in m}) == 1:
            out.extend(x for x in m if any(True for _ in x.parameters()))
    return out


def shard(model: torch.nn.Module, mesh=None) -> torch.nn.Module:
    """Shard ``model`` in place with FSDP2 over all ranks (or ``mesh``); returns it
    (a model sharded already is returned as it is).

    Blocks first, then the root (embeddings, final norm, head). Gradients are
    summed over ranks (divide factor 1). The model is marked so that
    ``model.generate`` keeps every rank stepping until all have finished.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):  # e.g. one teacher shared by several trainers in a row
        return model
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("FSDP sharding needs torch.distributed initialised (run under torchrun)")
    if mesh is None:
        dev = next(model.parameters()).device.type
        mesh = init_device_mesh(dev, (dist.get_world_size(),))
    for block in block_modules(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for m in model.modules():
        if hasattr(m, "set_gradient_divide_factor"):
            m.set_gradient_divide_factor(1.0)
            # plain SUM collectives (the factor alone asks for PREMUL_SUM, which gloo lacks)
            m.set_force_sum_reduction_for_comms(True)
    model._is_fsdp_managed_module = True  # transformers: generate(synced_gpus=True)
    return model


def _options(full: bool, **kw):
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    distributed = dist.is_available() and dist.is_initialized()
    return StateDictOptions(full_state_dict=full, cpu_offload=full and distributed, **kw)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full, unsharded weights on the CPU (a collective: every rank calls it;
    with several ranks only rank 0 gets the tensors, the others an empty dict)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(True))


def load_full_model_state(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load full (unsharded) weights, read by every rank, into a sharded model."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, sd, options=_options(True, strict=False))


def full_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter name with full tensors (a collective when sharded)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=_options(True))


def _names_by_index(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[int, str]:
    names = {id(p): n for n, p in model.named_parameters()}
    order = [p for g in opt.param_groups for p in g["params"]]
    return {i: names[id(p)] for i, p in enumerate(order)}


def _rekey(osd: dict[str, Any], key: dict) -> dict[str, Any]:
    """An optimizer state dict with every parameter key mapped through ``key``."""
    return {"state": {key[k]: v for k, v in osd["state"].items()},
            "param_groups": [{**g, "params": [key[p] for p in g["params"]]} for g in osd["param_groups"]]}


def load_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, osd: dict[str, Any]) -> None:
    """Load an optimizer state saved either way (``opt.state_dict()``: parameters by index;
    `full_optimizer_state`: by name) into ``opt``, sharded or not."""
    by_index = any(isinstance(k, int) for k in osd.get("state", {})) or any(
        isinstance(p, int) for g in osd.get("param_groups", []) for p in g.get("params", []))
    if not is_sharded(model):
        if by_index:
            opt.load_state_dict(osd)
            return
        opt.load_state_dict(_rekey(osd, {n: i for i, n in _names_by_index(model, opt).items()}))
        return
    if by_index:  # saved by a replicated run: name the parameters first
        osd = _rekey(osd, _names_by_index(model, opt))
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, osd, options=_options(True))


def full_tensor(x: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective), or ``x`` itself."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x

