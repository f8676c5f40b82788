"""Collect the results.json files of many runs into the paper's tables.

    python -m rsc_dist.results runs/pacs_resnet18-sweep            # prints Markdown, writes files
    python -m rsc_dist.results runs/ --metric best --paper --out reports/ --wandb

One table per dataset and metric: rows are methods (the algorithm, plus whatever else tells the
runs apart: architecture, RSC mode or percentages, preset, ...), columns are the target domains
and their average, cells are mean +- sample std over seeds in percent with the number of seeds.
"best" is the evaluation each run's selection rule chose (its train.selection, recorded in its
results.json); --selection RULE applies another rule to every run's history after the fact:
source_val_mean, source_val_pooled, last, or oracle (the best-target-accuracy step, labelled as
an oracle in every output). "last" is the final step; both tables by default. The average
column averages the per-target means; its std is over each seed's average, when every target
has the same seeds. `--paper` adds the paper's reported numbers for the
(dataset, architecture) pairs it knows; `--top5` adds top-5 tables. Writes OUT/results.md and
OUT/results.csv (one tidy row per cell) and, with --wandb, logs each table as a wandb.Table in
one W&B run (job type "results"): online with an API key, else offline under OUT/wandb/ (upload
later with `wandb sync OUT/wandb/offline-run-*`); WANDB_MODE=disabled skips it.

Reads results.json schema versions 1 to 4; the layout is described once, in
rsc_dist/core/contracts.py. A W&B run folder's copy or link of results.json (wandb/*run-*/files/) is
not a run of its own: each run is read once whatever its tracker.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rsc_dist import methods
from rsc_dist.config import flatten
from rsc_dist.core import selection
from rsc_dist.core.contracts import RESULTS_FILE, RESULTS_SCHEMA_VERSION
from rsc_dist.observe.identity import wandb_mode_from_environment

METRICS = ("best", "last")
# results.json layouts this reader understands: 1 (no "schema_version" key) up to the current one.
SCHEMA_VERSIONS = tuple(range(1, RESULTS_SCHEMA_VERSION + 1))

# Keys that change what is being compared; other config keys (paths, logging, seeds, targets)
# never split a row. Each registered method's section keys (rsc.*, coral.*) only label that
# method's runs.
METHOD_KEYS = (
    "preset", "model.arch", "model.pretrained",
    *(key for name in methods.NAMES for key in methods.section_keys(name)),
    "data.sampling", "data.batch_size", "data.image_size", "optim.name", "optim.lr",
    "train.epochs", "train.max_steps", "train.selection",
)
# What chose "best" in results.json files that do not say (schema versions 1 and 2).
OLD_SELECTION = "source_val_pooled"
# W&B's run folders (offline-run-DATE_TIME-ID, run-DATE_TIME-ID) keep a results.json in files/.
WANDB_RUN_FOLDER = re.compile(r"^(offline-)?run-\d{8}_\d{6}-\w+$")

# Domain order as the paper prints it, per dataset (others sort alphabetically after these).
DOMAIN_ORDER = {
    "pacs": ["art_painting", "cartoon", "sketch", "photo"],
    "vlcs": ["Caltech101", "LabelMe", "VOC2007", "SUN09"],
    "officehome": ["Art", "Clipart", "Product", "Real_World"],
}

# The paper's reported accuracies (%), as docs/method.md lists them ("Recipes and the paper's numbers").
# {(dataset, arch): [(row label, {domain or "Avg": value}), ...]}; missing cells print "-".
PAPER = {
    ("pacs", "resnet18"): [
        ("paper: ERM", {"art_painting": 78.96, "cartoon": 73.93, "sketch": 70.59, "photo": 96.28, "Avg": 79.94}),
        ("paper: RSC", {"art_painting": 83.43, "cartoon": 80.31, "sketch": 80.85, "photo": 95.99, "Avg": 85.15}),
    ],
    ("pacs", "resnet50"): [
        ("paper: ERM", {"Avg": 83.29}),
        ("paper: RSC", {"art_painting": 87.89, "cartoon": 82.16, "sketch": 83.35, "photo": 97.92, "Avg": 87.83}),
        ("DomainBed: ERM", {"Avg": 85.5}),
        ("DomainBed: RSC", {"Avg": 85.2}),
    ],
    ("pacs", "alexnet"): [
        ("paper: ERM", {"Avg": 71.52}),
        ("paper: RSC", {"art_painting": 71.62, "cartoon": 75.11, "sketch": 66.62, "photo": 90.88, "Avg": 76.05}),
    ],
    ("vlcs", "alexnet"): [
        ("paper: ERM", {"Avg": 72.76}),
        ("paper: RSC", {"Caltech101": 97.61, "LabelMe": 61.86, "VOC2007": 73.93, "SUN09": 68.32, "Avg": 75.43}),
    ],
    ("officehome", "resnet18"): [
        ("paper: ERM", {"Avg": 60.51}),
        ("paper: RSC", {"Art": 58.42, "Clipart": 47.90, "Product": 71.63, "Real_World": 74.54, "Avg": 63.12}),
    ],
    # ImageNet -> ImageNet-Sketch, top-1 (top-5 in PAPER_TOP5).
    ("imagenet", "alexnet"): [("paper: ERM", {"Avg": 12.04}), ("paper: RSC", {"Avg": 16.12})],
}
PAPER_TOP5 = {("imagenet", "alexnet"): [("paper: ERM", {"Avg": 24.80}), ("paper: RSC", {"Avg": 30.78})]}


class ResultsError(ValueError):
    """A results.json that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Run:
    path: Path
    dataset: str
    arch: str
    algorithm: str
    seed: int
    config: dict
    # metric ("best"/"last", "+top5" variants) -> {target: accuracy fraction}
    acc: dict[str, dict[str, float]]
    selection: str = OLD_SELECTION  # the rule that chose acc["best"]
    # From results.json's provenance (schema 4); None in older files.
    world_size: int | None = None
    threads: int | tuple[int, ...] | None = None  # CPU intra-op threads per rank


