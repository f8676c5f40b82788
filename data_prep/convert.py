"""The conversion pipeline: scan a source layout, plan shards, build them in parallel, then write
the report and, last of all, the manifest.

    python -m data_prep convert --format pacs --src /data/PACS --out /data/shards/pacs --workers 8

Order matters for safety: an existing manifest is removed before any shard is touched and the new
one is written (atomically) only after every shard is complete, so a manifest never lists a
half-written or stale shard. Rerunning after an interruption reuses every complete shard whose
inputs (paths, sizes, mtimes, keys, labels) are unchanged and builds the rest.
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from tqdm import tqdm

from data_prep import DATA_PREP_VERSION, SPLITS
from data_prep.formats import FORMATS, ScanOptions, layout_hint
from data_prep.images import MAX_PIXELS
from data_prep.keys import assign_keys
from data_prep.parallel import unordered_map
from data_prep.manifest import FORMAT_VERSION, MANIFEST_NAME, REPORT_NAME, load_manifest, write_json_atomic, write_manifest
from data_prep.plan import PlannedSample, ShardJob, cut_into_shards, sample_order
from data_prep.records import STRICT_ACTIONS, ConvertError, Layout, LayoutNotFound, Problem, SourceRecord
from data_prep.shard_writer import STATE_DIR, ShardResult, reuse_or_build, state_path
from data_prep.tree import collect_listing_problems
from data_prep.val_check import no_val_problems, val_gaps

DEFAULT_SHARD_SAMPLES = 256  # small DG datasets still give enough shards for many ranks x workers
DEFAULT_SHARD_BYTES = 256 * 2**20
_SHARD_FILE = re.compile(r"^(train|val|test)-\d{6}\.tar$")
_DOMAIN_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
REPORT_FORMAT_VERSION = 1  # _report.json; independent of the manifest's format_version


@dataclass(frozen=True)
class ConvertSummary:
    out: Path
    num_samples: int
    num_shards: int
    reused_shards: int
    skipped: int
    reencoded: int
    warnings: int
    holdout: float | None = None  # the random holdout's fraction; None: the layout's own splits
    no_val: tuple[str, ...] = ()  # one line per (domain, class) without a val sample


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _check_paths(src: Path, out: Path) -> None:
    if not src.is_dir():
        raise ConvertError(f"--src {src} is not a directory")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {out} exists and is not a directory; choose a folder (new or empty)")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ConvertError(f"--out {out}: {blocking} is a file, not a directory")
    if out == src or src in out.parents:
        raise ConvertError(f"--out {out} is inside --src {src}: a rerun would read its own shards as images")
    if out.is_dir() and any(out.iterdir()) and not ((out / MANIFEST_NAME).exists() or (out / STATE_DIR).exists()):
        raise ConvertError(f"--out {out} is not empty and holds no data_prep output; choose an empty folder")


def _refuse_replacing_another_conversion(out: Path, fmt: str, src: Path) -> None:
    """A conversion rewrites its whole --out: another --src or --format there would replace the
    root silently (a second convert never adds domains to a first one)."""
    try:
        previous = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))["converter"]
        old_fmt, old_src = previous["format"], previous["args"]["src"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no readable manifest: nothing listed that would be lost
    if old_fmt == fmt and os.path.realpath(old_src) == os.path.realpath(src):
        return
    hint = ("; for ImageNet-Sketch next to ImageNet in one root, put sketch/ beside train/ and val/ and convert "
            "once with --format imagenet" if {fmt, old_fmt} <= {"imagenet", "imagenet_sketch"} else "")
    raise ConvertError(f"--out {out} holds the conversion of {old_src} (--format {old_fmt}); converting {src} "
                       f"(--format {fmt}) there would replace it: choose another --out, or delete it first{hint}")


def _pin_classes(layout: Layout, pinned: tuple[str, ...], origin: Path) -> None:
    """Re-index labels to a class order fixed elsewhere (--classes-from); name the classes of that
    order a domain has no image of (their indices stay reserved)."""
    unknown = sorted(set(layout.classes) - set(pinned))
    if unknown:
        raise ConvertError(f"classes {unknown[:10]} are not in {origin / MANIFEST_NAME}")
    index = {name: i for i, name in enumerate(pinned)}
    layout.records = [replace(r, label=index[layout.classes[r.label]]) for r in layout.records]
    layout.classes = list(pinned)
    for domain in layout.domains:
        present = {r.label for r in layout.records if r.domain == domain}
        missing = [name for i, name in enumerate(pinned) if i not in present]
        if missing and present:
            layout.warn("class_missing", domain, f"{len(missing)} classes of {origin / MANIFEST_NAME} have no "
                        f"images in {domain!r} (their indices stay reserved): {missing[:10]}")


def _drop_empty_domains(layout: Layout, src: Path, fmt: str) -> None:
    present = {r.domain for r in layout.records}
    for domain in layout.domains:
        if domain not in present:
            layout.skip("empty_domain", domain, "no image of this domain remains; domain left out")
    layout.domains = [d for d in layout.domains if d in present]
    if not layout.domains:
        kinds = sorted({p.kind for p in layout.problems})
        first = "; ".join(f"{p.kind} {p.file}" for p in layout.problems[:3])
        found = f"; {len(layout.problems)} problems ({', '.join(kinds)}), first: {first}" if first else ""
        raise LayoutNotFound(f"no images found in {src}: every domain is empty{found}; {layout_hint(fmt)}")
    for domain in layout.domains:
        if not _DOMAIN_NAME.match(domain):
            raise ConvertError(f"domain name {domain!r} is not usable as a folder name ([A-Za-z0-9_-])")


def _canonical(record, real_src: str) -> bool:
    """True when the record's path reaches its file without passing through a symlink."""
    return os.path.realpath(record.path) == os.path.join(real_src, *record.src.split("/"))


