"""The optimizer and the learning-rate schedule (a pure function of the optimizer step)."""

from __future__ import annotations

import math

import torch

from rsc_dist.methods.base import ParamGroup
from rsc_dist.trainer.settings import OptimConfig, ScheduleConfig

# What a method's parameter group may set besides its parameters, per optimizer.
GROUP_SETTINGS = {"sgd": ("lr", "momentum", "nesterov", "weight_decay"), "adam": ("lr", "betas", "weight_decay")}


def build_optimizer(settings: OptimConfig, groups: list[ParamGroup]) -> torch.optim.Optimizer:
    """One optimizer over the method's named parameter groups (rsc_dist.methods.base.ParamGroup),
    each with optim.*'s settings unless its own say otherwise."""
    allowed = GROUP_SETTINGS[settings.name]
    param_groups = []
    for group in groups:
        unknown = sorted(set(group.settings) - set(allowed))
        if unknown:
            raise ValueError(f"parameter group {group.name!r} sets {unknown}, which optim.name={settings.name} "
                             f"does not have (it has {list(allowed)})")
        param_groups.append({"params": list(group.params), "name": group.name, **group.settings})
    if settings.name == "sgd":
        return torch.optim.SGD(param_groups, lr=settings.lr, momentum=settings.momentum, nesterov=settings.nesterov,
                               weight_decay=settings.weight_decay)
    return torch.optim.Adam(param_groups, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)


def lr_factor(sched: ScheduleConfig, optimizer_step: int, total_optimizer_steps: int) -> float:
    """Multiplier of the base learning rate at an optimizer step (a pure function)."""
    if sched.warmup_steps and optimizer_step < sched.warmup_steps:
        return (optimizer_step + 1) / sched.warmup_steps
    if sched.name == "constant":
        return 1.0
    if sched.name == "step":
        passed = sum(optimizer_step >= round(m * total_optimizer_steps) for m in sched.milestones)
        return sched.gamma**passed
    span = max(1, total_optimizer_steps - sched.warmup_steps)
    progress = min(1.0, (optimizer_step - sched.warmup_steps) / span)
    return 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(schedule: ScheduleConfig, optimizer, total_optimizer_steps: int):
    """Every parameter group's learning rate times lr_factor (one factor for all groups)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(schedule, step, total_optimizer_steps)
    )
