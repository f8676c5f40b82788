"""Selection across hyperparameter trials, DomainBed's protocol, over a sweep's folder.

    python -m rsc_dist.results SWEEP_OUT --selection source_val_mean

For each method, target and trial seed, every trial (hyperparameter setting) of that cell is a
candidate; within each trial's run the rule picks an evaluation (rsc_dist/core/selection.py), and the
trial whose picked evaluation scores best under the rule wins. Its target accuracy is the
cell's value for that seed; the table gives mean +- std over the trial seeds (and the average
over targets as results.py does). A second table shows every hyperparameter setting on its
own: the target accuracy its runs reach at the evaluation the rule picks, over seeds.

What each rule maximizes, within a run and across trials (docs/method.md, "Sweeps and
selection across trials"):
    source_val_mean    mean over source domains of their validation accuracy (DomainBed's
                       training-domain validation)
    source_val_pooled  pooled source-validation accuracy (the released code)
    last               the last evaluation of each run; trials compared by its mean source-val
                       accuracy (no early stopping, training-domain validation across trials)
    oracle             the best target accuracy, within runs and across trials: an upper bound
                       that looks at the test domain, labelled ORACLE in every output
Ties go to the earlier evaluation and to the lower trial number.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from rsc_dist.core import selection
from rsc_dist.core.contracts import RESULTS_FILE
from rsc_dist.results.tables import Cell, ResultsError, average_cell
from rsc_dist.sweep.state import RECORD_FILE


def is_sweep(folder: Path) -> bool:
    return (Path(folder) / RECORD_FILE).is_file()


@dataclass(frozen=True)
class TrialRun:
    """One finished run of the sweep and what the rule picks in it."""
    name: str
    method: str
    target: str
    seed: int
    trial: int
    hparams: dict
    step: int  # the picked evaluation's step
    score: float | None  # what the rule compares across trials (None: cannot be compared)
    target_acc: float  # mean over the run's targets at that step


def trial_score(rule: str, evaluation: dict) -> float | None:
    """The value trials are compared by, for the evaluation the rule picked in a run."""
    if rule == "last":
        return selection.source_val_mean(evaluation)
    return selection.score(rule, evaluation)


def load_trial_runs(folder: Path, rule: str) -> tuple[dict, list[TrialRun], list[str]]:
    """(the sweep record, every finished run with its pick, the names of unfinished runs)."""
    selection.check_rule(rule)
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
        try:
            picked = selection.select(history, rule)
        except selection.SelectionError as exc:
            raise ResultsError(f"{path}: {exc}") from None
        accuracy = selection.target_mean(picked)
        if accuracy is None:
            raise ResultsError(f"{path}: history step {picked.get('step')} has no target accuracy")
        target = entry["target"] or "+".join(data.get("targets") or ["default"])
        runs.append(TrialRun(entry["name"], entry["method"], target, entry["seed"], entry["trial"],
                             entry["hparams"], picked["step"], trial_score(rule, picked), accuracy))
    if not runs:
        raise ResultsError(f"no finished run in the sweep {folder} ({len(missing)} not finished)")
    return record, runs, missing


def choose(runs: list[TrialRun]) -> dict[tuple[str, str, int], TrialRun]:
    """{(method, target, seed): the winning trial's run}. Runs whose score is None never win
    while another can be compared; the lower trial number wins ties."""
    chosen: dict[tuple[str, str, int], TrialRun] = {}
    for run in sorted(runs, key=lambda r: r.trial):
        key = (run.method, run.target, run.seed)
        incumbent = chosen.get(key)
        if incumbent is None or (run.score is not None
                                 and (incumbent.score is None or run.score > incumbent.score)):
            chosen[key] = run
    return chosen


def _row(per_target: dict[str, dict[int, float]], targets: list[str]) -> dict[str, Cell]:
    cells = {t: Cell.of(list(per_target.get(t, {}).values())) for t in targets}
    cells["Avg"] = average_cell({t: per_target.get(t, {}) for t in targets})
    return cells


def _method_order(methods) -> list[str]:
    return sorted(methods, key=lambda m: (m != "erm", m))


def _hparams_text(hparams: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in hparams.items()) or "preset"


def tables(runs: list[TrialRun], rule: str) -> tuple[list[str], dict, dict, dict]:
    """(targets, selected rows {method: cells}, setting rows {(method, trial): cells},
    chosen {(method, target, seed): run}). Accuracies in percent."""
    targets = sorted({r.target for r in runs})
    chosen = choose(runs)
    selected = {}
    for method in _method_order({r.method for r in runs}):
        per_target = {t: {seed: 100 * run.target_acc for (m, t2, seed), run in chosen.items() if m == method and t2 == t}
                      for t in targets}
        selected[method] = _row(per_target, targets)
    settings = {}
    for method, trial in sorted({(r.method, r.trial) for r in runs}, key=lambda k: (k[0] != "erm", k)):
        mine = [r for r in runs if (r.method, r.trial) == (method, trial)]
        per_target = {t: {r.seed: 100 * r.target_acc for r in mine if r.target == t} for t in targets}
        settings[(method, trial)] = _row(per_target, targets)
    return targets, selected, settings, chosen


def markdown(record: dict, runs: list[TrialRun], missing: list[str], rule: str) -> str:
    targets, selected, settings, chosen = tables(runs, rule)
    header = "| {} | " + " | ".join(targets) + " | Avg |"
    rule_text = selection.LABELS[rule] + ("" if rule != "last" else "; trials by the last step's mean source val")
    lines = [f"## Sweep {record.get('name', '?')}: selection across trials, {rule_text}", ""]
    if rule == selection.ORACLE:
        lines += ["**ORACLE**: chosen by target-domain accuracy, an upper bound, not a domain-generalization "
                  "result.", ""]
    if missing:
        lines += [f"{len(missing)} of {len(missing) + len(runs)} runs are not finished and take no part "
                  f"(first: {', '.join(missing[:3])}).", ""]
    lines += ["### Target accuracy (%) of the chosen trial; mean ± std over trial seeds (n)", "",
              header.format("method"), "|---|" + "---|" * (len(targets) + 1)]
    for method, cells in selected.items():
        lines.append(f"| {method.upper()} | " + " | ".join(cells[c].text() for c in targets + ["Avg"]) + " |")
    lines += ["", "### Chosen trial per method, target and seed", "",
              "| method | target | seed | trial | step | score | target acc (%) | hyperparameters |",
              "|---|---|---|---|---|---|---|---|"]
    for (method, target, seed), run in sorted(chosen.items(), key=lambda kv: (kv[0][0] != "erm", kv[0])):
        score = "-" if run.score is None else f"{100 * run.score:.2f}"
        lines.append(f"| {method.upper()} | {target} | {seed} | t{run.trial:02d} | {run.step} | {score} "
                     f"| {100 * run.target_acc:.2f} | {_hparams_text(run.hparams)} |")
    lines += ["", "### Every hyperparameter setting: target accuracy (%) at the step the rule picks; "
              "mean ± std over seeds (n)", "", header.format("method, trial") + " hyperparameters |",
              "|---|" + "---|" * (len(targets) + 2)]
    hparams = {(r.method, r.trial): r.hparams for r in runs}
    for (method, trial), cells in settings.items():
        lines.append(f"| {method.upper()} t{trial:02d} | " + " | ".join(cells[c].text() for c in targets + ["Avg"])
                     + f" | {_hparams_text(hparams[(method, trial)])} |")
    return "\n".join(lines) + "\n"


def records(runs: list[TrialRun], rule: str) -> list[dict]:
    """Tidy rows for CSV: the selected cells, then every setting's cells."""
    targets, selected, settings, _ = tables(runs, rule)
    out = []
    for table, rows in (("selected", {(m, None): c for m, c in selected.items()}), ("setting", settings)):
        for (method, trial), cells in rows.items():
            for column in targets + ["Avg"]:
                cell = cells[column]
                out.append({"table": table, "selection": rule, "method": method,
                            "trial": "" if trial is None else trial, "column": column,
                            "mean": "" if cell.mean is None else round(cell.mean, 4),
                            "std": "" if cell.std is None else round(cell.std, 4), "n": cell.n})
    return out


def report(folder: Path, rule: str, out: Path | None = None) -> int:
    """Print the tables; write OUT/selection-RULE.md and .csv. Returns the exit code."""
    import sys

    try:
        record, runs, missing = load_trial_runs(folder, rule)
    except (ResultsError, selection.SelectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = markdown(record, runs, missing, rule)
    out = Path(out or folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"selection-{rule}.md").write_text(text)
    with open(out / f"selection-{rule}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["table", "selection", "method", "trial", "column", "mean", "std", "n"])
        writer.writeheader()
        writer.writerows(records(runs, rule))
    print(text)
    print(f"wrote {out / f'selection-{rule}.md'} and .csv", file=sys.stderr)
    return 0