def _stat_records(layout: Layout, src: Path) -> tuple[list[tuple[SourceRecord, os.stat_result]], list[Problem]]:
    """Stat every record; one real file (same device and inode, e.g. reached through a symlink) gives
    one sample only: the path without symlinks wins, else the first; the others are `duplicate_file`."""
    kept_by_file: dict[tuple[int, int], tuple[SourceRecord, os.stat_result]] = {}
    problems = []
    real_src = os.path.realpath(src)
    for record in layout.records:
        try:
            record.src.encode("utf-8")
        except UnicodeEncodeError:  # a file name that is not valid UTF-8: `src` could not hold it
            problems.append(Problem("bad_file_name", "skipped", ascii(record.src), "file name is not valid UTF-8"))
            continue
        try:
            stat = record.path.stat()
        except OSError as error:
            problems.append(Problem("unreadable", "skipped", record.src, f"cannot stat: {error.strerror}"))
            continue
        identity = (stat.st_dev, stat.st_ino)
        kept = kept_by_file.get(identity)
        if kept is None:
            kept_by_file[identity] = (record, stat)
            continue
        dropped = record
        if _canonical(record, real_src) and not _canonical(kept[0], real_src):
            kept_by_file[identity], dropped = (record, stat), kept[0]
        problems.append(Problem("duplicate_file", "skipped", dropped.src,
                                f"same file as {kept_by_file[identity][0].src} ({os.path.realpath(record.path)}); "
                                "one file gives one sample"))
    return list(kept_by_file.values()), problems


def _planned_samples(layout: Layout, stats: list[tuple[SourceRecord, os.stat_result]],
                     keys: dict[str, str]) -> list[PlannedSample]:
    domain_index = {d: i for i, d in enumerate(layout.domains)}
    return [PlannedSample(record, keys[record.src], domain_index[record.domain], stat.st_size, stat.st_mtime_ns)
            for record, stat in stats]


