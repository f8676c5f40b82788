"""Assembly of a run's machinery: the Accelerator, the model, optimizer and schedule, and the
DeepSpeed values Accelerate cannot infer."""

from __future__ import annotations

import datetime
import math
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from rsc_dist import methods
from rsc_dist.averaging.averager import Averager
from rsc_dist.averaging.fragments import Fragments
from rsc_dist.config import Config, ConfigError
from rsc_dist.core.cpus import cpu_cores, threads_per_process
from rsc_dist.models.build import build_model
from rsc_dist.models.weights import weights_fingerprint
from rsc_dist.observe.identity import tracker_name
from rsc_dist.trainer import optim
from rsc_dist.trainer.plan import DataPlan
from rsc_dist.trainer.step import Trainables

METHOD_PREFIX = "method."  # state-dict keys of a method's own modules (network.method)
# Every collective waits at most this long (a rank that died leaves the others waiting).
COLLECTIVE_TIMEOUT_S = int(os.environ.get("RSC_DIST_TIMEOUT_S", "1800"))


def deepspeed_requested(env=os.environ) -> bool:
    """True when the launcher asked for DeepSpeed (a DEEPSPEED accelerate config or --use_deepspeed)."""
    return env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(config: Config, run_dir: Path | None) -> Accelerator:
    """The Accelerator of a run on the ranks the launcher started, after the device checks, with
    every collective bounded by COLLECTIVE_TIMEOUT_S. ``run_dir`` None: no tracker and no project
    folder (rsc_dist.evaluate, which trains nothing and logs nothing)."""
    check_device_requests(config)
    use_deepspeed = deepspeed_requested()
    if use_deepspeed:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError("the launch config asks for DeepSpeed (distributed_type: DEEPSPEED) but "
                              "deepspeed is not installed: bash launch/venv.sh (the default install "
                              "includes it), or launch without a DeepSpeed config") from None
        use_this_environments_ninja()
        use_this_environments_extension_cache()
    precision = None if config.train.mixed_precision == "auto" else config.train.mixed_precision
    group = {"timeout": datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)}
    if use_deepspeed and not torch.cuda.is_available():
        # Named, or Accelerate sees no backend for a CPU without cpu=True and counts one process.
        group["backend"] = "gloo"
    accelerator = Accelerator(
        # Without CUDA, `accelerate launch --num_processes N` must not become N independent
        # single-process trainings: cpu=True makes Accelerate form a gloo group from WORLD_SIZE.
        # Not under DeepSpeed: Accelerate drops the DeepSpeed plugin when cpu=True, while
        # DeepSpeed's own CPU accelerator forms the (gloo) group itself.
        cpu=not torch.cuda.is_available() and not use_deepspeed,
        mixed_precision=precision,
        gradient_accumulation_steps=config.train.grad_accum,
        step_scheduler_with_optimizer=False,  # the schedule counts optimizer steps, not ranks
        log_with=None if run_dir is None else tracker_name(config),
        project_dir=None if run_dir is None else str(run_dir),
        kwargs_handlers=[InitProcessGroupKwargs(**group)],
    )
    if use_deepspeed and accelerator.state.deepspeed_plugin is None:  # never a silent DDP run
        raise ConfigError("the launch config asks for DeepSpeed but Accelerate did not engage it "
                          f"(distributed type {accelerator.distributed_type}); nothing was run")
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        raise ConfigError(f"the launcher started {expected} ranks (WORLD_SIZE) but they formed a group of "
                          f"{accelerator.num_processes}; nothing was run: start with accelerate launch or torchrun")
    if accelerator.device.type == "cpu":
        # After the Accelerator, which may set its own count (MULTI_CPU without OMP_NUM_THREADS).
        torch.set_num_threads(cpu_threads(config)[0])
    return accelerator


def cpu_threads(config: Config, env=os.environ) -> tuple[int, str]:
    """(intra-op threads of this rank on a CPU device, why that many).

    train.cpu_threads when set; otherwise the cores this process may use divided by the ranks on
    its node (LOCAL_WORLD_SIZE, which torchrun and rsc_dist.trainer.cpu_launch set; 1 when
    absent), the rule the sweep's local launcher divides cores by. OMP_NUM_THREADS cannot be
    read as the user's choice: accelerate launch sets it to 1 unless its own CPU mode is on.
    """
    if config.train.cpu_threads:
        return config.train.cpu_threads, "train.cpu_threads"
    local_ranks = int(env.get("LOCAL_WORLD_SIZE", "1"))
    cores = cpu_cores()
    return threads_per_process(cores, local_ranks), f"{cores} core(s) / {local_ranks} rank(s) on this node"