def dataset_key(name: str) -> str:
    """'PACS', 'office_home', 'Office-Home' -> 'pacs', 'officehome' (for the paper lookup)."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def load_run(path: Path, rule: str | None = None) -> Run:
    """Parse and check one results.json (layout: rsc_dist/core/contracts.py). ``rule``: choose "best"
    from the history with this selection rule instead of taking the run's own choice."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{path}: cannot read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ResultsError(f"{path}: expected a JSON object, got {type(data).__name__}")

    def need(key, kind, where=data, label=None):
        label = label or key
        if key not in where:
            raise ResultsError(f"{path}: missing key {label!r}")
        value = where[key]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise ResultsError(f"{path}: {label!r} must be {getattr(kind, '__name__', kind)}; got {value!r}")
        return value

    version = data.get("schema_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ResultsError(f"{path}: 'schema_version' must be a positive integer; got {version!r}")
    if version not in SCHEMA_VERSIONS:
        raise ResultsError(f"{path}: results.json schema_version {version} is newer than this rsc_dist "
                           f"understands (up to {max(SCHEMA_VERSIONS)}); update rsc_dist to read it")
    algorithm = need("algorithm", str)
    dataset = need("dataset", str)
    seed = need("seed", int)
    targets = need("targets", list)
    if not targets or not all(isinstance(t, str) for t in targets):
        raise ResultsError(f"{path}: 'targets' must be a non-empty list of domain names; got {targets!r}")
    config = data.get("config") or {}
    if not isinstance(config, dict):
        raise ResultsError(f"{path}: 'config' must be an object")
    arch = data.get("arch") or flatten(config).get("model.arch") or "?"
    blocks = {"last": need("last", dict)}
    labels = {"last": "last", "best": "best"}
    if rule is None:
        rule = data.get("selection") or OLD_SELECTION
        if data.get("best") is None and "best" in data:
            raise ResultsError(f"{path}: 'best' is null (selection {rule} chose no evaluation); "
                               "pass --selection last or --selection oracle")
        blocks["best"] = need("best", dict)
    else:
        history = need("history", list)
        try:
            blocks["best"] = selection.select(history, rule)
        except selection.SelectionError as exc:
            raise ResultsError(f"{path}: {exc}") from None
        if not all(isinstance(entry, dict) for entry in history):
            raise ResultsError(f"{path}: 'history' entries must be objects")
        labels["best"] = f"history[{history.index(blocks['best'])}]"
    acc: dict[str, dict[str, float]] = {}
    for metric in METRICS:
        block, where = blocks[metric], labels[metric]
        for kind, suffix, required in (("target_acc", "", True), ("target_top5", "+top5", False)):
            if kind not in block and not required:
                continue
            values = need(kind, dict, block, f"{where}.{kind}")
            for target in targets:
                label = f"{where}.{kind}.{target}"
                value = need(target, (int, float), values, label)
                if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                    raise ResultsError(f"{path}: {label!r} must be a fraction in [0, 1]; got {value!r}")
            acc[metric + suffix] = {t: float(values[t]) for t in targets}
    provenance = data.get("provenance") if isinstance(data.get("provenance"), dict) else {}
    threads = provenance.get("threads_per_rank")
    return Run(Path(path), dataset, str(arch), algorithm, seed, config, acc, rule, provenance.get("world_size"),
               tuple(threads) if isinstance(threads, list) else threads)


def results_files(root: Path) -> list[Path]:
    """Every run's results.json under ``root``, each run once: the copy or link a W&B run folder
    keeps in its files/ (RUN/wandb/offline-run-*/files/results.json) is not another run."""
    found = []
    for path in sorted(Path(root).rglob(RESULTS_FILE)):
        parts = path.relative_to(root).parts
        if any(WANDB_RUN_FOLDER.match(part) and parts[i + 1:i + 2] == ("files",)
               for i, part in enumerate(parts[:-1])):
            continue
        found.append(path)
    return found


def find_runs(root: Path, rule: str | None = None) -> list[Run]:
    paths = results_files(root)
    if not paths:
        raise ResultsError(f"no results.json under {root}")
    return [load_run(p, rule) for p in paths]


def method_labels(runs: list[Run]) -> dict[Path, str]:
    """Algorithm, plus `key=value` for each METHOD_KEY whose value differs between runs."""
    # Lists as tuples: the values are compared in a set.
    flats = {r.path: {**flatten(r.config, leaf=lambda v: tuple(v) if isinstance(v, list) else v),
                      "model.arch": r.arch} for r in runs}
    varying = [k for k in METHOD_KEYS if len({flats[r.path].get(k) for r in runs}) > 1]
    labels = {}
    for r in runs:
        parts = []
        for key in varying:
            section = key.split(".", 1)[0]
            if section in methods.METHODS and section != r.algorithm:
                continue
            value = flats[r.path].get(key)
            if value is not None:
                short = key.split(".", 1)[-1] if key in ("model.arch", "rsc.mode") else key
                parts.append(f"{short}={value}")
        labels[r.path] = r.algorithm.upper() + (f" ({', '.join(parts)})" if parts else "")
    return labels


@dataclass(frozen=True)
class Cell:
    mean: float | None = None  # percent
    std: float | None = None  # sample std over seeds; None with fewer than two
    n: int = 0  # seeds
    note: str = ""  # printed instead of n (e.g. why there is no std)

    @classmethod
    def of(cls, values: list[float]) -> "Cell":
        if not values:
            return cls()
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))

    def text(self) -> str:
        if self.mean is None:
            return "-"
        std = f" ± {self.std:.2f}" if self.std is not None else ""
        return f"{self.mean:.2f}{std} ({self.note or self.n})"