def _plan(samples: list[PlannedSample], layout: Layout, *, seed: int, shard_samples: int, shard_bytes: int,
          max_pixels: int) -> list[ShardJob]:
    groups: dict[tuple[str, str], list[PlannedSample]] = {}
    for sample in samples:
        groups.setdefault((sample.record.domain, sample.record.split), []).append(sample)
    jobs = []
    for domain in layout.domains:
        for split in SPLITS:
            ordered = sample_order(groups.get((domain, split), []), seed=seed, domain=domain, split=split)
            jobs += cut_into_shards(ordered, domain=domain, split=split, shard_samples=shard_samples,
                                    shard_bytes=shard_bytes, max_pixels=max_pixels)
    return jobs


def _raise_if_strict(problems: list[Problem], out: Path | None) -> None:
    offending = [p for p in problems if p.action in STRICT_ACTIONS]
    if offending:
        where = f" (all in {out / REPORT_NAME})" if out else ""
        lines = "".join(f"\n  {p.kind}: {p.file}: {p.detail}" for p in offending[:20])
        raise ConvertError(f"--strict: {len(offending)} input problems{where}:{lines}")


def _clear_previous_output(out: Path, jobs: list[ShardJob]) -> None:
    """Unlist the old manifest first, then remove leftovers: temp files, shards and states not planned now."""
    for name in (MANIFEST_NAME, REPORT_NAME):
        (out / name).unlink(missing_ok=True)
    planned = {job.file for job in jobs}
    planned_states = {state_path(out, job) for job in jobs}
    for directory in [d for d in out.iterdir() if d.is_dir() and d.name != STATE_DIR]:
        for path in directory.iterdir():
            stale_shard = _SHARD_FILE.match(path.name) and f"{directory.name}/{path.name}" not in planned
            if stale_shard or (path.name.startswith(".") and path.name.endswith(".tmp")):
                path.unlink()
        if not any(directory.iterdir()):
            directory.rmdir()
    for state in (out / STATE_DIR).rglob("*.json") if (out / STATE_DIR).is_dir() else []:
        if state not in planned_states:
            state.unlink()


