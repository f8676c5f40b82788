"""Assembly of a run's machinery: the Accelerator, the model, optimizer and schedule, and the
DeepSpeed values Accelerate cannot infer."""

from __future__ import annotations

import datetime
import math
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from rsc_dist import engine, methods, observe
from rsc_dist.config import Config, ConfigError
from rsc_dist.models import build_model
from rsc_dist.plan import DataPlan

# Every collective waits at most this long (a rank that died leaves the others waiting).
COLLECTIVE_TIMEOUT_S = int(os.environ.get("RSC_DIST_TIMEOUT_S", "1800"))


def make_accelerator(config: Config, run_dir: Path) -> Accelerator:
    # Without CUDA, `accelerate launch --num_processes N` must not become N independent
    # single-process trainings: cpu=True makes Accelerate form a gloo group from WORLD_SIZE.
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available() and local_ranks > torch.cuda.device_count():
        raise ConfigError(f"{local_ranks} processes were started on this node but it has "
                          f"{torch.cuda.device_count()} GPU(s); pass --num_processes "
                          f"{torch.cuda.device_count()} (per node) to accelerate launch")
    precision = None if config.train.mixed_precision == "auto" else config.train.mixed_precision
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        gradient_accumulation_steps=config.train.grad_accum,
        step_scheduler_with_optimizer=False,  # the schedule counts optimizer steps, not ranks
        log_with=observe.tracker_name(config),
        project_dir=str(run_dir),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))],
    )


def build_training_model(config: Config, num_classes: int, accelerator: Accelerator, capacity: int,
                         num_domains: int | None = None):
    """The model with the configured method; ``capacity`` is the local forward batch (the size of
    a method's fixed-size gathers), ``num_domains`` the manifest's domain count."""
    distributed = accelerator.num_processes > 1
    if config.model.sync_bn and distributed and accelerator.device.type != "cuda":
        raise ConfigError("model.sync_bn=true needs GPUs (torch's SyncBatchNorm has no CPU kernel)")
    method = methods.build(config, process_group=torch.distributed.group.WORLD if distributed else None,
                           capacity=capacity, num_domains=num_domains)
    model = build_model(config.model.arch, num_classes, pretrained=config.model.pretrained, method=method,
                        freeze_bn=config.model.freeze_bn)
    if config.model.sync_bn and distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if config.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.model.compile:
        # In place (Module.compile): state-dict keys stay the same, so checkpoints load
        # with or without compile. The method itself stays eager.
        model.features.compile()
    return model


def training_objects(config: Config, plan: DataPlan, accelerator: Accelerator):
    """Model, optimizer and schedule, prepared by Accelerate (DDP or DeepSpeed)."""
    model = build_training_model(config, plan.manifest.num_classes, accelerator, plan.local_forward_batch,
                                 num_domains=len(plan.domains))
    optimizer = engine.build_optimizer(config, model)
    total_optimizer_steps = math.ceil(plan.total_steps / config.train.grad_accum)
    scheduler = engine.build_scheduler(config, optimizer, total_optimizer_steps)
    configure_deepspeed(accelerator, config, plan)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, scheduler


def configure_deepspeed(accelerator: Accelerator, config: Config, plan: DataPlan) -> None:
    """Fill the DeepSpeed values Accelerate would otherwise guess ("auto").

    Without a prepared DataLoader Accelerate cannot infer the micro-batch; its "auto" gradient
    clipping would silently clip at 1.0 (DDP runs do not clip); and a config file's
    accumulation steps would override train.grad_accum after the schedule was built.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    stage = int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))
    if stage == 3 and accelerator.num_processes > 1:
        raise ConfigError("DeepSpeed ZeRO-3 with several ranks is not supported: evaluation runs the "
                          "unwrapped model, whose partitioned weights need collectives that ranks with "
                          "different evaluation lengths do not reach together. Use ZeRO-1/2.")
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = plan.local_forward_batch
    plugin.deepspeed_config["gradient_accumulation_steps"] = config.train.grad_accum
    plugin.deepspeed_config["train_batch_size"] = plan.global_forward_batch * config.train.grad_accum
    plugin.deepspeed_config["gradient_clipping"] = 0.0
