"""Selection across hyperparameter trials and DomainBed's tables, over sweep folders (this
project's, DomainBed's own output, or both side by side).

    python -m rsc_dist.results SWEEP_OUT [DOMAINBED_OUT ...] --selection RULE [--latex]

For each method, dataset, test domain and trial seed (a cell), every trial that held out that
domain alone is a candidate. Within a trial's run the rule picks a step; the trial whose pick
scores best wins, and the test domain's accuracy at its step is the cell's value for that seed
(DomainBed's SelectionMethod.sweep_acc). The rules (rsc_dist/core/selection.py; docs/method.md,
"Sweeps and selection across trials"):

    source_val_mean       DomainBed's training-domain validation: the step and the trial with
                          the best mean over the source domains of their validation accuracy
    source_val_pooled     the same with the pooled source accuracy (the released RSC code)
    last                  each run's last step; trials by its mean source validation
    oracle                the best target step and trial: an upper bound, labelled ORACLE
    domainbed_oracle      DomainBed's test-domain validation: each run's last step, trials by
                          the target's out-split, the in-split reported; labelled ORACLE
    leave_one_domain_out  DomainBed's leave-one-domain-out: a step's score is the mean over the
                          other domains j of the accuracy on j of the run holding out (target, j)
                          at that step (the sweep needs target_pairs)

Ties go to the earlier step and to the lower trial (DomainBed breaks ties between trials by
the order it happened to read them). The tables are DomainBed's: per dataset, mean ± standard
error over trial seeds (--error std: sample std) per test domain, an Avg column of the
column means, and an averages table (per trial seed the mean over the dataset's test domains,
then mean ± error over trial seeds, and their mean). Every table names the protocols, the rule
and, per cell, the trial seeds and trials behind it (n x k). Runs that have not finished take no
part and are counted.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from rsc_dist.core import selection
from rsc_dist.core.protocols import dataset_key
from rsc_dist.results import render
from rsc_dist.results.render import Cell
from rsc_dist.results.tables import ResultsError, reference_rows
from rsc_dist.results.trials import SweepRuns, TrialRun


@dataclass(frozen=True)
class Pick:
    """The step a rule picks in one trial's run, what trials are compared by, and the result."""
    run: TrialRun
    step: int
    score: float | None  # None: this trial cannot be compared (never wins while another can)
    accuracy: float  # the test domain's accuracy at the step (a fraction)


def pick(run: TrialRun, rule: str, pairs: dict[str, TrialRun] | None = None) -> Pick | None:
    """What ``rule`` picks in ``run`` (one held-out domain); None when it picks nothing
    (leave-one-domain-out without every pair run)."""
    (target,) = run.targets
    if rule == "leave_one_domain_out":
        return _leave_one_out(run, pairs or {})
    try:
        evaluation = selection.select(list(run.history), rule)
    except selection.SelectionError as exc:
        raise ResultsError(f"run {run.name} ({run.source}): {exc}") from None
    accuracy = (evaluation.get("target_acc") or {}).get(target)
    if accuracy is None:
        raise ResultsError(f"run {run.name} ({run.source}): step {evaluation.get('step')} has no accuracy on {target}")
    return Pick(run, evaluation["step"], selection.trial_score(rule, evaluation), accuracy)


def _leave_one_out(run: TrialRun, pairs: dict[str, TrialRun]) -> Pick | None:
    """DomainBed's LeaveOneOutSelectionMethod: at each step of the run holding out the target t,
    the mean over every other domain j of the accuracy on j of the run holding out (t, j) at the
    same step; the first step with the best mean. None unless every pair run exists."""
    (target,) = run.targets
    others = [d for d in run.domains if d != target]
    if not others or any(d not in pairs for d in others):
        return None
    at_step = {d: {e.get("step"): e for e in pairs[d].history} for d in others}
    best = None
    for evaluation in run.history:
        step = evaluation.get("step")
        scores = [((at_step[d].get(step) or {}).get("target_acc") or {}).get(d) for d in others]
        accuracy = (evaluation.get("target_acc") or {}).get(target)
        if accuracy is None or any(v is None for v in scores):
            continue
        score = statistics.fmean(scores)
        if best is None or score > best.score:
            best = Pick(run, step, score, accuracy)
    return best


CellKey = tuple  # (source, dataset key, method, test domain, trial seed)


