"""The finished runs of a sweep as trials to select from: this project's sweeps (OUT/sweep.json
and each run's results.json) here, DomainBed's own output in domainbed_records.py; both give
``TrialRun``s, so one selection and one set of tables serve them side by side."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rsc_dist.core.contracts import RESULTS_FILE
from rsc_dist.results.tables import UNRECORDED_PROTOCOL, ResultsError
from rsc_dist.sweep.state import RECORD_FILE

OURS = "rsc_dist"


@dataclass(frozen=True)
class TrialRun:
    """One finished run of a sweep: which trial of which cell it is, and its evaluations."""
    name: str
    source: str  # "rsc_dist", or "DomainBed" for DomainBed's own output
    dataset: str
    method: str  # the method's registered (lower-case) name
    targets: tuple[str, ...]  # held-out domains: one, or two for leave-one-domain-out
    domains: tuple[str, ...]  # every domain of the dataset the run saw (sources and targets), sorted
    seed: int  # the trial seed
    trial: int  # the trial (DomainBed: the hparams seed)
    hparams: dict
    history: tuple[dict, ...]  # evaluation records (rsc_dist/core/contracts.py, EVALUATION_RECORD)
    protocol: str  # the run's protocol label (results.json "protocol")
    arch: str
    sweep_protocol: str  # how the sweep drew its trials: paired | domainbed | DomainBed's own


@dataclass
class SweepRuns:
    """What a folder holds: its description, the finished runs, the names of unfinished ones."""
    name: str
    runs: list[TrialRun]
    missing: list[str]


def is_sweep(folder: Path) -> bool:
    return (Path(folder) / RECORD_FILE).is_file()


def load_sweep_runs(folder: Path) -> SweepRuns:
    """A sweep folder of this project: OUT/sweep.json and OUT/METHOD/TARGET/tTT-sS/results.json."""
    record_path = Path(folder) / RECORD_FILE
    try:
        record = json.loads(record_path.read_text())
        entries = record["runs"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ResultsError(f"{record_path}: cannot read the sweep record: {exc}") from None
    runs, missing = [], []
    for entry in entries:
        path = Path(folder) / entry["folder"] / RESULTS_FILE
        if not path.is_file():
            missing.append(entry["name"])
            continue
        try:
            data = json.loads(path.read_text())
            history = data["history"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ResultsError(f"{path}: cannot read its history: {exc}") from None
        if not isinstance(history, list) or not all(isinstance(e, dict) for e in history):
            raise ResultsError(f"{path}: 'history' must be a list of evaluations")
        targets = tuple(entry.get("targets") or data.get("targets") or [])
        if not targets:
            targets = tuple((entry.get("target") or "").split("+"))
        # Sorted, as converters write a manifest's domains and DomainBed numbers its environments.
        domains = tuple(sorted({*data.get("sources", []), *data.get("targets", targets)}))
        runs.append(TrialRun(entry["name"], OURS, str(data.get("dataset") or "?"), entry["method"], targets, domains,
                             int(entry["seed"]), int(entry["trial"]), dict(entry.get("hparams") or {}),
                             tuple(history), str(data.get("protocol") or UNRECORDED_PROTOCOL),
                             str(data.get("arch") or "?"), str(record.get("protocol") or "paired")))
    return SweepRuns(str(record.get("name") or Path(folder).name), runs, missing)
