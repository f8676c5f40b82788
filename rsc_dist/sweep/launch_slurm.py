"""Submit a sweep's unfinished runs as one SLURM array job of launch/slurm/train.sbatch.

Each array task is one run: train.sbatch reads its trainer arguments from line TASK+1 of
RSC_TASK_FILE (tab-separated), so every task has the preemption handling of a single run
(checkpoint on USR1 120 s before the limit, requeue of that task alone, resume in the same
folder). Finished runs are left out; rerunning the command submits what is left, and those
runs resume from their newest checkpoints. A dry run prints the sbatch command and each task
and neither writes nor submits anything.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from rsc_dist.sweep.spec import Sweep, SweepError
from rsc_dist.sweep.state import DONE, check_finished_runs, write_record

REPO = Path(__file__).resolve().parents[2]
TRAIN_SBATCH = REPO / "launch" / "slurm" / "train.sbatch"


def plan(sweep: Sweep, out: Path, sbatch_options: list[str], max_parallel: int | None):
    """(sbatch command, environment additions, task lines, finished count)."""
    states = check_finished_runs(sweep.runs, out)
    todo = [run for run in sweep.runs if states[run.name] != DONE]
    lines = []
    for run in todo:
        args = run.trainer_args(sweep.preset, out)[2:]  # the preset is given once, to every task
        if any("\t" in a or "\n" in a for a in args):
            raise SweepError(f"run {run.name}: an override holds a tab or newline, which the task file cannot carry")
        lines.append("\t".join(args))
    task_file = out / f"tasks-{time.strftime('%Y%m%d-%H%M%S')}.tsv"
    limit = max_parallel or sweep.slurm.get("max_parallel")
    command = ["sbatch", "--parsable", f"--job-name={sweep.name}",
               f"--array=0-{len(lines) - 1}" + (f"%{limit}" if limit else ""),
               f"--output={out}/logs/%x-%A_%a.out", *sweep.slurm.get("sbatch", []), *sbatch_options,
               str(TRAIN_SBATCH), "--config", sweep.preset]
    env = {"RSC_TASK_FILE": str(task_file), "RSC_ROOT": str(REPO)}
    return command, env, lines, len(sweep.runs) - len(todo)


def run_slurm(sweep: Sweep, out: Path, sbatch_options: list[str], max_parallel: int | None, dry_run: bool) -> int:
    command, env, lines, finished = plan(sweep, out, sbatch_options, max_parallel)
    print(f"# sweep {sweep.name}: {len(sweep.runs)} runs under {out} ({len(lines)} to run, {finished} already finished)")
    if not lines:
        print(f"# nothing to submit; the table: python -m rsc_dist.results {out} --selection source_val_mean")
        return 0
    if dry_run:
        print("# dry run: nothing written or submitted; the task file would hold the task lines below")
        print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(command))
        for i, line in enumerate(lines):
            print(f"# task {i}: train.py --config {shlex.quote(sweep.preset)} {shlex.join(line.split(chr(9)))}")
        return 0
    if not shutil.which("sbatch"):
        raise SweepError("sbatch not found: run this on a SLURM login node (or --dry-run to see the job)")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    write_record(sweep, out)
    Path(env["RSC_TASK_FILE"]).write_text("\n".join(lines) + "\n")
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
    if result.returncode != 0:
        raise SweepError(f"sbatch failed (exit {result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    job = result.stdout.strip().split(";")[0]
    with open(out / "array_jobs.txt", "a") as f:
        f.write(f"{job}\t{env['RSC_TASK_FILE']}\n")
    print(f"submitted array job {job} ({len(lines)} tasks); task list {env['RSC_TASK_FILE']}; logs {out / 'logs'}/")
    print(f"when done: python -m rsc_dist.results {out} --selection source_val_mean")
    return 0
