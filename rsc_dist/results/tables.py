"""The per-run tables: the results.json files of many runs as the paper's tables (the command
line is rsc_dist/results/cli.py; a sweep's selection across trials is sweep_select.py).

One table per dataset and metric: rows are methods (the algorithm, plus `key=value` for exactly
the trajectory settings that differ between the runs: rsc_dist.config.trajectory_items, with the
global batch the runs resolved, not the number of processes), columns are the target domains
and their average, cells are mean +- spread over seeds in percent with the number of seeds
(sample std by default, DomainBed's standard error with --error se).
"best" is the evaluation each run's selection rule chose (its train.selection, recorded in its
results.json); --selection RULE applies another rule to every run's history after the fact:
source_val_mean, source_val_pooled, last, or oracle (the best-target-accuracy step, labelled as
an oracle in every output). "last" is the final step; both tables by default. The average
column averages the per-target means; its std is over each seed's average, when every target
has the same seeds. `--paper` adds the paper's reported numbers for the
(dataset, architecture) pairs it knows; `--top5` adds top-5 tables. Each table names the
protocol(s) its runs recorded (run.protocol), the rule that chose "best" and the spread.

Reads results.json schema versions 1 to 4; the layout is described once, in
rsc_dist/core/contracts.py. A W&B run folder's copy or link of results.json (wandb/*run-*/files/) is
not a run of its own: each run is read once whatever its tracker.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rsc_dist import methods
from rsc_dist.config import EARLIER_DEFAULTS, flatten, trajectory_items
from rsc_dist.core import selection
from rsc_dist.core.contracts import RESULTS_FILE, RESULTS_SCHEMA_VERSION
from rsc_dist.core.protocols import dataset_key
from rsc_dist.core.errors import UsageError
from rsc_dist.results import render
from rsc_dist.results.render import Cell

METRICS = ("best", "last")
# results.json layouts this reader understands: 1 (no "schema_version" key) up to the current one.
SCHEMA_VERSIONS = tuple(range(1, RESULTS_SCHEMA_VERSION + 1))

# Trajectory settings that never split a row: the seed and the held-out domains (the table's
# columns), and the holdout seed, which DomainBed's protocol sets to the trial seed.
NOT_ROW_KEYS = ("algorithm", "run.seed", "data.target", "data.holdout_seed")
UNRECORDED_PROTOCOL = "unrecorded (results.json before schema 4)"
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


class ResultsError(UsageError):
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
    protocol: str = UNRECORDED_PROTOCOL  # run.protocol (schema 4)
    global_batch: int | None = None  # samples per step over all processes (schema 4)
    variant: str = ""  # not the run's own trained model: "SWAD", "uniform soup of 5 runs" (its row: METHOD + VARIANT)
    # From results.json's provenance (schema 4); None in older files.
    world_size: int | None = None
    threads: int | tuple[int, ...] | None = None  # CPU intra-op threads per rank


def read_document(path: Path) -> dict:
    """One results.json as a dict (ResultsError naming the file when it is not one)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{path}: cannot read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ResultsError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_run(path: Path, rule: str | None = None) -> Run:
    """Parse and check one results.json (layout: rsc_dist/core/contracts.py). ``rule``: choose "best"
    from the history with this selection rule instead of taking the run's own choice."""
    return parse_run(path, read_document(path), rule)


def parse_run(path: Path, data: dict, rule: str | None = None) -> Run:
    """``load_run`` on a document already read (``path`` names it in messages and labels)."""

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
    global_batch = data.get("global_batch")
    variant = data.get("variant") or ""
    if not isinstance(variant, str):
        raise ResultsError(f"{path}: 'variant' must be a string; got {variant!r}")
    provenance = data.get("provenance") if isinstance(data.get("provenance"), dict) else {}
    threads = provenance.get("threads_per_rank")
    return Run(Path(path), dataset, str(arch), algorithm, seed, config, acc, rule,
               str(data.get("protocol") or UNRECORDED_PROTOCOL),
               global_batch if isinstance(global_batch, int) and not isinstance(global_batch, bool) else None,
               variant, provenance.get("world_size"), tuple(threads) if isinstance(threads, list) else threads)


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