def choose(runs: list[TrialRun], rule: str) -> tuple[dict[CellKey, Pick], dict[CellKey, int]]:
    """({cell: the winning trial's pick}, {cell: how many trials could be compared})."""
    selection.check_rule(rule)
    if rule == "source_val_pooled" and any(r.source != "rsc_dist" for r in runs):
        raise ResultsError("source_val_pooled needs the sources' validation sample counts, which DomainBed's "
                           "records do not carry; use source_val_mean (its training-domain validation)")
    pair_runs: dict[tuple, dict[str, TrialRun]] = {}
    for run in runs:
        if len(run.targets) == 2:
            for held, other in (run.targets, run.targets[::-1]):
                key = (run.source, dataset_key(run.dataset), run.method, held, run.seed, run.trial)
                pair_runs.setdefault(key, {})[other] = run
    chosen: dict[CellKey, Pick] = {}
    candidates: dict[CellKey, int] = {}
    for run in sorted((r for r in runs if len(r.targets) == 1), key=lambda r: r.trial):
        key = (run.source, dataset_key(run.dataset), run.method, run.targets[0], run.seed)
        pairs = pair_runs.get((*key[:4], run.seed, run.trial), {})
        found = pick(run, rule, pairs)
        if found is None:
            continue
        candidates[key] = candidates.get(key, 0) + (found.score is not None)
        incumbent = chosen.get(key)
        better = found.score is not None and (incumbent is None or incumbent.score is None
                                              or found.score > incumbent.score)
        if incumbent is None or better:
            chosen[key] = found
    if not chosen:
        why = (" (leave_one_domain_out needs, for each trial, the runs that hold out the target with each other "
               "domain: a sweep with target_pairs: true)" if rule == "leave_one_domain_out" else "")
        raise ResultsError(f"selection {rule} chose nothing: no trial could be compared{why}")
    return chosen, candidates


# ---------------------------------------------------------------------------------------------
# Tables


@dataclass
class Report:
    tables: list[render.Table]
    heading: str
    notes: list[str]


def _row_label(source: str, method: str, sources: set[str]) -> str:
    return method.upper() + (f" [{source}]" if len(sources) > 1 else "")


def _method_order(labels) -> list[str]:
    return sorted(labels, key=lambda m: (not m.startswith("ERM"), m))


def build_report(folders: list[SweepRuns], rule: str, error: str = "se", paper: bool = False) -> Report:
    runs = [r for f in folders for r in f.runs]
    if not runs:
        missing = sum(len(f.missing) for f in folders)
        raise ResultsError(f"no finished run in {', '.join(f.name for f in folders)} ({missing} not finished)")
    chosen, candidates = choose(runs, rule)
    protocols = sorted({f"{r.sweep_protocol} sweep, {r.protocol}" for r in runs})
    about = [f"Protocol: {'; '.join(protocols)}. Selection: {selection.LABELS[rule]}.",
             f"Cells: mean ± {render.ERRORS[error]} over trial seeds; (n x k) = n trial seeds, each the best of k "
             "trials; Avg: the mean of the columns (DomainBed's)."]
    tables, averages = [], {}
    datasets = sorted({dataset_key(r.dataset) for r in runs})
    for key in datasets:
        ds_runs = [r for r in runs if dataset_key(r.dataset) == key]
        name = ds_runs[0].dataset
        domains = sorted({d for r in ds_runs for d in r.domains})
        columns = [d for d in domains if any(c[1] == key and c[3] == d for c in chosen)]
        sources = {r.source for r in ds_runs}
        rows, per_seed = {}, {}
        for (source, dataset, method, target, seed), found in chosen.items():
            if dataset != key:
                continue
            label = _row_label(source, method, sources)
            trials = candidates[(source, dataset, method, target, seed)]
            rows.setdefault(label, {}).setdefault(target, []).append((seed, 100 * found.accuracy, trials))
        table_rows = {}
        for label in _method_order(rows):
            cells = {}
            for target in columns:
                values = rows[label].get(target, [])
                cells[target] = Cell.of([v for _, v, _ in values], error,
                                        trials=render.trials_text([k for _, _, k in values]))
                for seed, value, _ in values:
                    per_seed.setdefault(label, {}).setdefault(seed, []).append(value)
            means = [cells[c].mean for c in columns]
            cells["Avg"] = Cell(statistics.fmean(means)) if means and None not in means else Cell()
            table_rows[label] = cells
            averages.setdefault(label, {})[name] = [statistics.fmean(v) for v in per_seed[label].values()]
        archs = sorted({r.arch for r in ds_runs})
        tables.append(render.Table(
            f"{name}: target accuracy (%) of the chosen trial, {'ORACLE, ' if rule in selection.ORACLES else ''}"
            f"selection {rule}", about, columns + ["Avg"], table_rows,
            reference_rows(name, archs, columns) if paper else [],
            csv_fields={"table": "selected", "dataset": name, "metric": "best", "protocol": "; ".join(protocols),
                        "selection": rule, "error": error},
            key=f"{name}/selection_{rule}", selection=rule))
    tables.append(_averages_table(averages, [t.csv_fields["dataset"] for t in tables], about, rule, error, protocols))
    tables.append(_chosen_table(chosen, rule))
    if all(r.sweep_protocol == "paired" for r in runs):
        tables.append(_settings_table(runs, rule, error))
    names = ", ".join(f.name for f in folders)
    notes = [f"{len(f.missing)} of {len(f.missing) + len(f.runs)} runs of {f.name} are not finished and take no part "
             f"(first: {', '.join(f.missing[:3])})." for f in folders if f.missing]
    if rule in selection.ORACLES:
        notes.insert(0, "**ORACLE**: chosen by target-domain accuracy, an upper bound, not a domain-generalization "
                        "result.")
    return Report(tables, f"Sweep {names}: selection across trials, {selection.LABELS[rule]}", notes)


