"""Train a DG method (RSC, ERM, CORAL: rsc_dist.methods) with leave-domain-out evaluation, on 1 CPU, N gloo ranks or N GPUs.

    accelerate launch rsc_dist/train.py                        # the built-in demo (CPU ok)
    accelerate launch --num_processes 2 rsc_dist/train.py      # 2 ranks (gloo on CPU)
    accelerate launch --config_file accelerate_config.yaml rsc_dist/train.py \\
        --config pacs_resnet50 --data.root /data/pacs_shards --data.target sketch
    ... --algorithm erm --rsc.p_batch 0.25 --run.seed 1 --resume auto
    python -m rsc_dist.train --help                            # every config field

The run: parse the config, plan the data, assemble model and optimizer, resume if a checkpoint
exists, train (rsc_dist.loop), write results.json and print the accuracy table. Exit codes and
files other programs rely on: rsc_dist/core/contracts.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch rsc_dist/train.py` runs this as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from accelerate.utils import set_seed

from rsc_dist import methods
from rsc_dist.config import Config, ConfigError, describe_fields, load_config, save_config, to_dict, trajectory_settings
from rsc_dist.core import selection
from rsc_dist.core.contracts import CONFIG_FILE, EXIT_CONFIG, EXIT_OK, PREEMPTED_MARKER, RESULTS_FILE
from rsc_dist.data.plan import DataPlan, data_root
from rsc_dist.data.streams import DataError, error_line
from rsc_dist.observe.report import format_accuracy_table, results_document
from rsc_dist.observe.tracking import start_tracking
from rsc_dist.trainer import build, checkpoints, cpu_launch, loop, state, stopping


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    fields = "\n".join(f"  {flag:<40} {kind}\n      {doc}" for flag, kind, doc in describe_fields())
    parser = argparse.ArgumentParser(
        prog="rsc_dist.train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Train {'/'.join(m.upper() for m in methods.NAMES)} on webdataset shards. Every config field below can be set with "
        "--section.key=value (or --section.key value); lists are comma-separated or [a,b].",
        epilog=f"config fields (type = default):\n{fields}\n\n"
               "Exit codes: 0 done, 2 config/data error, 3 non-finite loss, 75 stopped (rerun to resume).",
    )
    parser.add_argument("--config", default="demo", help="preset name or YAML path (default: demo)")
    parser.add_argument("--output_dir", help="run folder (default: runs/EXPERIMENT/ALGO/TARGET/seedS-FINGERPRINT)")
    parser.add_argument("--resume", default="auto",
                        help="auto (newest checkpoint in the run folder, if any), none, a checkpoint path, "
                        "or force (auto, continuing even where the checkpoint's settings differ)")
    parser.add_argument("--algorithm", choices=methods.NAMES)
    parser.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    return parser.parse_known_args(argv)


def resolve_config(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    args, overrides = parse_args(argv)
    if args.algorithm:
        overrides = [f"--algorithm={args.algorithm}"] + overrides
    if args.output_dir:
        overrides = [f"--run.output_dir={args.output_dir}"] + overrides
    return load_config(args.config, overrides), args


def run(config: Config, args: argparse.Namespace) -> int:
    # The run folder is needed to make the Accelerator (its project_dir), so the number of
    # processes comes from the launcher's environment (make_accelerator checks the group has it).
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    run_dir = config.resolved_output_dir(world_size).resolve()
    accelerator = build.make_accelerator(config, run_dir)
    with checkpoints.lock_run(accelerator, run_dir):  # one trainer per run folder
        return _run(config, args, run_dir, accelerator)


def _run(config: Config, args: argparse.Namespace, run_dir: Path, accelerator) -> int:
    # Installed right after the Accelerator exists: a stop requested during setup is honoured
    # at the first agreement step instead of killing the process with the default action.
    stop = stopping.StopFlags(accelerator.device)
    stop.install()
    set_seed(config.run.seed)
    plan = DataPlan(config, data_root(config, accelerator.main_process_first), accelerator.num_processes)
    check_selection_data(config, plan)

    model, optimizer, scheduler = build.training_objects(config, plan, accelerator)
    state = state.TrainState(data_order=plan.data_order(), settings=trajectory_settings(config))
    accelerator.register_for_checkpointing(scheduler, state)
    resume_from(accelerator, state, run_dir, args.resume)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / CONFIG_FILE)
        (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)  # this run continues a preempted one

    tracking = start_tracking(accelerator, config, run_dir, plan)
    # On the CPU the intra-op thread count changes how kernels split their float sums, so runs
    # with other counts (plain python: all cores; accelerate launch: OMP_NUM_THREADS=1) part ways.
    threads = f" x {torch.get_num_threads()} thread(s)" if accelerator.device.type == "cpu" else ""
    accelerator.print(
        f"run folder {run_dir}\n{accelerator.num_processes} process(es){threads} on {accelerator.device}, "
        f"sources {list(plan.sources)}, targets {list(plan.targets)}; {plan.steps_per_epoch} steps/epoch, "
        f"{plan.total_steps} steps, global batch {plan.global_batch} samples "
        f"({plan.global_forward_batch} images per step)")
    first_step = state.step
    exit_code, meter = loop.train(loop.Run(config, plan, run_dir, accelerator, model, optimizer, scheduler,
                                           state, stop, tracking))
    if exit_code == EXIT_OK:
        report(accelerator, config, plan, state, meter, tracking, run_dir,
               resumed_finished=state.step == first_step)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return exit_code


def check_selection_data(config: Config, plan: DataPlan) -> None:
    """A rule that ranks evaluations by source validation accuracy cannot choose "best" when a
    source domain has no validation sample: refuse before training, not after."""
    rule = config.train.selection
    if rule not in selection.NEEDS_SOURCE_VAL:
        return
    counts = {d: plan.manifest.num_samples(d, "val") for d in plan.sources}
    empty = selection.sources_without_validation(counts)
    if empty:
        raise ConfigError(f"train.selection={rule} needs source validation data, but source domain(s) "
                          f"{', '.join(empty)} have 0 val samples in {plan.manifest.root}/_info.json; "
                          "reconvert with a validation split, or pass --train.selection=last")


def resume_from(accelerator, state: state.TrainState, run_dir: Path, resume: str) -> None:
    """Load the checkpoint ``resume`` names (the newest that loads, for auto/force) and check it
    continues this run: same trajectory settings and sample order. A difference is a ConfigError
    listing it (exit 2) unless ``resume`` is "force", which is recorded."""
    expected = {"settings": state.settings, "data_order": state.data_order}
    force = resume == "force"
    checkpoint = checkpoints.load_for_resume(accelerator, run_dir, "auto" if force else resume)
    if checkpoint is None:
        return
    changes = resume_differences(state, expected)
    state.settings, state.data_order = expected["settings"], expected["data_order"]
    if not changes:
        accelerator.print(f"resumed from {checkpoint} at step {state.step}")
        return
    listing = "\n".join(f"  {change}" for change in changes)
    if not force:
        raise ConfigError(f"{checkpoint} does not continue this run:\n{listing}\nrerun with the checkpoint's "
                          "settings, choose another --output_dir, or pass --resume force to continue anyway")
    accelerator.print(f"resumed from {checkpoint} at step {state.step}\n"
                      f"WARNING: --resume force: continuing {checkpoint} despite:\n{listing}")
    state.forced_resumes.append({"step": state.step, "changes": changes})


def resume_differences(state: state.TrainState, expected: dict) -> list[str]:
    """What differs between a loaded checkpoint's run and this one, one line per key."""
    saved_order = state.data_order
    if saved_order.get("order_version") != expected["data_order"]["order_version"]:
        return [f"sample order: the checkpoint uses order version {saved_order.get('order_version')} (the "
                f"rank-dependent order of earlier rsc_dist versions); this version uses "
                f"{expected['data_order']['order_version']}"]
    changes = []
    for key, new in expected["data_order"].items():
        old = saved_order.get(key)
        if old != new:
            hint = (f" (with another number of processes, pass --data.global_batch_size={old})"
                    if key == "global_batch" else "")
            changes.append(f"data order {key}: {old!r} -> {new!r}{hint}")
    new_settings = expected["settings"]
    # Checkpoints from before the method registry hashed every method's section: another
    # method's section is not part of this run's trajectory.
    inactive = tuple(f"{name}." for name in methods.sections() if name != new_settings.get("algorithm"))
    old_settings = {key: value for key, value in state.settings.items() if not key.startswith(inactive)}
    if old_settings:  # saved before train.selection existed, when the pooled accuracy chose best/
        old_settings.setdefault("train.selection", "source_val_pooled")
    for key in sorted(set(old_settings) | set(new_settings)):
        if old_settings.get(key) != new_settings.get(key):
            changes.append(f"{key}: {old_settings.get(key)!r} -> {new_settings.get(key)!r}")
    return changes