def use_this_environments_ninja(env=os.environ) -> None:
    """Put the directory of the ninja installed with this Python (the `ninja` package, a
    DeepSpeed dependency) first on PATH, so DeepSpeed's JIT-built ops (on CPU ranks, its
    shared-memory comm op, built when the process group forms) are always built by the same ninja.

    torch.utils.cpp_extension runs whatever `ninja` PATH finds, and two ninja versions record
    the build commands differently: a run started through an activated environment (whose ninja
    PATH finds first) and one started as `.venv/bin/python` (the system's ninja) would each take
    the other's build for stale and recompile the op (about 45 s, under a lock every DeepSpeed
    process on the machine waits for).
    """
    try:
        import ninja
    except ImportError:  # torch then uses the ninja PATH finds
        return
    if not ninja.BIN_DIR:
        return
    rest = [d for d in env.get("PATH", "").split(os.pathsep) if d and d != ninja.BIN_DIR]
    env["PATH"] = os.pathsep.join([ninja.BIN_DIR, *rest])


def use_this_environments_extension_cache(env=os.environ) -> Path | None:
    """Keep DeepSpeed's JIT-built ops (on CPU ranks its shared-memory comm op, about 45 s to
    build) in this environment's own folder, ``<virtual environment>/torch_extensions``; the
    folder set, or None where nothing was changed.

    torch builds them under ~/.cache/torch_extensions/pyXY_cuZZ/NAME by default, one folder per
    op for every environment of the user: a second checkout's .venv (its own torch and DeepSpeed
    paths, so other build commands) took the other's build for stale and rebuilt it, and each
    switch back rebuilt again. TORCH_EXTENSIONS_DIR set by the user is kept; outside a virtual
    environment, or in one that cannot be written, torch's default stays.
    """
    if env.get("TORCH_EXTENSIONS_DIR") or sys.prefix == sys.base_prefix or not os.access(sys.prefix, os.W_OK):
        return None
    folder = Path(sys.prefix) / "torch_extensions"
    env["TORCH_EXTENSIONS_DIR"] = str(folder)
    return folder


def check_device_requests(config: Config, env=os.environ) -> None:
    """Stop (ConfigError) or warn when a GPU-only request meets a machine without CUDA: what was
    asked for runs as asked, stops with the reason, or runs on the CPU as a stand-in with a note."""
    if torch.cuda.is_available():
        local_ranks = int(env.get("LOCAL_WORLD_SIZE", "1"))
        if local_ranks > torch.cuda.device_count():
            raise ConfigError(f"{local_ranks} processes were started on this node but it has "
                              f"{torch.cuda.device_count()} GPU(s); pass --num_processes "
                              f"{torch.cuda.device_count()} (per node) to accelerate launch")
        return
    ranks = int(env.get("WORLD_SIZE", "1"))
    launcher_precision = env.get("ACCELERATE_MIXED_PRECISION", "no")
    precision = launcher_precision if config.train.mixed_precision == "auto" else config.train.mixed_precision
    if ranks > 1 and config.train.mixed_precision == "auto" and launcher_precision != "no" \
            and not env.get("RSC_DIST_CPU_RANK") and not deepspeed_requested(env):
        # accelerate_config.yaml and multinode_ddp.yaml (bf16, one rank per GPU) are GPU configs;
        # the CPU-rank configs say mixed_precision 'no'.
        raise ConfigError(f"{ranks} ranks were started with a GPU launch config (mixed_precision "
                          f"{launcher_precision}, one rank per GPU) but this machine has no CUDA GPU; for "
                          "CPU ranks use --config_file launch/accelerate/cpu_2proc.yaml (fp32, gloo)")
    if precision == "fp16":
        raise ConfigError("mixed_precision fp16 needs a CUDA GPU (loss scaling); this machine has none: "
                          "use --train.mixed_precision=no, or bf16 (CPU autocast, slow)")
    if config.model.sync_bn and ranks > 1:
        raise ConfigError("model.sync_bn=true needs GPUs (torch's SyncBatchNorm has no CPU kernel); "
                          "this machine has no CUDA GPU: drop --model.sync_bn")
    notes = []
    if precision == "bf16":
        notes.append("mixed_precision bf16 runs as CPU autocast (as asked; slower than fp32 on most CPUs)")
    if config.model.sync_bn:
        notes.append("model.sync_bn=true with one process is plain BatchNorm (nothing to synchronize)")
    if config.data.decode == "device":
        notes.append("data.decode=device decodes and augments in the training process on the CPU "
                     "(no CUDA GPU; data.decode=workers spreads it over the loader workers)")
    if int(env.get("RANK", "0")) == 0:
        for note in notes:
            print(f"rsc_dist: no CUDA GPU: {note}", file=sys.stderr, flush=True)


