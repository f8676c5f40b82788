"""python -m rsc_dist.results: runs, sweeps and DomainBed's own output as tables.

    python -m rsc_dist.results runs/pacs_r18 --paper              # per-run tables (each run's own rule)
    python -m rsc_dist.results runs/ --selection oracle --metric best
    python -m rsc_dist.results runs/db_pacs --selection source_val_mean           # a sweep: DomainBed's tables
    python -m rsc_dist.results runs/db_pacs /data/domainbed_out --selection leave_one_domain_out --latex

Two modes, one set of options:
- per run (folders of results.json files): one table per dataset and metric, each run's "best"
  by its own train.selection or by --selection (a rule that chooses within a run), mean ± std
  over seeds (rsc_dist/results/tables.py). Writes OUT/results.md, .csv, .tex.
- across trials (--selection on a sweep folder, OUT/sweep.json, or on DomainBed's output, its
  run folders with results.jsonl and done): DomainBed's tables, mean ± standard error over
  trial seeds (rsc_dist/results/sweep_select.py). Writes OUT/selection-RULE.md, .csv, .tex.
Markdown goes to stdout (--latex: LaTeX, booktabs). --wandb logs every table as a wandb.Table
in one W&B run (job type "results"): online with an API key, else offline under OUT/wandb/
(`wandb sync OUT/wandb/offline-run-*`); WANDB_MODE=disabled skips it. An option that means
nothing in a mode is refused with the reason (exit 2), never ignored.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from rsc_dist.core import selection
from rsc_dist.core.errors import UsageError
from rsc_dist.observe.identity import wandb_mode_from_environment
from rsc_dist.results import render, sweep_select, tables
from rsc_dist.results.domainbed_records import is_domainbed_output, load_domainbed_runs
from rsc_dist.results.trials import is_sweep, load_sweep_runs

EXIT_USAGE = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rsc_dist.results", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_dirs", type=Path, nargs="+", metavar="FOLDER",
                   help="folders searched for results.json (per run), or sweep folders / DomainBed output "
                   "(with --selection); several are tabulated side by side")
    p.add_argument("--out", type=Path, help="where the files go (default: the first FOLDER)")
    p.add_argument("--selection", choices=selection.RULES,
                   help="per run: choose each run's best from its history with this rule (default: its own "
                   "train.selection); on a sweep: select across trials (DomainBed). oracle and domainbed_oracle "
                   "look at the test domain and are labelled ORACLE; domainbed_oracle and leave_one_domain_out "
                   "need a sweep")
    p.add_argument("--metric", choices=("best", "last", "both"),
                   help="per run: the best step (by the rule), the last, or both tables (default both)")
    p.add_argument("--error", choices=tuple(render.ERRORS),
                   help="the cells' spread: std (sample std) or se (DomainBed's standard error); default std per "
                   "run, se across trials")
    p.add_argument("--latex", action="store_true", help="print LaTeX (booktabs) instead of Markdown")
    p.add_argument("--paper", action="store_true", help="add the paper's (and DomainBed's) published numbers")
    p.add_argument("--top5", action="store_true",
                   help="per run: also top-5 tables (runs that report target_top5; the ImageNet-Sketch table)")
    p.add_argument("--wandb", action="store_true",
                   help="log the tables to W&B (offline under OUT/wandb/ without an API key)")
    p.add_argument("--wandb-project", default=os.environ.get("WANDB_PROJECT", "rsc_dist"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        kinds = [_kind(folder) for folder in args.runs_dirs]
        across_trials = args.selection is not None and any(k != "runs" for k in kinds)
        if across_trials:
            rendered, written, heading = _across_trials(args, kinds)
        else:
            rendered, written, heading = _per_run(args, kinds)
    except UsageError as exc:
        print(f"rsc_dist.results: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(render.latex_document(rendered, heading) if args.latex else written[0].read_text())
    print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)
    if args.wandb:
        out = args.out or args.runs_dirs[0]
        mode = log_to_wandb(rendered, args.runs_dirs[0], args.wandb_project, out)
        if mode is None:
            print("W&B disabled or not installed: tables not logged", file=sys.stderr)
        elif mode == "offline":
            print(f"W&B offline: tables logged under {out / 'wandb'}; upload them with "
                  f"`wandb sync {out / 'wandb'}/offline-run-*`", file=sys.stderr)
    return 0


def _kind(folder: Path) -> str:
    if is_sweep(folder):
        return "sweep"
    if is_domainbed_output(folder):
        return "domainbed"
    return "runs"


def _across_trials(args, kinds: list[str]):
    refused = [(flag, why) for flag, given, why in (
        ("--metric", args.metric is not None, "across trials the rule picks each run's step (--selection last: "
                                              "the last step)"),
        ("--top5", args.top5, "selection across trials reports top-1 (DomainBed's tables); the top-5 tables are "
                              "per run: drop --selection"))
        if given]
    if refused:
        raise UsageError("; ".join(f"{flag}: {why}" for flag, why in refused))
    plain = [str(f) for f, k in zip(args.runs_dirs, kinds) if k == "runs"]
    if plain:
        raise UsageError(f"{', '.join(plain)}: neither a sweep folder (sweep.json) nor DomainBed's output (run folders "
                         "with results.jsonl); selection across trials reads those")
    folders = [load_sweep_runs(f) if k == "sweep" else load_domainbed_runs(f) for f, k in zip(args.runs_dirs, kinds)]
    report = sweep_select.build_report(folders, args.selection, args.error or "se", paper=args.paper)
    out = args.out or args.runs_dirs[0]
    md, csv_path, tex = sweep_select.write_report(report, out, args.selection)
    return report.tables, [md, csv_path, tex], report.heading


def _per_run(args, kinds: list[str]):
    if args.selection in selection.SWEEP_RULES:
        raise UsageError(f"--selection {args.selection} compares the trials of a sweep (and {args.selection} "
                         "reads other runs or the targets' out-split): point it at a sweep folder (sweep.json)")
    domainbed = [str(f) for f, k in zip(args.runs_dirs, kinds) if k == "domainbed"]
    if domainbed:
        raise UsageError(f"{', '.join(domainbed)}: DomainBed's sweep output; its tables select across trials: "
                         "pass --selection RULE (DomainBed's own: source_val_mean, leave_one_domain_out, "
                         "domainbed_oracle)")
    runs = [run for folder in args.runs_dirs for run in tables.find_runs(folder, args.selection)]
    metric = args.metric or "both"
    built = tables.build_tables(runs, tables.METRICS if metric == "both" else (metric,), paper=args.paper,
                                top5=args.top5, error=args.error or "std")
    rendered = [t.rendered() for t in built]
    # Runs, not rows: an averaged model (train.averaging) is a row of its run.
    count = sum(len(tables.results_files(folder)) for folder in args.runs_dirs)
    heading = f"Results of {count} run(s) under {', '.join(map(str, args.runs_dirs))}"
    return rendered, write_outputs(rendered, args.out or args.runs_dirs[0], heading), heading


def write_outputs(rendered: list[render.Table], out: Path, heading: str) -> list[Path]:
    """OUT/results.md, .csv (one tidy row per cell) and .tex."""
    out.mkdir(parents=True, exist_ok=True)
    md = out / "results.md"
    md.write_text(f"{heading}\n\n" + "\n".join(render.markdown(t) for t in rendered))
    csv_path = out / "results.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=render.CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for t in rendered:
            writer.writerows(render.csv_rows(t))
    tex = out / "results.tex"
    tex.write_text(render.latex_document(rendered, heading))
    return [md, csv_path, tex]


def table_rows(t: render.Table) -> tuple[list[str], list[list]]:
    """A table's columns and rows as logged to W&B: ours ("runs"), then the published ones."""
    error = t.csv_fields.get("error", "err")
    columns = ["method", "source"] + [f"{c} mean" for c in t.columns] + [f"{c} {error}" for c in t.columns] + ["n"]
    data = []
    for label, cells in t.rows.items():
        empty = render.Cell()
        data.append([label, "runs"] + [cells.get(c, empty).mean for c in t.columns]
                    + [cells.get(c, empty).err for c in t.columns]
                    + [max((cells.get(c, empty).n for c in t.columns), default=0)])
    for label, values in t.reference_rows:
        data.append([label, t.reference_source] + [values.get(c) for c in t.columns] + [None] * len(t.columns) + [None])
    return columns, data


def log_to_wandb(rendered: list[render.Table], root: Path, project: str, out: Path | None = None) -> str | None:
    """Log every table with cells as a wandb.Table in one "results" run. Returns the mode used
    ("online", or "offline" with the run under OUT/wandb/), None when W&B is disabled or absent."""
    mode = wandb_mode_from_environment()
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        return None
    kwargs = {}
    if out is not None:
        (Path(out) / "wandb").mkdir(parents=True, exist_ok=True)
        kwargs["dir"] = str(out)
    run = wandb.init(project=project, job_type="results", name=f"results-{Path(root).resolve().name}",
                     config={"runs_dir": str(root)}, mode=mode, **kwargs)
    for t in rendered:
        if not t.key:
            continue
        columns, data = table_rows(t)
        run.log({f"results/{t.key}": wandb.Table(columns=columns, data=data)})
        run.summary[f"results/{t.key}/selection"] = t.selection  # an oracle's name says so
    run.finish()
    return mode