def report(accelerator, config, plan, state, meter, tracking, run_dir: Path, resumed_finished: bool) -> None:
    """results.json (kept as it is when a finished run is rerun), the tracker's end-of-run
    records, and the accuracy table."""
    results_path = run_dir / RESULTS_FILE
    if resumed_finished and results_path.exists():
        accelerator.print(f"{run_dir} was already complete at step {state.step}; {RESULTS_FILE} kept")
    else:
        results = results_document(config, plan, state, meter, run_dir)
        if accelerator.is_main_process:
            results_path.write_text(json.dumps(results, indent=2))
        tracking.finish_run(results, run_dir)
    accelerator.print(format_accuracy_table(plan, state))


def main(argv: list[str] | None = None) -> int:
    started = cpu_launch.start_ranks_if_needed(str(Path(__file__).resolve()), argv, "rsc_dist.train")
    if started is not None:
        return started
    try:
        config, args = resolve_config(argv)
        if args.print_config:
            print(json.dumps(to_dict(config), indent=2))
            return EXIT_OK
        return run(config, args)
    except (ConfigError, FileNotFoundError, DataError) as exc:
        _close_progress_bars()
        print(f"rsc_dist.train: error: {error_line(exc)}", file=sys.stderr, flush=True)
        return EXIT_CONFIG


def _close_progress_bars() -> None:
    """End an open progress bar's line, so the error starts its own (and is the last: an open bar
    would be drawn again when the interpreter exits)."""
    from tqdm import tqdm

    for bar in list(tqdm._instances):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