# The rows of an averaged model: a run trained with train.averaging is read as two runs, its
# own trained model ("ERM") and its averaged model ("ERM + SWAD"), each with its best, last and
# history, so every table, CSV row and --selection rule treats the average like any run. A run
# whose average has no evaluation (SWAD found no loss valley) gives no averaged row; the reason,
# from results.json's averaged.note, is printed on stderr so that a missing seed in the averaged
# row is never silent.
def averaged_document(data: dict) -> dict | None:
    """The run's document with its averaged model's evaluations in place of the trained
    model's (None: no averaged model with an evaluation)."""
    block = data.get("averaged")
    if not isinstance(block, dict) or not block.get("history"):
        return None
    return {**data, "best": block.get("best"), "last": block.get("last") or block["history"][-1],
            "history": block["history"], "averaged": None, "variant": block.get("label") or block.get("kind")}


def load_runs(path: Path, rule: str | None = None) -> list[Run]:
    """The run of one results.json, and its averaged model's run when it has one."""
    data = read_document(path)
    runs = [parse_run(path, data, rule)]
    block = data.get("averaged")
    if block is not None and not isinstance(block, dict):
        raise ResultsError(f"{path}: 'averaged' must be an object or null; got {block!r:.80}")
    averaged = averaged_document(data)
    if averaged is not None:
        runs.append(parse_run(Path(f"{path} (averaged: {averaged['variant']})"), averaged, rule))
    elif block:
        print(f"{path}: no {block.get('label', 'averaged')} row: {block.get('note') or 'no evaluation'}",
              file=sys.stderr)
    return runs


def find_runs(root: Path, rule: str | None = None) -> list[Run]:
    paths = results_files(root)
    if not paths:
        raise ResultsError(f"no results.json under {root}")
    return [run for p in paths for run in load_runs(p, rule)]  # a run's averaged model is a row of its own


def row_settings(run: Run) -> dict:
    """The settings that tell this run's trajectory apart from others' (a row splits on those
    that differ): the recorded config's trajectory settings (rsc_dist.config.trajectory_items,
    settings added later read at their earlier value) and the global batch it resolved, never
    the number of processes that computed it."""
    flat = flatten(run.config, leaf=lambda v: tuple(v) if isinstance(v, list) else v)
    flat.setdefault("model.arch", run.arch)
    for key, value in EARLIER_DEFAULTS.items():
        flat.setdefault(key, value)
    items = {k: v for k, v in trajectory_items(flat, run.algorithm).items() if k not in NOT_ROW_KEYS}
    if run.global_batch is not None:
        items["global_batch"] = run.global_batch
    else:  # before schema 4: the batch settings as recorded
        items.update({k: flat.get(k) for k in ("data.batch_size", "data.global_batch_size")})
    return items


_ABSENT = object()


def method_labels(runs: list[Run]) -> dict[Path, str]:
    """Algorithm, plus `key=value` for each trajectory setting whose value differs between runs."""
    settings = {r.path: row_settings(r) for r in runs}
    keys = sorted({k for items in settings.values() for k in items})
    # A key varies when the runs that have it disagree (a method's own settings: its runs only),
    # or, outside the methods' sections, when some runs have it and others not (an averaging
    # kind's settings are trajectory settings of its runs only: train.averaging=ema against none).
    own = set(methods.sections())

    def values(key):
        if key.split(".", 1)[0] in own:
            return {settings[r.path][key] for r in runs if key in settings[r.path]}
        return {settings[r.path].get(key, _ABSENT) for r in runs}

    varying = [k for k in keys if len(values(k)) > 1]
    labels = {}
    for r in runs:
        parts = []
        for key in varying:
            if key not in settings[r.path] or key == "train.averaging" and r.variant:
                continue  # another method's setting; an averaged row's variant names its averaging
            value = settings[r.path][key]
            if value is None and r.variant:
                continue  # a soup's setting its ingredients differ in: it has no one value
            short = key.split(".", 1)[-1] if key in ("model.arch", "rsc.mode") else key
            parts.append(f"{short}={_label_value(value)}")
        variant = f" + {r.variant}" if r.variant else ""
        labels[r.path] = r.algorithm.upper() + variant + (f" ({', '.join(parts)})" if parts else "")
    return labels


def _label_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def average_cell(per_target: dict[str, dict[int, float]], error: str = "std") -> Cell:
    """The Avg column: mean over targets of the per-target means (the paper's layout); its spread
    is over seeds, of each seed's average over targets, when every target has the same seeds."""
    if not per_target or not all(per_target.values()):
        return Cell()
    mean = statistics.fmean(statistics.fmean(v.values()) for v in per_target.values())
    seed_sets = {frozenset(v) for v in per_target.values()}
    if len(seed_sets) != 1:
        return Cell(mean, None, 0, "seeds differ between targets")
    seeds = sorted(next(iter(seed_sets)))
    per_seed = [statistics.fmean(v[s] for v in per_target.values()) for s in seeds]
    return Cell(mean, render.spread(per_seed, error), len(per_seed))


