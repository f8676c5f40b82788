"""Shared steps for layouts whose splits come from list files (PACS kfold, DomainNet).

Each step reports into the Layout: duplicate lines are skipped, listed-but-missing images are
skipped, images on disk that no list names are reported as one warning per domain, an image in
two splits that must be disjoint is a ConvertError (the evaluation would leak).
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

from data_prep.listfiles import ListEntry
from data_prep.records import ConvertError, Layout, SourceRecord
from data_prep.tree import list_files_recursive, relative_posix


def unique_entries(entries: list[ListEntry], layout: Layout) -> list[ListEntry]:
    seen: dict[str, ListEntry] = {}
    for entry in entries:
        first = seen.setdefault(entry.path, entry)
        if first is not entry:
            layout.skip("duplicate_entry", entry.path, f"{entry.where} repeats line {first.line_number}")
    return list(seen.values())


def require_disjoint(first: list[ListEntry], second: list[ListEntry]) -> None:
    second_paths = {e.path: e for e in second}
    for entry in first:
        if entry.path in second_paths:
            raise ConvertError(f"{entry.path} is listed in {entry.where} and in {second_paths[entry.path].where}; "
                               "splits must be disjoint")


def key_hint(domain: str, listed_path: str) -> str:
    path = PurePosixPath(listed_path)
    stem = path.with_suffix("").as_posix() if path.suffix else path.as_posix()
    return stem if path.parts[0] == domain else f"{domain}/{stem}"


def records_for(entries: list[ListEntry], *, src: Path, image_root: Path, domain: str, split: str,
                layout: Layout) -> list[SourceRecord]:
    records = []
    for entry in entries:
        if entry.path.startswith("/") or ".." in PurePosixPath(entry.path).parts:
            raise ConvertError(f"{entry.where}: path {entry.path!r} leaves the image folder {image_root}")
        path = image_root / entry.path
        if not path.is_file():
            layout.skip("missing_file", relative_posix(path, src), f"named by {entry.where} but not on disk")
            continue
        records.append(SourceRecord(path, relative_posix(path, src), domain, entry.label, split,
                                    key_hint(domain, entry.path)))
    return records


def warn_unlisted(*, src: Path, image_root: Path, domain: str, listed: set[str], layout: Layout) -> None:
    domain_dir = image_root / domain
    if not domain_dir.is_dir():
        return
    unlisted = [relative_posix(p, image_root) for p in list_files_recursive(domain_dir)
                if relative_posix(p, image_root) not in listed]
    if unlisted:
        layout.warn("unlisted_files", relative_posix(domain_dir, src),
                    f"{len(unlisted)} files are named by no list file and left out, e.g. {unlisted[:5]}")


def warn_missing_classes(layout: Layout) -> None:
    for domain in layout.domains:
        present = {r.label for r in layout.records if r.domain == domain}
        for label, name in enumerate(layout.classes):
            if label not in present:
                layout.warn("class_missing", domain, f"class {name!r} has no images in domain {domain!r}")
