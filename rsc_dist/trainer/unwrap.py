"""The module inside a prepared model, and its whole state dict, without importing DeepSpeed in a
run that did not ask for it.

Accelerate's ``unwrap_model`` (and ``get_state_dict``, which calls it) imports DeepSpeed whenever
it is installed, to test for its engine: seconds of imports and a "Setting accelerator to CPU"
warning in the progress bar of a DDP or single-process run. Under DeepSpeed both go through
Accelerate, as they must (the engine, ZeRO-3's partitioned weights).
"""

from __future__ import annotations

import torch


def plain_module(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """``model`` without its DDP or torch.compile wrappers (Accelerate's mixed-precision forward
    is kept, as ``unwrap_model`` keeps it by default)."""
    if accelerator.state.deepspeed_plugin is not None:
        return accelerator.unwrap_model(model)
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile(model)
            model = model._orig_mod
        else:
            return model


def whole_state_dict(accelerator, model: torch.nn.Module) -> dict:
    """The unwrapped model's whole state dict. Call on every rank: under DeepSpeed ZeRO-3 it
    gathers the partitions (a collective)."""
    if accelerator.state.deepspeed_plugin is not None:
        return accelerator.get_state_dict(model)
    return plain_module(accelerator, model).state_dict()
