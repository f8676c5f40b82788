"""DomainBed's own sweep output read as trials (rsc_dist.results.trials.TrialRun), so a lab's
existing DomainBed runs and this project's runs share one selection and one table.

DomainBed's `sweep.py launch` writes one folder per run under its output folder, holding
`results.jsonl` (one JSON record per checkpoint: `step`, `env{i}_in_acc`, `env{i}_out_acc`
for every environment i, `args` with dataset, algorithm, test_envs, hparams_seed and
trial_seed, and `hparams`) and, once the run finished, a file `done`. A record becomes an
evaluation record: the sources' out-splits are the validation (val_per_domain), the target's
in-split its accuracy (target_acc) and its out-split target_out_acc, as DomainBed's
model_selection.py reads them. Environments get the names of the dataset's domain folders in
DomainBed's order (sorted), as this project's converters name them, so both kinds of runs fill
the same columns; an unknown dataset keeps env0, env1, ...

Unlike DomainBed's collect_results, a run without `done` takes no part (it is listed as not
finished), as in this project's sweeps; DomainBed would count the records it has so far.
DomainBed records no sample counts, so the pooled source accuracy (source_val_pooled) cannot
be computed from them.
"""

from __future__ import annotations

import json
from pathlib import Path

from rsc_dist.core.protocols import dataset_key
from rsc_dist.results.tables import ResultsError
from rsc_dist.results.trials import SweepRuns, TrialRun

RECORDS_FILE = "results.jsonl"
DONE_FILE = "done"
SOURCE = "DomainBed"
# DomainBed's environments, in its order: its datasets' domain folders, sorted, named as this
# project's converters name them (key-safe: "Real World" -> "Real_World").
ENVIRONMENTS = {
    "pacs": ("art_painting", "cartoon", "photo", "sketch"),
    "vlcs": ("Caltech101", "LabelMe", "SUN09", "VOC2007"),
    "officehome": ("Art", "Clipart", "Product", "Real_World"),
    "terraincognita": ("location_100", "location_38", "location_43", "location_46"),
    "domainnet": ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
}


def is_domainbed_output(folder: Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and any((sub / RECORDS_FILE).is_file() for sub in folder.iterdir() if sub.is_dir())


def environment_names(dataset: str, count: int) -> tuple[str, ...]:
    names = ENVIRONMENTS.get(dataset_key(dataset))
    return names if names is not None and len(names) == count else tuple(f"env{i}" for i in range(count))


def protocol_of(hparams: dict) -> str:
    """Which DomainBed the hyperparameters come from: the 2020 code had no resnet50_augmix (and
    always froze BatchNorm); the 2024 defaults train timm's resnet50.ram_in1k with live BatchNorm."""
    if "resnet50_augmix" not in hparams:
        return "domainbed-2020"
    if hparams.get("resnet50_augmix") and not hparams.get("freeze_bn"):
        return "domainbed-2024"
    return f"domainbed (resnet50_augmix={hparams.get('resnet50_augmix')}, freeze_bn={hparams.get('freeze_bn')})"


def load_domainbed_runs(folder: Path) -> SweepRuns:
    runs, missing = [], []
    for sub in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        path = sub / RECORDS_FILE
        if not path.is_file():
            continue
        if not (sub / DONE_FILE).is_file():
            missing.append(sub.name)
            continue
        runs.append(_run(sub.name, path, _records(path)))
    return SweepRuns(f"{Path(folder).name} (DomainBed)", runs, missing)


def _records(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ResultsError(f"{path}, line {number}: not valid JSON: {exc}") from None
        for key in ("step", "args", "hparams"):
            if key not in record:
                raise ResultsError(f"{path}, line {number}: missing key {key!r} (not DomainBed's results.jsonl?)")
        records.append(record)
    if not records:
        raise ResultsError(f"{path}: no record in a run marked done")
    return records


def _run(name: str, path: Path, records: list[dict]) -> TrialRun:
    args, hparams = records[0]["args"], records[0]["hparams"]
    try:
        dataset, algorithm, test_envs = str(args["dataset"]), str(args["algorithm"]), list(args["test_envs"])
        hparams_seed, trial_seed = int(args["hparams_seed"]), int(args["trial_seed"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ResultsError(f"{path}: args lacks {exc} (it needs dataset, algorithm, test_envs, hparams_seed, "
                           "trial_seed)") from None
    count = 0
    while f"env{count}_in_acc" in records[0]:
        count += 1
    names = environment_names(dataset, count)
    if not test_envs or any(not 0 <= e < count for e in test_envs):
        raise ResultsError(f"{path}: test_envs {test_envs} are not among its {count} environments")
    history = tuple(_evaluation(record, names, test_envs, path) for record in records)
    arch = "resnet18" if hparams.get("resnet18") else "resnet50"
    return TrialRun(name, SOURCE, dataset, algorithm.lower(), tuple(names[e] for e in test_envs), names, trial_seed,
                    hparams_seed, dict(hparams), history, protocol_of(hparams), arch, "DomainBed's own sweep")


def _evaluation(record: dict, names: tuple[str, ...], test_envs: list[int], path: Path) -> dict:
    """A DomainBed record as an evaluation record: without sample counts (val_n), which
    DomainBed does not write; the source mean is then the mean of the sources listed."""
    try:
        return {"step": int(record["step"]), "val_acc": None, "val_acc_mean": None,
                "val_per_domain": {names[i]: float(record[f"env{i}_out_acc"]) for i in range(len(names))
                                   if i not in test_envs},
                "target_acc": {names[t]: float(record[f"env{t}_in_acc"]) for t in test_envs},
                "target_out_acc": {names[t]: float(record[f"env{t}_out_acc"]) for t in test_envs}}
    except (KeyError, TypeError, ValueError) as exc:
        raise ResultsError(f"{path}: step {record.get('step')}: missing or bad {exc}") from None