@dataclass
class Table:
    dataset: str
    metric: str  # best | last | best+top5 | last+top5
    columns: list[str]  # targets, then "Avg"
    rows: dict[str, dict[str, Cell]]  # method -> column -> cell
    paper_rows: list[tuple[str, dict[str, float]]] = field(default_factory=list)
    rules: tuple[str, ...] = ()  # the selection rule(s) that chose "best" for these runs
    error: str = "std"  # the cells' spread (render.ERRORS)
    protocols: tuple[str, ...] = ()  # the runs' recorded run.protocol values
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
        return f"{self.dataset}: target accuracy (%), {top}, {what}; mean ± {self.error} over seeds (n)"

    @property
    def key(self) -> str:
        """The table's W&B key part: the metric, with the rule that chose "best"."""
        base, _, top5 = self.metric.partition("+")
        name = base if base == "last" else f"best_{self.selection}"
        return name + (f"+{top5}" if top5 else "")

    def rendered(self) -> render.Table:
        rules = [self.selection] if self.selection != "mixed" else list(self.rules)
        about = [f"Protocol: {', '.join(self.protocols) or UNRECORDED_PROTOCOL}. Selection: "
                 f"{'; '.join(selection.LABELS.get(r, r) for r in rules)}.",
                 f"Cells: mean ± {render.ERRORS[self.error]} over seeds; (n) = seeds, one run each; Avg: mean of the "
                 "columns, its spread over the seeds' averages."] + ([self.note] if self.note else [])
        return render.Table(self.title, about, self.columns, self.rows, self.paper_rows,
                            csv_fields={"table": "runs", "dataset": self.dataset, "metric": self.metric,
                                        "protocol": ", ".join(self.protocols), "selection": self.selection,
                                        "error": self.error},
                            key=f"{self.dataset}/{self.key}", selection=self.selection, reference_source="paper")

    def markdown(self) -> str:
        return render.markdown(self.rendered())

    def records(self) -> list[dict]:
        """Tidy rows: one per (method, column), ours and the paper's."""
        return render.csv_rows(self.rendered())


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


def build_tables(runs: list[Run], metrics=METRICS, paper: bool = False, top5: bool = False,
                 error: str = "std") -> list[Table]:
    labels = {}
    for dataset in {r.dataset for r in runs}:
        labels.update(method_labels([r for r in runs if r.dataset == dataset]))
    seen: dict[tuple, Path] = {}
    for r in runs:
        for t in r.acc["best"]:
            key = (r.dataset, labels[r.path], t, r.seed)
            if key in seen:  # every trajectory setting equal: the same run twice
                raise ResultsError(f"{r.path}: duplicates {seen[key]} (same dataset, every trajectory setting "
                                   f"({labels[r.path]!r}), target {t!r}, seed {r.seed}); "
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
                rows[method] = {t: Cell.of(list(v.values()), error) for t, v in per_target.items()}
                rows[method]["Avg"] = average_cell(per_target, error)
            paper_rows = reference_rows(dataset, archs, targets, top5=metric.endswith("+top5")) if paper else []
            rules = tuple(sorted({r.selection for r in ds_runs}))
            protocols = tuple(sorted({r.protocol for r in ds_runs}))
            tables.append(Table(dataset, metric, targets + ["Avg"], rows, paper_rows, rules, error, protocols,
                                layout_note(ds_runs)))
    return tables


def reference_rows(dataset: str, archs: list[str], columns: list[str], top5: bool = False) -> list[tuple]:
    """The paper's (and DomainBed's) published rows for a dataset and its architectures, for the
    columns given (and Avg)."""
    table = PAPER_TOP5 if top5 else PAPER
    rows = []
    for arch in archs:
        for label, values in table.get((dataset_key(dataset), arch.lower()), []):
            lower = {k.lower(): v for k, v in values.items()}
            row = {c: lower[c.lower()] for c in columns + ["Avg"] if c.lower() in lower}
            rows.append((label + (f" ({arch})" if len(archs) > 1 else ""), row))
    return rows