def build_training_model(config: Config, num_classes: int, accelerator: Accelerator, *, capacity: int,
                         num_domains: int, source_domains: tuple[int, ...] = (),
                         grad_accum: int | None = None) -> tuple[torch.nn.Module, methods.Method]:
    """The network (backbone, head, the method's own modules) and the configured method.

    ``capacity``: the local forward batch (the size of a method's fixed-size gathers);
    ``num_domains``: the manifest's domain count; ``source_domains``: the manifest indices of
    the training domains (empty: all of them). The method's modules are built after the
    backbone, so the backbone's initialization draws the same numbers for every method.
    """
    distributed = accelerator.num_processes > 1
    network = build_model(config.model.arch, num_classes, pretrained=config.model.pretrained,
                          freeze_bn=config.model.freeze_bn, dropout=config.model.dropout,
                          image_size=config.data.image_size, head_blocks=config.model.head_blocks)
    context = methods.MethodContext(
        seed=config.run.seed, num_classes=num_classes, num_domains=num_domains, source_domains=tuple(source_domains),
        feature_dim=network.feature_dim, optimizer=config.optim.name,
        locations_reach_logits=network.locations_reach_logits,
        process_group=torch.distributed.group.WORLD if distributed else None, capacity=capacity,
        balanced=config.data.sampling == "balanced",
        grad_accum=config.train.grad_accum if grad_accum is None else grad_accum, zero_stage=zero_stage(accelerator))
    method = methods.build(config.algorithm, getattr(config, config.algorithm, None), context)
    network.method = method.build_modules()
    if config.model.sync_bn and distributed:
        network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
    if config.model.channels_last:
        network = network.to(memory_format=torch.channels_last)
    if config.model.compile:
        # In place (Module.compile): state-dict keys stay the same, so checkpoints load
        # with or without compile. The method itself stays eager.
        network.features.compile()
    return network, method


def training_objects(config: Config, plan: DataPlan, accelerator: Accelerator) -> Trainables:
    """Model, optimizer and schedule, prepared by Accelerate (DDP or DeepSpeed), and the method."""
    network, method = build_training_model(config, plan.manifest.num_classes, accelerator,
                                           capacity=plan.local_forward_batch, num_domains=len(plan.domains),
                                           source_domains=plan.source_indices)
    initial = weights_fingerprint({k: v for k, v in network.state_dict().items() if not k.startswith(METHOD_PREFIX)})
    optimizer = optim.build_optimizer(config.optim, method.parameter_groups(network))
    total_optimizer_steps = math.ceil(plan.total_steps / config.train.grad_accum)
    scheduler = optim.build_scheduler(config.schedule, optimizer, total_optimizer_steps)
    configure_deepspeed(accelerator, config, plan)
    model, optimizer = accelerator.prepare(network, optimizer)
    return Trainables(model, network, optimizer, scheduler, method, averaging=build_averager(config, accelerator, model),
                      init_fingerprint=initial)


def build_averager(config: Config, accelerator: Accelerator, model) -> Averager | None:
    """The run's weight average (train.averaging) over the prepared ``model``'s trainable
    weights, each rank over its own share of them (None without averaging)."""
    if config.train.averaging == "none":
        return None
    fragments = Fragments(accelerator, model, zero_stage(accelerator))
    return Averager(config.train.averaging, config.averaging, fragments, config.train.selection)