def average_cell(per_target: dict[str, dict[int, float]]) -> Cell:
    """The Avg column: mean over targets of the per-target means (the paper's layout); its std
    is over seeds, of each seed's average over targets, when every target has the same seeds."""
    if not per_target or not all(per_target.values()):
        return Cell()
    mean = statistics.fmean(statistics.fmean(v.values()) for v in per_target.values())
    seed_sets = {frozenset(v) for v in per_target.values()}
    if len(seed_sets) != 1:
        return Cell(mean, None, 0, "seeds differ between targets")
    seeds = sorted(next(iter(seed_sets)))
    per_seed = [statistics.fmean(v[s] for v in per_target.values()) for s in seeds]
    return Cell(mean, statistics.stdev(per_seed) if len(per_seed) > 1 else None, len(per_seed))


@dataclass
class Table:
    dataset: str
    metric: str  # best | last | best+top5 | last+top5
    columns: list[str]  # targets, then "Avg"
    rows: dict[str, dict[str, Cell]]  # method -> column -> cell
    paper_rows: list[tuple[str, dict[str, float]]] = field(default_factory=list)
    rules: tuple[str, ...] = ()  # the selection rule(s) that chose "best" for these runs
    note: str = ""  # printed under the table: how its runs' layouts differ (layout_note)

    @property
    def selection(self) -> str:
        """What chose the evaluation: "last", a selection rule, or "mixed" (rows differ)."""
        if self.metric.startswith("last"):
            return "last"
        return self.rules[0] if len(self.rules) == 1 else "mixed"

    @property
    def title(self) -> str:
        if self.selection == "mixed":
            what = f"best step by each run's own rule ({', '.join(self.rules)}; rows name their train.selection)"
        else:
            what = selection.LABELS[self.selection]
        top = "top-5" if self.metric.endswith("+top5") else "top-1"
        return f"{self.dataset}: target accuracy (%), {top}, {what}; mean ± std over seeds (n)"

    @property
    def key(self) -> str:
        """The table's W&B key part: the metric, with the rule that chose "best"."""
        base, _, top5 = self.metric.partition("+")
        name = base if base == "last" else f"best_{self.selection}"
        return name + (f"+{top5}" if top5 else "")

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| method | " + " | ".join(self.columns) + " |",
                 "|---|" + "---|" * len(self.columns)]
        for method, cells in self.rows.items():
            lines.append(f"| {method} | " + " | ".join(cells[c].text() for c in self.columns) + " |")
        for label, values in self.paper_rows:
            lines.append(f"| {label} | " + " | ".join(
                f"{values[c]:.2f}" if c in values else "-" for c in self.columns) + " |")
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines) + "\n"

    def records(self) -> list[dict]:
        """Tidy rows: one per (method, column), ours and the paper's."""
        out = []
        for method, cells in self.rows.items():
            for c in self.columns:
                cell = cells[c]
                out.append({"dataset": self.dataset, "metric": self.metric, "selection": self.selection,
                            "source": "runs",
                            "method": method, "column": c,
                            "mean": "" if cell.mean is None else round(cell.mean, 4),
                            "std": "" if cell.std is None else round(cell.std, 4), "n": cell.n})
        for label, values in self.paper_rows:
            for c in self.columns:
                if c in values:
                    out.append({"dataset": self.dataset, "metric": self.metric, "selection": self.selection,
                                "source": "paper",
                                "method": label, "column": c, "mean": values[c], "std": "", "n": ""})
        return out