def _run_jobs(out: Path, jobs: list[ShardJob], *, workers: int, progress: bool) -> list[ShardResult]:
    sizes = {job.file: len(job.samples) for job in jobs}
    results = []
    with tqdm(total=sum(sizes.values()), unit="img", desc="convert", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar, unordered_map(workers, len(jobs)) as imap:
        for result in imap(partial(reuse_or_build, out), jobs):
            results.append(result)
            bar.update(sizes[result.file])
    return sorted(results, key=lambda r: r.file)


def _manifest_payload(fmt: str, layout: Layout, results: list[ShardResult], args: dict, skipped: int,
                      no_val: list[tuple[str, str]]) -> dict:
    splits = {d: {s: {"num_samples": 0, "shards": []} for s in SPLITS} for d in layout.domains}
    for result in results:
        if not result.num_samples:
            continue
        domain, name = result.file.split("/")
        entry = splits[domain][name.split("-")[0]]
        entry["num_samples"] += result.num_samples
        entry["shards"].append({"file": result.file, "num_samples": result.num_samples,
                                "num_bytes": result.num_bytes, "sha256": result.sha256,
                                "sample_offsets": list(result.sample_offsets)})
    return {"format_version": FORMAT_VERSION, "dataset": fmt, "classes": layout.classes, "domains": layout.domains,
            "splits": splits, "converter": {"format": fmt, "args": args, "data_prep_version": DATA_PREP_VERSION},
            "skipped": skipped, "report": REPORT_NAME, "no_val": [list(pair) for pair in no_val]}


def _report_payload(fmt: str, problems: list[Problem], num_samples: int) -> dict:
    counts = {action: sum(p.action == action for p in problems) for action in ("skipped", "warning", "reencoded", "renamed")}
    return {"format_version": REPORT_FORMAT_VERSION, "dataset": fmt, "num_samples": num_samples, "counts": counts,
            "problems": [p.as_dict() for p in problems]}


def convert(fmt: str, src: str | os.PathLike, out: str | os.PathLike, *, shard_samples: int = DEFAULT_SHARD_SAMPLES,
            shard_bytes: int = DEFAULT_SHARD_BYTES, workers: int | None = None, strict: bool = False,
            val_fraction: float | None = None, seed: int = 0, classes_from: str | os.PathLike | None = None,
            progress: bool = True, max_pixels: int = MAX_PIXELS) -> ConvertSummary:
    if fmt not in FORMATS:
        raise ConvertError(f"unknown format {fmt!r}; choose from {sorted(FORMATS)}")
    if shard_samples < 1 or shard_bytes < 1:
        raise ConvertError("--shard-samples and --shard-bytes must be positive")
    if max_pixels < 1:
        raise ConvertError(f"--max-pixels must be positive, got {max_pixels}")
    if val_fraction is not None and not 0.0 <= val_fraction < 1.0:
        raise ConvertError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    src, out = Path(src).absolute(), Path(out).absolute()
    _check_paths(src, out)
    _refuse_replacing_another_conversion(out, fmt, src)
    pinned = None if classes_from is None else load_manifest(classes_from).classes
    with collect_listing_problems(src) as listing_problems:
        try:
            layout = FORMATS[fmt](src, ScanOptions(val_fraction=val_fraction, seed=seed, pinned_classes=pinned))
        except LayoutNotFound as error:
            raise LayoutNotFound(f"{error}; {layout_hint(fmt)}") from None
    layout.problems += listing_problems
    if pinned is not None:
        _pin_classes(layout, pinned, Path(classes_from))
    _drop_empty_domains(layout, src, fmt)
    if val_fraction is not None and layout.holdout is None:
        raise ConvertError(f"--val-fraction {val_fraction:g} asks for a random holdout, but {src} (--format {fmt}) "
                           "has its own split for every domain, so none would be made: leave --val-fraction out")
    stats, stat_problems = _stat_records(layout, src)
    keys, key_problems = assign_keys([record for record, _ in stats])
    samples = _planned_samples(layout, stats, keys)
    planned_gaps = val_gaps(record for record, _ in stats)
    problems = layout.problems + key_problems + stat_problems + no_val_problems(planned_gaps, layout.classes)
    if strict:
        _raise_if_strict(problems, None)  # before writing anything

    jobs = _plan(samples, layout, seed=seed, shard_samples=shard_samples, shard_bytes=shard_bytes,
                 max_pixels=max_pixels)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConvertError(f"--out {out}: cannot create the folder: {error.strerror or error}") from None
    _clear_previous_output(out, jobs)
    results = _run_jobs(out, jobs, workers=workers or default_workers(), progress=progress)
    problems += [p for r in results for p in r.problems]
    skipped_now = {p.file for r in results for p in r.problems if p.action == "skipped"}
    written = (record for record, _ in stats if record.src not in skipped_now)
    late_gaps = {gap: n for gap, n in val_gaps(written).items() if gap not in planned_gaps}
    problems += no_val_problems(late_gaps, layout.classes)
    no_val = sorted((domain, layout.classes[label]) for domain, label in {**planned_gaps, **late_gaps})
    filled = {r.file.split("/")[0] for r in results if r.num_samples}
    problems += [Problem("empty_domain", "warning", d, "every image of this domain was skipped; it has no samples")
                 for d in layout.domains if d not in filled]
    problems.sort(key=lambda p: (p.action, p.kind, p.file))

    num_samples = sum(r.num_samples for r in results)
    write_json_atomic(out / REPORT_NAME, _report_payload(fmt, problems, num_samples))
    if strict:
        _raise_if_strict(problems, out)
    args = {"src": str(src), "shard_samples": shard_samples, "shard_bytes": shard_bytes, "val_fraction": layout.holdout,
            "seed": seed, "strict": strict, "classes_from": None if classes_from is None else str(Path(classes_from).absolute()),
            "max_pixels": max_pixels}
    skipped = sum(p.action == "skipped" for p in problems)
    write_manifest(out, _manifest_payload(fmt, layout, results, args, skipped, no_val))
    return ConvertSummary(out, num_samples, sum(1 for r in results if r.num_samples), sum(r.reused for r in results),
                          skipped, sum(p.action == "reencoded" for p in problems), sum(p.action == "warning" for p in problems),
                          layout.holdout, tuple(p.detail for p in problems if p.kind == "no_val"))
