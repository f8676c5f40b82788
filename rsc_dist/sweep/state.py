"""Where each run of a sweep stands, read from its folder: finished, started, or new.

A run is finished when its folder holds results.json (the trainer writes it only at the end).
A finished run must be the run the sweep file describes now: if the file changed since (a
different space, preset or override), its settings differ and the launchers stop, naming the
run and each difference, rather than count an old result as the new one.
"""

from __future__ import annotations

import json
from pathlib import Path

from rsc_dist.config import flatten, trajectory_settings
from rsc_dist.core.contracts import RESULTS_FILE
from rsc_dist.sweep.spec import RunSpec, SweepError

DONE, STARTED, NEW = "done", "started", "new"


def run_state(run: RunSpec, out: Path) -> str:
    folder = out / run.relative
    if (folder / RESULTS_FILE).is_file():
        return DONE
    if folder.is_dir() and any(folder.iterdir()):
        return STARTED
    return NEW


def settings_differences(run: RunSpec, out: Path) -> list[str]:
    """``key: found -> expected`` for each trajectory setting of a finished run that is not what
    the sweep asks for now (settings the results.json does not record are not compared)."""
    path = out / run.relative / RESULTS_FILE
    try:
        found = flatten(json.loads(path.read_text()).get("config") or {})
    except (OSError, ValueError, AttributeError) as exc:
        raise SweepError(f"{path}: cannot read it: {exc}") from None
    expected = trajectory_settings(run.config())
    return [f"{key}: {found[key]!r} -> {_plain(value)!r}" for key, value in sorted(expected.items())
            if key in found and found[key] != _plain(value)]


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def check_finished_runs(runs: list[RunSpec], out: Path) -> dict[str, str]:
    """{run name: state} for every run; SweepError when a finished run has other settings."""
    states, stale = {}, []
    for run in runs:
        states[run.name] = run_state(run, out)
        if states[run.name] == DONE:
            changes = settings_differences(run, out)
            if changes:
                stale.append(f"  {out / run.relative}: " + "; ".join(changes))
    if stale:
        raise SweepError(f"{len(stale)} finished run(s) under {out} were made with other settings than the "
                         "sweep file asks for now (found -> expected):\n" + "\n".join(stale[:10])
                         + "\nuse another --out for the changed sweep, or remove those folders")
    return states


RECORD_FILE = "sweep.json"


def write_record(sweep, out: Path) -> Path:
    """OUT/sweep.json: the sweep's protocol and runs with their method, held-out domains, trial
    seed, trial, run seed and searched values, so that selection across trials
    (rsc_dist.results.sweep_select) knows which runs are the
    same hyperparameter setting. Written by every launcher that runs something (never by a
    dry run), atomically: W&B trials may write it at the same time (with the same content)."""
    import os
    import tempfile

    record = {"name": sweep.name, "file": str(sweep.path.resolve()), "preset": sweep.preset,
              "protocol": sweep.protocol,
              "runs": [{"name": r.name, "folder": str(r.relative), "method": r.method, "target": r.target,
                        "targets": list(r.targets), "seed": r.seed, "trial": r.trial, "run_seed": r.run_seed,
                        "hparams": r.hparams} for r in sweep.runs]}
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".sweep.json.")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, out / RECORD_FILE)
    return out / RECORD_FILE