def layout_note(runs: list[Run]) -> str:
    """"Runs differ in world size 1 (3 runs), 2 (3 runs); ..." when the runs of one table were
    computed on other numbers of ranks or CPU threads per rank (the same algorithm; on CPUs the
    thread count changes float rounding), "" when they agree. Files before schema 4 say neither."""
    parts = []
    for label, attribute in (("world size", "world_size"), ("CPU threads per rank", "threads")):
        counts: dict = {}
        for run in runs:
            value = getattr(run, attribute)
            counts[value] = counts.get(value, 0) + 1
        if len(counts) > 1:
            shown = sorted(counts.items(), key=lambda item: (item[0] is None, str(item[0])))
            parts.append(f"{label} " + ", ".join(f"{'unknown' if value is None else value} ({n} run(s))"
                                                 for value, n in shown))
    return ("Runs differ in " + "; ".join(parts) + " (results.json provenance).") if parts else ""


def _ordered_targets(dataset: str, targets: set[str]) -> list[str]:
    order = {d.lower(): i for i, d in enumerate(DOMAIN_ORDER.get(dataset_key(dataset), []))}
    return sorted(targets, key=lambda t: (order.get(t.lower(), len(order)), t))


def build_tables(runs: list[Run], metrics=METRICS, paper: bool = False, top5: bool = False) -> list[Table]:
    labels = {}
    for dataset in {r.dataset for r in runs}:
        labels.update(method_labels([r for r in runs if r.dataset == dataset]))
    seen: dict[tuple, Path] = {}
    for r in runs:
        for t in r.acc["best"]:
            key = (r.dataset, labels[r.path], t, r.seed)
            if key in seen:
                raise ResultsError(f"{r.path}: duplicates {seen[key]} (same dataset, method "
                                   f"{labels[r.path]!r}, target {t!r}, seed {r.seed}); "
                                   "point to a folder holding only one of them")
            seen[key] = r.path
    tables = []
    for dataset in sorted({r.dataset for r in runs}):
        ds_runs = [r for r in runs if r.dataset == dataset]
        targets = _ordered_targets(dataset, {t for r in ds_runs for t in r.acc["best"]})
        methods = sorted({labels[r.path] for r in ds_runs}, key=lambda m: (not m.startswith("ERM"), m))
        archs = sorted({r.arch for r in ds_runs})
        variants = list(metrics) + [f"{m}+top5" for m in metrics
                                    if top5 and any(f"{m}+top5" in r.acc for r in ds_runs)]
        for metric in variants:
            rows: dict[str, dict[str, Cell]] = {}
            for method in methods:
                # target -> seed -> accuracy (%)
                per_target = {t: {r.seed: 100 * r.acc[metric][t] for r in ds_runs
                                  if labels[r.path] == method and t in r.acc.get(metric, {})}
                              for t in targets}
                rows[method] = {t: Cell.of(list(v.values())) for t, v in per_target.items()}
                rows[method]["Avg"] = average_cell(per_target)
            paper_rows = []
            if paper:
                table = PAPER_TOP5 if metric.endswith("+top5") else PAPER
                for arch in archs:
                    for label, values in table.get((dataset_key(dataset), arch.lower()), []):
                        lower = {k.lower(): v for k, v in values.items()}
                        row = {c: lower[c.lower()] for c in targets + ["Avg"] if c.lower() in lower}
                        paper_rows.append((label + (f" ({arch})" if len(archs) > 1 else ""), row))
            rules = tuple(sorted({r.selection for r in ds_runs}))
            tables.append(Table(dataset, metric, targets + ["Avg"], rows, paper_rows, rules, layout_note(ds_runs)))
    return tables


