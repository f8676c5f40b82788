"""Train ERM or RSC with leave-domain-out evaluation, on 1 CPU, N gloo ranks or N GPUs.

    accelerate launch rsc_dist/train.py                        # the built-in demo (CPU ok)
    accelerate launch --num_processes 2 rsc_dist/train.py      # 2 ranks (gloo on CPU)
    accelerate launch --config_file accelerate_config.yaml rsc_dist/train.py \\
        --config pacs_resnet50 --data.root /data/pacs_shards --data.target sketch
    ... --algorithm erm --rsc.p_batch 0.25 --run.seed 1 --resume auto
    python -m rsc_dist.train --help                            # every config field

The run: parse the config, plan the data, assemble model and optimizer, resume if a checkpoint
exists, train (rsc_dist.loop), write results.json and print the accuracy table. Exit codes and
files other programs rely on: rsc_dist/contracts.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch rsc_dist/train.py` runs this as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accelerate.utils import set_seed

from rsc_dist import build, checkpoints, cpu_launch, engine, loop, observe
from rsc_dist.config import Config, ConfigError, describe_fields, load_config, save_config, to_dict
from rsc_dist.contracts import CONFIG_FILE, EXIT_CONFIG, EXIT_OK, PREEMPTED_MARKER, RESULTS_FILE
from rsc_dist.plan import DataPlan, data_root


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    fields = "\n".join(f"  {flag:<40} {kind}\n      {doc}" for flag, kind, doc in describe_fields())
    parser = argparse.ArgumentParser(
        prog="rsc_dist.train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train ERM/RSC on webdataset shards. Every config field below can be set with "
        "--section.key=value (or --section.key value); lists are comma-separated or [a,b].",
        epilog=f"config fields (type = default):\n{fields}\n\n"
               "Exit codes: 0 done, 2 config/data error, 3 non-finite loss, 75 stopped (rerun to resume).",
    )
    parser.add_argument("--config", default="demo", help="preset name or YAML path (default: demo)")
    parser.add_argument("--output_dir", help="run folder (default: runs/EXPERIMENT/ALGO/TARGET/seedS-FINGERPRINT)")
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


def run(config: Config, args: argparse.Namespace) -> int:
    run_dir = config.resolved_output_dir().resolve()
    accelerator = build.make_accelerator(config, run_dir)
    # Installed right after the Accelerator exists: a stop requested during setup is honoured
    # at the first agreement step instead of killing the process with the default action.
    stop = engine.StopFlags(accelerator.device)
    stop.install()
    set_seed(config.run.seed)
    plan = DataPlan(config, data_root(config, accelerator.main_process_first), accelerator.num_processes)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / CONFIG_FILE)

    model, optimizer, scheduler = build.training_objects(config, plan, accelerator)
    state = engine.TrainState(stream_layout=plan.stream_layout())
    accelerator.register_for_checkpointing(scheduler, state)
    resume_from(accelerator, state, checkpoints.find_resume_checkpoint(args.resume, run_dir))
    if accelerator.is_main_process:  # this run continues whatever a preemption left behind
        (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)

    tracking = observe.start_tracking(accelerator, config, run_dir, plan)
    accelerator.print(
        f"run folder {run_dir}\n{accelerator.num_processes} process(es) on {accelerator.device}, "
        f"sources {list(plan.sources)}, targets {list(plan.targets)}; {plan.steps_per_epoch} steps/epoch, "
        f"{plan.total_steps} steps, global batch {plan.global_batch} samples "
        f"({plan.global_forward_batch} images per step)")
    first_step = state.step
    exit_code, meter = loop.train(loop.Run(config, plan, run_dir, accelerator, model, optimizer, scheduler,
                                           state, stop, tracking))
    if exit_code == EXIT_OK and accelerator.is_main_process:
        report(config, plan, state, meter, tracking, run_dir, resumed_finished=state.step == first_step)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return exit_code


def resume_from(accelerator, state: engine.TrainState, checkpoint: Path | None) -> None:
    if checkpoint is None:
        return
    expected_layout = state.stream_layout
    accelerator.load_state(str(checkpoint))
    accelerator.print(f"resumed from {checkpoint} at step {state.step}")
    if state.stream_layout != expected_layout:
        accelerator.print(f"WARNING: the checkpoint was written with {state.stream_layout}, this run "
                          f"has {expected_layout}: training continues, but the data order (and so "
                          "the result) will differ from an uninterrupted run")
        state.stream_layout = expected_layout


def report(config, plan, state, meter, tracking, run_dir: Path, resumed_finished: bool) -> None:
    """results.json (kept as it is when a finished run is rerun) and the accuracy table."""
    results_path = run_dir / RESULTS_FILE
    if resumed_finished and results_path.exists():
        print(f"{run_dir} was already complete at step {state.step}; {RESULTS_FILE} kept")
    else:
        results = observe.results_document(config, plan, state, meter)
        results_path.write_text(json.dumps(results, indent=2))
        tracking.log_summary(results)
    print(observe.format_accuracy_table(plan, state))


def main(argv: list[str] | None = None) -> int:
    try:
        ranks = cpu_launch.needs_cpu_ranks()
    except cpu_launch.LaunchError as exc:
        print(f"rsc_dist.train: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if ranks > 1:
        return cpu_launch.run_cpu_ranks(ranks, str(Path(__file__).resolve()),
                                        sys.argv[1:] if argv is None else argv)
    try:
        config, args = resolve_config(argv)
        if args.print_config:
            print(json.dumps(to_dict(config), indent=2))
            return EXIT_OK
        return run(config, args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"rsc_dist.train: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
