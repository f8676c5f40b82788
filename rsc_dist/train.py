"""Train ERM or RSC with leave-domain-out evaluation, on 1 CPU, N gloo ranks or N GPUs.

    accelerate launch rsc_dist/train.py                        # the built-in demo (CPU ok)
    accelerate launch --num_processes 2 rsc_dist/train.py      # 2 ranks (gloo on CPU)
    accelerate launch --config_file accelerate_config.yaml rsc_dist/train.py \
        --config pacs_resnet50 --data.root /data/pacs_shards --data.target sketch
    ... --algorithm erm --rsc.p_batch 0.25 --run.seed 1 --resume auto

Exit codes: 0 finished; 2 bad config or data; 3 non-finite loss (last good checkpoint kept);
75 stopped by SIGTERM/SIGUSR1 after saving a checkpoint (rerun with --resume auto).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch rsc_dist/train.py` runs this as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from tqdm.auto import tqdm

from rsc_dist import cpu_launch, engine, observe
from rsc_dist.config import Config, ConfigError, load_config, save_config, to_dict
from rsc_dist.data import Augment, EvalStream, TrainStream, make_loader, mix_seed
from rsc_dist.models import RSCSettings, build_model

DEFAULT_CACHE = Path(os.environ.get("RSC_DIST_CACHE", Path.home() / ".cache" / "rsc_dist"))


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description="Train ERM/RSC on webdataset shards. Any config field can be overridden "
        "with --section.key=value (e.g. --rsc.p_batch=0.25 --data.target=sketch).",
        epilog="Exit codes: 0 done, 2 config/data error, 3 non-finite loss, 75 preempted (resume).",
    )
    parser.add_argument("--config", default="demo", help="preset name or YAML path (default: demo)")
    parser.add_argument("--output_dir", help="run folder (default: runs/EXPERIMENT/ALGO/TARGET/seedS)")
    parser.add_argument("--resume", default="auto",
                        help="auto (newest checkpoint in the run folder, if any), none, or a checkpoint path")
    parser.add_argument("--algorithm", choices=("rsc", "erm"))
    parser.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    return parser.parse_known_args(argv)


def resolve_config(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    args, overrides = parse_args(argv)
    if args.algorithm:
        overrides = [f"--algorithm={args.algorithm}"] + overrides
    if args.output_dir:
        overrides = [f"--run.output_dir={args.output_dir}"] + overrides
    return load_config(args.config, overrides), args


# ---------------------------------------------------------------------------------------------
# Data: manifest checks, demo data, loaders


class DataPlan:
    """What the run reads: the manifest, source/target domains, batch sizes, steps."""

    def __init__(self, config: Config, root: Path, world_size: int):
        from data_prep.manifest import ManifestError, load_manifest

        try:
            self.manifest = load_manifest(root)
        except ManifestError as exc:
            raise ConfigError(f"data.root={root}: {exc}") from exc
        domains = self.manifest.domains
        self.domains = tuple(domains)
        if config.data.classes and tuple(config.data.classes) != tuple(self.manifest.classes):
            raise ConfigError(f"data.classes {list(config.data.classes)} does not match the classes of "
                              f"{root}/_info.json: {list(self.manifest.classes)} (wrong data.root?)")
        unknown = [d for d in config.data.target + config.data.sources if d not in domains]
        if unknown:
            raise ConfigError(f"domains {unknown} (data.target/data.sources) are not in "
                              f"{root}/_info.json, which has {list(domains)}")
        if not config.data.target:
            raise ConfigError(f"data.target is empty; choose held-out domain(s) from {list(domains)}")
        self.targets = config.data.target
        self.sources = config.data.sources or tuple(d for d in domains if d not in self.targets)
        if not self.sources:
            raise ConfigError("no source domain left: every domain is a target")
        self.train_urls = {d: self._paths(d, ("train",)) for d in self.sources}
        empty = [d for d, urls in self.train_urls.items() if not urls]
        if empty:
            raise ConfigError(f"source domains {empty} have no 'train' shards in {root}/_info.json")
        self.val_urls = [u for d in self.sources for u in self._paths(d, ("val",))]
        self.target_urls = [u for d in self.targets for u in self._paths(d, ("train", "val", "test"))]
        missing = [u for u in self._all_urls() if not Path(u).is_file()]
        if missing:
            raise ConfigError(f"{len(missing)} shard(s) listed in {root}/_info.json are missing, "
                              f"e.g. {missing[0]}; rerun data_prep convert or check data.root")
        per_rank = config.data.batch_size * (len(self.sources) if config.data.sampling == "balanced" else 1)
        self.batch_per_rank = per_rank * (2 if config.data.flip_double else 1)  # as the model sees it
        self.loader_batch = per_rank
        train_samples = sum(self.manifest.num_samples(d, "train") for d in self.sources)
        global_batch = per_rank * world_size
        accumulation = config.train.grad_accum
        # Every checkpoint must fall on the end of an accumulation window: pending gradients
        # are not part of a checkpoint. Derived epochs are rounded down to whole windows.
        self.steps_per_epoch = config.train.steps_per_epoch or (
            train_samples // global_batch // accumulation * accumulation)
        if self.steps_per_epoch < 1:
            raise ConfigError(f"{train_samples} training samples cannot fill one global batch of "
                              f"{global_batch}; lower data.batch_size or set train.steps_per_epoch")
        self.total_steps = config.train.max_steps or config.train.epochs * self.steps_per_epoch
        for key, value in (("train.steps_per_epoch", self.steps_per_epoch), ("train.max_steps", self.total_steps),
                           ("train.checkpoint_every_steps", config.train.checkpoint_every_steps),
                           ("train.agree_every_steps", config.train.agree_every_steps),
                           ("train.stop_at_step", config.train.stop_at_step)):
            if value and value % accumulation:
                raise ConfigError(f"{key}={value} must be a multiple of train.grad_accum={accumulation} "
                                  "(checkpoints and stops happen between accumulation windows)")

    def _paths(self, domain: str, splits: tuple[str, ...]) -> list[str]:
        present = self.manifest.splits[domain]
        return [str(p) for s in splits if s in present for p in self.manifest.shard_paths(domain, s)]

    def _all_urls(self) -> list[str]:
        return [u for urls in self.train_urls.values() for u in urls] + self.val_urls + self.target_urls

    def train_stream(self, config: Config, rank: int, world_size: int) -> TrainStream:
        groups = (self.train_urls if config.data.sampling == "balanced"
                  else {"merged": [u for urls in self.train_urls.values() for u in urls]})
        return TrainStream(groups, batch_per_group=config.data.batch_size,
                           steps_per_epoch=self.steps_per_epoch, seed=config.run.seed, rank=rank,
                           world_size=world_size, augment=augment_of(config),
                           shuffle_buffer=config.data.shuffle_buffer)

    def eval_loaders(self, config: Config, rank: int, world_size: int, pin: bool) -> dict:
        loaders = {}
        for role, urls in (("val", self.val_urls), ("target", self.target_urls)):
            if urls:
                stream = EvalStream(urls, rank=rank, world_size=world_size, augment=augment_of(config),
                                    batch_size=config.data.eval_batch_size)
                loaders[role] = make_loader(stream, min(config.data.workers, len(urls)), pin)
        return loaders


def augment_of(config: Config) -> Augment:
    d = config.data
    return Augment(d.image_size, d.random_resized_crop_scale, d.hflip, d.color_jitter, d.grayscale)


def data_root(config: Config, accelerator: Accelerator) -> Path:
    """The shard folder; for "demo", generate the demo set once (main process first)."""
    if config.data.root != "demo":
        return Path(config.data.root).expanduser()
    from data_prep.demo import ensure_demo_shards

    with accelerator.main_process_first():
        return Path(ensure_demo_shards(DEFAULT_CACHE / "demo"))


# ---------------------------------------------------------------------------------------------
# The run


def make_accelerator(config: Config, run_dir: Path) -> Accelerator:
    # Without CUDA, `accelerate launch --num_processes N` must not become N independent
    # single-process trainings: cpu=True makes Accelerate form a gloo group from WORLD_SIZE.
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available() and local_ranks > torch.cuda.device_count():
        raise ConfigError(f"{local_ranks} processes were started on this node but it has "
                          f"{torch.cuda.device_count()} GPU(s); pass --num_processes "
                          f"{torch.cuda.device_count()} (per node) to accelerate launch")
    timeout = datetime.timedelta(seconds=int(os.environ.get("RSC_DIST_TIMEOUT_S", "1800")))
    precision = None if config.train.mixed_precision == "auto" else config.train.mixed_precision
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        gradient_accumulation_steps=config.train.grad_accum,
        step_scheduler_with_optimizer=False,  # the schedule counts optimizer steps, not ranks
        log_with=observe.tracker_name(config),
        project_dir=str(run_dir),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)],
    )


def build_training_model(config: Config, num_classes: int, accelerator: Accelerator, capacity: int):
    distributed = accelerator.num_processes > 1
    if config.model.sync_bn and distributed and accelerator.device.type != "cuda":
        raise ConfigError("model.sync_bn=true needs GPUs (torch's SyncBatchNorm has no CPU kernel)")
    settings = RSCSettings(
        enabled=config.algorithm == "rsc",
        strategy=config.rsc.strategy,
        p_spatial=config.rsc.p_spatial,
        p_channel=config.rsc.p_channel,
        process_group=torch.distributed.group.WORLD if distributed and config.rsc.global_selection else None,
        capacity=capacity,
    )
    model = build_model(config.model.arch, num_classes, pretrained=config.model.pretrained, rsc=settings)
    if config.model.sync_bn and distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if config.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.model.compile:
        # In place (Module.compile): state-dict keys stay the same, so checkpoints load
        # with or without compile. RSC itself stays eager.
        model.features.compile()
    return model


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
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = plan.batch_per_rank
    plugin.deepspeed_config["gradient_accumulation_steps"] = config.train.grad_accum
    plugin.deepspeed_config["train_batch_size"] = (
        plan.batch_per_rank * config.train.grad_accum * accelerator.num_processes)
    plugin.deepspeed_config["gradient_clipping"] = 0.0


def stream_layout(config: Config, plan: DataPlan, world: int) -> dict:
    """What decides which samples each step reads; a resume with another layout is not exact."""
    return {"world_size": world, "workers": config.data.workers, "batch_per_rank": plan.loader_batch,
            "steps_per_epoch": plan.steps_per_epoch}


def find_resume_checkpoint(resume: str, run_dir: Path) -> Path | None:
    if resume == "none":
        return None
    if resume == "auto":
        found = engine.checkpoint_dirs(run_dir)
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise ConfigError(f"--resume {resume}: no such checkpoint folder")
    return path


def run(config: Config, args: argparse.Namespace) -> int:
    run_dir = config.resolved_output_dir().resolve()
    accelerator = make_accelerator(config, run_dir)
    # Installed first: a stop requested during setup is honoured at the first agreement step
    # instead of killing the process with the default action.
    stop = engine.StopFlags(accelerator.device)
    stop.install()
    set_seed(config.run.seed)
    plan = DataPlan(config, data_root(config, accelerator), accelerator.num_processes)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    rank, world = accelerator.process_index, accelerator.num_processes

    model = build_training_model(config, plan.manifest.num_classes, accelerator, plan.batch_per_rank)
    optimizer = engine.build_optimizer(config, model)
    total_optimizer_steps = math.ceil(plan.total_steps / config.train.grad_accum)
    scheduler = engine.build_scheduler(config, optimizer, total_optimizer_steps)
    configure_deepspeed(accelerator, config, plan)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = engine.TrainState(stream_layout=stream_layout(config, plan, world))
    accelerator.register_for_checkpointing(scheduler, state)

    checkpoint = find_resume_checkpoint(args.resume, run_dir)
    if checkpoint is not None:
        expected_layout = state.stream_layout
        accelerator.load_state(str(checkpoint))
        accelerator.print(f"resumed from {checkpoint} at step {state.step}")
        if state.stream_layout != expected_layout:
            accelerator.print(f"WARNING: the checkpoint was written with {state.stream_layout}, this run "
                              f"has {expected_layout}: training continues, but the data order (and so "
                              "the result) will differ from an uninterrupted run")
            state.stream_layout = expected_layout

    if accelerator.is_main_process:  # this run continues whatever a preemption left behind
        (run_dir / engine.PREEMPTED_MARKER).unlink(missing_ok=True)
    tracking = observe.start_tracking(accelerator, config, run_dir, plan)
    pin = accelerator.device.type == "cuda"
    eval_loaders = plan.eval_loaders(config, rank, world, pin)
    stream = plan.train_stream(config, rank, world)
    meter = observe.Meter(accelerator)
    progress = tqdm(total=plan.total_steps, initial=state.step, disable=not accelerator.is_main_process,
                    desc=f"{config.algorithm} {'+'.join(plan.targets)}", dynamic_ncols=True)
    accelerator.print(
        f"run folder {run_dir}\n{world} process(es) on {accelerator.device}, sources {list(plan.sources)}, "
        f"targets {list(plan.targets)}; {plan.steps_per_epoch} steps/epoch, {plan.total_steps} steps, "
        f"global batch {plan.batch_per_rank * world}"
    )

    exit_code = engine.EXIT_OK
    first_step = state.step
    while state.step < plan.total_steps and exit_code == engine.EXIT_OK:
        epoch, in_epoch = divmod(state.step, plan.steps_per_epoch)
        stream.set_position(epoch, in_epoch)
        loader = make_loader(stream, config.data.workers, pin)
        meter.start_wait()
        for batch in loader:
            meter.end_wait()
            step = state.step
            if batch["step"] != step - epoch * plan.steps_per_epoch:  # a broken stream, not user error
                raise RuntimeError(f"data stream out of order: batch {batch['step']} at step {step}")
            inputs = engine.prepare_batch(config, batch, accelerator.device, step, plan.steps_per_epoch)
            generator = None
            if config.rsc.strategy == "random":
                # On the device: CPU-drawn scores would need a blocking copy every step.
                generator = torch.Generator(device=accelerator.device).manual_seed(
                    mix_seed(config.run.seed, step, rank))
            out = engine.train_step(accelerator, model, optimizer, scheduler, inputs, generator)
            stop.track_loss(out["loss"])
            meter.update(out, inputs)
            state.step += 1
            progress.update(1)
            if state.step == config.train.stop_at_step:
                stop.request(f"train.stop_at_step={state.step}")

            end_of_epoch = state.step % plan.steps_per_epoch == 0 or state.step == plan.total_steps
            last_step = state.step == plan.total_steps
            evaluate_now = last_step or _due(state.step, config.train.eval_every_steps, end_of_epoch)
            checkpoint_now = last_step or _due(state.step, config.train.checkpoint_every_steps, end_of_epoch)
            if meter.due(state.step, config.train.log_every_steps):
                tracking.log(meter.flush(optimizer, progress), state.step)
            if config.train.image_log_every_steps and (step % config.train.image_log_every_steps) == 0:
                tracking.log_masks(batch["image"], out["mask"], inputs.mode, state.step)
            # Every rank takes this branch at the same steps (a pure function of the step), so
            # the collective inside never waits for a rank that skipped it.
            if (evaluate_now or checkpoint_now or state.step == config.train.stop_at_step
                    or state.step % config.train.agree_every_steps == 0):
                pause_start = time.perf_counter()
                signalled, nonfinite = stop.agree(accelerator)
                if nonfinite:
                    accelerator.print(f"non-finite loss before step {state.step}: stopping; the last "
                                      f"good checkpoint in {run_dir / 'checkpoints'} is kept")
                    exit_code = engine.EXIT_NONFINITE
                    break
                if evaluate_now:
                    counts = engine.evaluate(accelerator, model, eval_loaders, config, len(plan.domains))
                    evaluation = engine.summarize_evaluation(counts, plan.domains, state.step)
                    state.record_evaluation(evaluation)
                    tracking.log_evaluation(evaluation, state.step)
                if checkpoint_now or signalled:
                    engine.save_checkpoint(accelerator, run_dir, state.step, config.train.keep_checkpoints)
                meter.exclude(time.perf_counter() - pause_start)
                if signalled:
                    engine.mark_preempted(accelerator, run_dir, state.step, stop.signalled)
                    accelerator.print(f"stop requested: saved step {state.step}; resume with --resume auto")
                    exit_code = engine.EXIT_PREEMPTED
                    break
            if state.step >= plan.total_steps or end_of_epoch:
                break
            meter.start_wait()
        del loader
    progress.close()

    if exit_code == engine.EXIT_OK and accelerator.is_main_process:
        results_path = run_dir / "results.json"
        if state.step == first_step and results_path.exists():
            accelerator.print(f"{run_dir} was already complete at step {state.step}; results.json kept")
        else:
            results = observe.results_document(config, plan, state, meter)
            results_path.write_text(json.dumps(results, indent=2))
            tracking.log_summary(results)
        accelerator.print(observe.format_accuracy_table(plan, state))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return exit_code


def _due(step: int, every: int | None, end_of_epoch: bool) -> bool:
    return step % every == 0 if every else end_of_epoch


def main(argv: list[str] | None = None) -> int:
    ranks = cpu_launch.needs_cpu_ranks()
    if ranks > 1:
        return cpu_launch.run_cpu_ranks(ranks, str(Path(__file__).resolve()),
                                        sys.argv[1:] if argv is None else argv)
    try:
        config, args = resolve_config(argv)
        if args.print_config:
            print(json.dumps(to_dict(config), indent=2))
            return engine.EXIT_OK
        return run(config, args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"rsc_dist.train: error: {exc}", file=sys.stderr)
        return engine.EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