def write_outputs(tables: list[Table], out: Path, n_runs: int, root: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md = out / "results.md"
    md.write_text(f"Results of {n_runs} run(s) under {root}\n\n" + "\n".join(t.markdown() for t in tables))
    csv_path = out / "results.csv"
    with open(csv_path, "w", newline="") as f:
        fields = ["dataset", "metric", "selection", "source", "method", "column", "mean", "std", "n"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for t in tables:
            writer.writerows(t.records())
    return md, csv_path


def table_rows(t: Table) -> tuple[list[str], list[list]]:
    """A table's columns and rows as logged to W&B: ours ("runs"), then the paper's."""
    columns = ["method", "source"] + [f"{c} mean" for c in t.columns] + [f"{c} std" for c in t.columns] + ["n"]
    data = []
    for method, cells in t.rows.items():
        data.append([method, "runs"] + [cells[c].mean for c in t.columns]
                    + [cells[c].std for c in t.columns] + [cells["Avg"].n])
    for label, values in t.paper_rows:
        data.append([label, "paper"] + [values.get(c) for c in t.columns] + [None] * len(t.columns) + [None])
    return columns, data


def log_to_wandb(tables: list[Table], root: Path, project: str, out: Path | None = None) -> str | None:
    """Log every table as a wandb.Table in one "results" run. Returns the mode used ("online",
    or "offline" with the run under OUT/wandb/), None when W&B is disabled or not installed."""
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
    for t in tables:
        columns, data = table_rows(t)
        run.log({f"results/{t.dataset}/{t.key}": wandb.Table(columns=columns, data=data)})
        run.summary[f"results/{t.dataset}/{t.key}/selection"] = t.selection  # "oracle" says so
    run.finish()
    return mode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rsc_dist.results", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs_dir", type=Path, help="folder searched recursively for results.json")
    p.add_argument("--out", type=Path, help="where results.md / results.csv go (default: RUNS_DIR)")
    p.add_argument("--metric", choices=("best", "last", "both"), default="both")
    p.add_argument("--selection", choices=selection.RULES,
                   help="choose each run's best from its history with this rule (default: the rule the run "
                        "trained with, its train.selection); oracle = best target accuracy, an upper bound, "
                        "labelled ORACLE in every output")
    p.add_argument("--paper", action="store_true", help="add the paper's numbers where known")
    p.add_argument("--top5", action="store_true",
                   help="also top-5 tables (runs that report target_top5; the ImageNet-Sketch table)")
    p.add_argument("--wandb", action="store_true",
                   help="log the tables to W&B (offline under OUT/wandb/ without an API key)")
    p.add_argument("--wandb-project", default=os.environ.get("WANDB_PROJECT", "rsc_dist"))
    args = p.parse_args(argv)
    from rsc_dist.results import sweep_select  # a sweep's folder: selection across its trials

    if args.selection and sweep_select.is_sweep(args.runs_dir):
        return sweep_select.report(args.runs_dir, args.selection, args.out)
    try:
        runs = find_runs(args.runs_dir, args.selection)
        metrics = METRICS if args.metric == "both" else (args.metric,)
        tables = build_tables(runs, metrics, paper=args.paper, top5=args.top5)
    except ResultsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    md, csv_path = write_outputs(tables, args.out or args.runs_dir, len(runs), args.runs_dir)
    print(md.read_text())
    print(f"wrote {md} and {csv_path}", file=sys.stderr)
    if args.wandb:
        out = args.out or args.runs_dir
        mode = log_to_wandb(tables, args.runs_dir, args.wandb_project, out)
        if mode is None:
            print("W&B disabled or not installed: tables not logged", file=sys.stderr)
        elif mode == "offline":
            print(f"W&B offline: tables logged under {out / 'wandb'}; upload them with "
                  f"`wandb sync {out / 'wandb'}/offline-run-*`", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