def configure_deepspeed(accelerator: Accelerator, config: Config, plan: DataPlan) -> None:
    """Fill the DeepSpeed values Accelerate would otherwise guess ("auto").

    Without a prepared DataLoader Accelerate cannot infer the micro-batch; its "auto" gradient
    clipping would silently clip at 1.0 (DDP runs do not clip); and a config file's
    accumulation steps would override train.grad_accum after the schedule was built.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    use_deepspeed_mixed_precision(plugin.deepspeed_config)
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = plan.local_forward_batch
    plugin.deepspeed_config["gradient_accumulation_steps"] = config.train.grad_accum
    plugin.deepspeed_config["train_batch_size"] = plan.global_forward_batch * config.train.grad_accum
    plugin.deepspeed_config["gradient_clipping"] = 0.0
    if zero_stage(accelerator) == 3:
        # checkpoints/best holds whole weights: get_state_dict gathers the partitions (in the
        # weights' own dtype, fp32 here, despite the option's "16bit" name).
        plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True


def use_deepspeed_mixed_precision(deepspeed_config: dict) -> None:
    """bf16 for a BatchNorm CNN under DeepSpeed: torch autocast with fp32 weights, not DeepSpeed's
    own bf16 mode.

    DeepSpeed's bf16 mode (what Accelerate writes for --mixed_precision bf16) casts the weights
    to bf16 but leaves BatchNorm's running statistics in fp32: backward fails with "Expected
    running_mean to have type BFloat16" (seen on an H200). Its torch_autocast section keeps the
    weights and the optimizer in fp32 and runs the forward under torch.autocast, as DDP's bf16
    does (BatchNorm stays fp32 there).
    """
    enabled = [key for key in ("bf16", "fp16") if str(deepspeed_config.get(key, {}).get("enabled")).lower() == "true"]
    if not enabled:
        return
    if enabled == ["fp16"]:
        raise ConfigError("DeepSpeed with fp16 is not supported for these BatchNorm CNNs (its fp16 mode "
                          "casts the weights and breaks BatchNorm): use --mixed_precision bf16 or no")
    deepspeed_config["bf16"] = {"enabled": False}
    deepspeed_config.pop("fp16", None)
    # No module is listed as safe to communicate in bf16: gradients are reduced in fp32, as DDP
    # reduces them under autocast, so the two routes compute the same step.
    deepspeed_config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}


def zero_stage(accelerator: Accelerator) -> int | None:
    """The DeepSpeed ZeRO stage of this run, None without DeepSpeed."""
    plugin = accelerator.state.deepspeed_plugin
    return None if plugin is None else int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def evaluation_model(config: Config, num_classes: int, accelerator: Accelerator, model):
    """The module evaluation runs: the prepared model, or under ZeRO-3 a plain copy with the whole
    weights on every rank.

    ZeRO-3 gathers a layer's partitioned weights inside its forward, a collective; ranks whose
    evaluation shares hold different numbers of batches would wait on each other there. The
    copy (one gather per evaluation, every rank at the same point) runs its forwards without
    collectives. A ResNet fits whole on every rank.
    """
    if zero_stage(accelerator) != 3:
        return model
    import deepspeed

    module = accelerator.unwrap_model(model)
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return evaluation_network(config, num_classes, module.state_dict(), accelerator.device,
                                  source="the ZeRO-3 model")


def evaluation_network(config: Config, num_classes: int, state_dict: dict, device,
                       source: str = "the weights") -> torch.nn.Module:
    """The run's backbone holding ``state_dict``, without its method (evaluation never masks), in
    the run's memory format, on ``device``, in eval mode: what rsc_dist.evaluate runs on a saved
    model and the trainer on a ZeRO-3 model. ConfigError (naming ``source``) when the weights do
    not fit the architecture and class count."""
    model = build_model(config.model.arch, num_classes, pretrained=None, image_size=config.data.image_size,
                        head_blocks=config.model.head_blocks)
    # A method's own modules (network.method: a discriminator, a second head, per-domain
    # weights) take no part in prediction.
    state_dict = {key: value for key, value in state_dict.items() if not key.startswith(METHOD_PREFIX)}
    problems = mismatch(model.state_dict(), state_dict)
    if problems:
        raise ConfigError(f"{source} does not fit model.arch={config.model.arch} with {num_classes} "
                          f"classes: {problems}")
    model.load_state_dict(state_dict, strict=True)
    if config.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.to(device).eval()


def mismatch(expected: dict, saved: dict) -> str:
    """What keeps ``saved`` from loading into a model with ``expected``'s state dict ("" if nothing)."""
    def some(keys):
        keys = sorted(keys)
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    missing, unexpected = set(expected) - set(saved), set(saved) - set(expected)
    shapes = [f"{k} {tuple(saved[k].shape)} instead of {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(saved)) if saved[k].shape != expected[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing tensor(s) ({some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s) ({some(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} of another shape ({'; '.join(shapes[:3])})")
    return "; ".join(parts)