def _averages_table(averages: dict, datasets: list[str], about: list[str], rule: str, error: str,
                    protocols: list[str]) -> render.Table:
    """DomainBed's "Averages": per trial seed the mean over a dataset's test domains, then mean ±
    error over trial seeds; Avg the mean over datasets."""
    rows = {}
    for label in _method_order(averages):
        cells = {d: Cell.of(averages[label].get(d, []), error) for d in datasets}
        means = [cells[d].mean for d in datasets]
        cells["Avg"] = Cell(statistics.fmean(means)) if None not in means else Cell()
        rows[label] = cells
    about = [about[0], f"Cells: per trial seed the mean over the dataset's test domains, then mean ± "
                       f"{render.ERRORS[error]} over trial seeds (n); Avg: the mean over datasets."]
    return render.Table(f"Averages over test domains, selection {rule}", about, datasets + ["Avg"], rows,
                        csv_fields={"table": "averages", "dataset": "", "metric": "best",
                                    "protocol": "; ".join(protocols), "selection": rule, "error": error},
                        key=f"averages/selection_{rule}", selection=rule)


def _hparams_text(hparams: dict, shown: set[str] | None = None) -> str:
    items = [(k, v) for k, v in hparams.items() if shown is None or k in shown]
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items) or "preset"


def _varying(runs: list[TrialRun]) -> dict[tuple, set[str]]:
    """{(source, method): the hyperparameters that differ between its runs} (DomainBed's records
    carry every hyperparameter; the constant ones say nothing)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run.source, run.method), []).append(run.hparams)
    return {key: {k for k in set().union(*items) if len({repr(h.get(k)) for h in items}) > 1} or set().union(*items)
            for key, items in groups.items()}


def _chosen_table(chosen: dict[CellKey, Pick], rule: str) -> render.Table:
    shown = _varying([p.run for p in chosen.values()])
    rows, extra = {}, {}
    for (source, _, method, target, seed), found in sorted(chosen.items(), key=lambda kv: (kv[0][2] != "erm", kv[0])):
        label = f"{method.upper()} [{source}] {found.run.dataset} {target} seed {seed}"
        rows[label] = {}
        extra[label] = {"trial": f"t{found.run.trial:02d}", "step": str(found.step),
                        "score": "-" if found.score is None else f"{100 * found.score:.2f}",
                        "accuracy (%)": f"{100 * found.accuracy:.2f}",
                        "hyperparameters": _hparams_text(found.run.hparams, shown[(source, method)])}
    return render.Table(f"Chosen trial per method, test domain and trial seed (selection {rule})",
                        ["score: what trials were compared by (%)."], [], rows, first_column="cell",
                        csv_fields={"table": "chosen", "selection": rule}, extra=extra)


def _settings_table(runs: list[TrialRun], rule: str, error: str) -> render.Table:
    """Every hyperparameter setting of a paired sweep on its own (its trials are shared by the
    trial seeds): the target accuracy at the step the rule picks in each of its runs."""
    per_setting: dict[tuple, dict[str, list[float]]] = {}
    hparams = {}
    for run in runs:
        if len(run.targets) != 1 or rule == "leave_one_domain_out":
            continue
        found = pick(run, rule)
        key = (run.method, run.trial)
        per_setting.setdefault(key, {}).setdefault(run.targets[0], []).append(100 * found.accuracy)
        hparams[key] = run.hparams
    columns = sorted({t for cells in per_setting.values() for t in cells})
    rows, extra = {}, {}
    for method, trial in sorted(per_setting, key=lambda k: (k[0] != "erm", k)):
        label = f"{method.upper()} t{trial:02d}"
        rows[label] = {t: Cell.of(per_setting[(method, trial)].get(t, []), error) for t in columns}
        extra[label] = {"hyperparameters": _hparams_text(hparams[(method, trial)])}
    return render.Table(f"Every hyperparameter setting: target accuracy (%) at the step {rule} picks",
                        [f"mean ± {render.ERRORS[error]} over trial seeds (n)."], columns, rows,
                        first_column="method, trial",
                        csv_fields={"table": "setting", "selection": rule, "error": error}, extra=extra)


def write_report(report: Report, out: Path, rule: str) -> tuple[Path, Path, Path]:
    """OUT/selection-RULE.md, .csv and .tex."""
    import csv

    out.mkdir(parents=True, exist_ok=True)
    md = out / f"selection-{rule}.md"
    md.write_text(markdown(report))
    tex = out / f"selection-{rule}.tex"
    tex.write_text(render.latex_document(report.tables, report.heading))
    csv_path = out / f"selection-{rule}.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=render.CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for table in report.tables:
            writer.writerows(render.csv_rows(table))
    return md, csv_path, tex


def markdown(report: Report) -> str:
    return "\n".join([f"## {report.heading}", "", *[f"{n}\n" for n in report.notes],
                      *[render.markdown(t) for t in report.tables]])
