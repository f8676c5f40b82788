"""The optimizer and the learning-rate schedule (a pure function of the optimizer step)."""

from __future__ import annotations

import math

import torch
from torch import nn

from rsc_dist.config import Config


def build_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    opt = config.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if opt.name == "sgd":
        return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov,
                               weight_decay=opt.weight_decay)
    return torch.optim.Adam(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)


def lr_factor(config: Config, optimizer_step: int, total_optimizer_steps: int) -> float:
    """Multiplier of the base learning rate at an optimizer step (a pure function)."""
    sched = config.schedule
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


def build_scheduler(config: Config, optimizer, total_optimizer_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(config, step, total_optimizer_steps)
    )
