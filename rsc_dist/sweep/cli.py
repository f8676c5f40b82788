"""python -m rsc_dist.sweep SWEEP.yaml --launcher print|local|slurm|wandb|one [--out DIR]

    python -m rsc_dist.sweep launch/sweeps/demo.yaml                        # list the runs
    python -m rsc_dist.sweep launch/sweeps/demo.yaml --launcher local --parallel 2
    python -m rsc_dist.sweep SWEEP.yaml --launcher local --gpus-per-run 2   # 2-GPU runs, queued over the GPUs
    python -m rsc_dist.sweep launch/sweeps/pacs_resnet18.yaml --launcher slurm \\
        --out /shared/runs/pacs_r18 --set data.root=/shared/shards/pacs --dry-run
    python -m rsc_dist.sweep SWEEP.yaml --launcher wandb --out OUT          # OUT/wandb_sweep.yaml
    python -m rsc_dist.results OUT --selection source_val_mean              # the table

The runs go to --out (default runs/NAME), one folder each. Every launcher skips finished runs
and resumes started ones, so rerunning a command continues the sweep. --dry-run (anywhere on
the line) prints what would run and starts, writes and submits nothing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import yaml

from rsc_dist.core.contracts import EXIT_CONFIG
from rsc_dist.core.errors import UsageError
from rsc_dist.sweep.spec import Sweep, SweepError, load_sweep
from rsc_dist.sweep.state import check_finished_runs, write_record

LAUNCHERS = ("print", "local", "slurm", "wandb", "one")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rsc_dist.sweep", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_file", type=Path, help="the sweep (YAML); its keys: rsc_dist/sweep/spec.py")
    p.add_argument("--launcher", choices=LAUNCHERS, default="print",
                   help="print (default): list the runs; local: run them here; slurm: one array job; "
                   "wandb: write a W&B sweep config; one: run --index (what a W&B trial calls)")
    p.add_argument("--out", type=Path, help="the sweep's folder (default runs/NAME)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a fixed setting added to the file's overrides, e.g. --set data.root=/shared/pacs")
    p.add_argument("--dry-run", action="store_true", help="print what would run; start, write, submit nothing")
    p.add_argument("--commands", action="store_true", help="print: also each run's trainer command")
    local = p.add_argument_group("local")
    local.add_argument("--parallel", type=int, help="runs at once (default: as many as the GPUs hold, 1 on CPU)")
    local.add_argument("--gpus-per-run", type=int, default=1, metavar="K",
                       help="processes per run: K GPUs each (accelerate launch --num_processes K), queued over "
                       "the machine's GPUs; with --devices cpu, K CPU ranks (gloo) each (default 1)")
    local.add_argument("--devices", default="auto", help="auto (GPUs if any), cpu, or GPU ids: 0,1,3")
    local.add_argument("--stop-timeout", type=float, default=300.0,
                       help="seconds a stopping run has to checkpoint before it is killed (default 300)")
    slurm = p.add_argument_group("slurm")
    slurm.add_argument("--sbatch", action="append", default=[], metavar="OPT",
                       help="an extra sbatch option, repeatable: --sbatch=--partition=gpu")
    slurm.add_argument("--max-parallel", type=int, help="array tasks running at once (--array=...%%N)")
    wandb = p.add_argument_group("wandb / one")
    wandb.add_argument("--wandb-file", help="where the W&B config goes (default OUT/wandb_sweep.yaml; - = stdout)")
    wandb.add_argument("--index", type=int, help="one: the run to start (its place in the expansion)")
    return p.parse_args(argv)


def parse_sets(items: list[str]) -> dict:
    values = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise SweepError(f"--set {item!r}: expected KEY=VALUE, e.g. --set data.root=/shared/pacs")
        values[key] = yaml.safe_load(raw) if raw else ""
    return values


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # A dry run never runs anything, wherever the flag is written (also after a stray `--`).
    dry_run = "--dry-run" in argv
    if "--" in argv:
        print("rsc_dist.sweep: error: trainer settings go in the sweep file (overrides:) or --set KEY=VALUE, "
              "not after --", file=sys.stderr)
        return EXIT_CONFIG
    args = parse_args(argv)
    try:
        check_arguments(args)
        sweep = load_sweep(args.sweep_file, parse_sets(args.set))
        out = (args.out or sweep.default_out()).expanduser().absolute()
        return dispatch(args, sweep, out, dry_run)
    except UsageError as exc:
        print(f"rsc_dist.sweep: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def check_arguments(args: argparse.Namespace) -> None:
    """Values argparse's types let through that mean nothing here: refused before anything
    is read, locked or written."""
    for flag, value in (("--parallel", args.parallel), ("--gpus-per-run", args.gpus_per_run),
                        ("--max-parallel", args.max_parallel)):
        if value is not None and value < 1:
            raise SweepError(f"{flag} must be at least 1; got {value}")
    if args.stop_timeout < 0:
        raise SweepError(f"--stop-timeout must be >= 0 seconds; got {args.stop_timeout:g}")
    owners = {"local": (("--parallel", args.parallel, None), ("--devices", args.devices, "auto"),
                        ("--gpus-per-run", args.gpus_per_run, 1)),
              "slurm": (("--sbatch", args.sbatch, []), ("--max-parallel", args.max_parallel, None)),
              "wandb": (("--wandb-file", args.wandb_file, None),),
              "one": (("--index", args.index, None),)}
    for launcher, options in owners.items():
        given = [flag for flag, value, default in options if value != default]
        if given and args.launcher != launcher:
            raise SweepError(f"{', '.join(given)}: option(s) of --launcher {launcher}, which --launcher "
                             f"{args.launcher} does not use")


def dispatch(args: argparse.Namespace, sweep: Sweep, out: Path, dry_run: bool) -> int:
    launcher = args.launcher
    if launcher == "print" or (dry_run and launcher == "local"):
        return print_runs(sweep, out, args.commands or dry_run)
    if not dry_run:  # before anything starts, is submitted or handed to agents
        sweep.require_dataset()
    if launcher == "local":
        from rsc_dist.sweep.launch_local import run_local

        return run_local(sweep, out, args.devices, args.parallel, args.stop_timeout, args.gpus_per_run)
    if launcher == "slurm":
        from rsc_dist.sweep.launch_slurm import run_slurm

        return run_slurm(sweep, out, args.sbatch, args.max_parallel, dry_run)
    if launcher == "wandb":
        from rsc_dist.sweep.launch_wandb import write_wandb_config

        extra = [f"--set={item}" for item in args.set]
        path = write_wandb_config(sweep, out, extra, "-" if dry_run else args.wandb_file)
        if path is not None:
            print(f"wrote {path} ({len(sweep.runs)} trials); next: wandb sweep --project PROJECT {path}",
                  file=sys.stderr)
        return 0
    return run_one(sweep, out, args.index, dry_run)


def print_runs(sweep: Sweep, out: Path, commands: bool) -> int:
    states = check_finished_runs(sweep.runs, out)
    counts = {s: list(states.values()).count(s) for s in ("done", "started", "new")}
    trials = ", ".join(f"{m} {n}" for m, n in sweep.n_trials.items())
    print(f"# sweep {sweep.name} ({sweep.path}), protocol {sweep.protocol}: {len(sweep.runs)} runs under {out}; "
          f"trials per method: {trials}; {counts['done']} done, {counts['started']} started, {counts['new']} new")
    for note in sweep.notes:
        print(f"# {note}")
    width = max(len(run.name) for run in sweep.runs)
    for run in sweep.runs:
        print(f"{run.index:4d}  {run.name:<{width}}  {states[run.name]:<7}  {run.describe_hparams()}")
        if commands:
            print(f"      python -m rsc_dist.train {' '.join(run.trainer_args(sweep.preset, out))}")
    return 0


def run_one(sweep: Sweep, out: Path, index: int | None, dry_run: bool) -> int:
    """Exec the trainer for run ``index`` (a W&B trial): the trainer becomes this process, so the
    agent's forwarded signals reach it directly. A dry run prints the command instead."""
    if index is None or not 0 <= index < len(sweep.runs):
        raise SweepError(f"--launcher one needs --index between 0 and {len(sweep.runs) - 1}; got {index}")
    run = sweep.runs[index]
    from rsc_dist.sweep.launch_local import trainer_command

    command = [*trainer_command(), *run.trainer_args(sweep.preset, out)]
    if dry_run:
        print(shlex.join(command))
        return 0
    states = check_finished_runs([run], out)
    if states[run.name] == "done":
        print(f"run {run.name} is finished already ({out / run.relative}); nothing to do")
        return 0
    write_record(sweep, out)
    print(f"run {index} of sweep {sweep.name}: {run.name} -> {shlex.join(command)}", flush=True)
    os.execv(command[0], command)
    return 1  # not reached
